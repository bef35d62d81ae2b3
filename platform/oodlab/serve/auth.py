"""Bearer-token auth: one shared token from a file or the environment, compared in constant
time. No token configured means no auth (the default for loopback development)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from oodlab.serve.config import TOKEN_ENV


class AuthConfigError(RuntimeError):
    """The token source is configured but unusable (missing or empty file, ...)."""


def load_token(token_file: str | None, require: bool = False) -> bytes | None:
    """The token from ``token_file`` (stripped), else ``$OODLAB_SERVE_TOKEN``, else None."""
    token: str | None = None
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise AuthConfigError(f"token_file {str(path)!r}: {err.strerror}") from None
        if not token:
            raise AuthConfigError(f"token_file {str(path)!r} is empty")
    else:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
    if require and token is None:
        raise AuthConfigError(f"a token is required but neither token_file nor ${TOKEN_ENV} "
                              "is set in the replica's environment")
    return token.encode() if token else None


def authorized(header: str | None, token: bytes | None) -> bool:
    """True if no token is configured or ``header`` is ``Bearer <token>``."""
    if token is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    # compare even on a wrong scheme so the timing does not depend on the header's shape
    ok = hmac.compare_digest(given.strip().encode(), token)
    return ok and scheme.lower() == "bearer"
