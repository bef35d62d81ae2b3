"""Serve a model locally, score one image over HTTP on loopback, print it, tear down.

For the quickstart (``oodlab serve <model> --smoke``) and for anyone checking that a
registered model can be served: every step a real client takes, in one call.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from oodlab.serve.auth import load_token
from oodlab.serve.config import ModelConfig, ServeOptions
from oodlab.serve.deploy import Deployment, deploy, remove
from oodlab.serve.registry import resolve


def sample_png(text: str = "7", size: int = 64) -> bytes:
    """A rendered glyph as an RGB PNG (any size and mode: the server preprocesses it)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (size, size), "black")
    font = ImageFont.load_default(size=int(size * 0.8))
    ImageDraw.Draw(img).text((size / 2, size / 2), text, fill="white", font=font, anchor="mm")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def post_json(url: str, body: dict[str, Any], token: bytes | None = None,
              timeout_s: float = 60.0) -> dict[str, Any]:
    """POST a JSON body; an HTTP error raises with the server's message."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token.decode()}"
    req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"POST {url}: HTTP {err.code}: {err.read().decode()[:500]}") from None


@dataclass
class SmokeResult:
    url: str
    response: dict[str, Any]
    deployment: Deployment


def serve_and_score_once(ref: str, tracking_uri: str | None = None, keep: bool = False,
                         options: ServeOptions | None = None, address: str | None = None
                         ) -> SmokeResult:
    """Deploy ``ref`` (alias resolved and pinned first), score :func:`sample_png` through
    ``POST /v1/score``, print the answer and return it with the service URL. Unless
    ``keep``, remove the application afterwards (and Serve and Ray, if this call started
    them)."""
    base = options or ServeOptions(model=ModelConfig(model=ref))
    model = ModelConfig.model_validate(
        base.model.model_dump() | {"model": ref, "tracking_uri": tracking_uri, "version": None})
    model.version = resolve(model.model, tracking_uri).version  # fails before Ray starts
    opts = base.model_copy(update={"model": model})
    token = load_token(opts.args.token_file)
    dep = deploy(opts, address)
    try:
        body = {"images": [base64.b64encode(sample_png()).decode()]}
        answer = post_json(f"{dep.url}/v1/score", body, token)
        r, m = answer["results"][0], answer["model"]
        print(f"served {m['name']} version {m['version']} at {dep.url}: score "
              f"{r['score']:.4f}, threshold {answer['threshold']}, is_ood {r['is_ood']}")
        print(json.dumps(answer))
        return SmokeResult(dep.url, answer, dep)
    finally:
        if not keep:
            remove(dep)
