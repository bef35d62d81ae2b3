"""Bearer-token auth (RFC 6750): one shared token from a file or the environment, checked by
one FastAPI security dependency in constant time. No token configured means no auth (the
default for loopback development)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.security import HTTPBearer

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


class BearerToken(HTTPBearer):
    """FastAPI dependency (``Depends(BearerToken(token))``): 401 with ``WWW-Authenticate:
    Bearer`` unless the request carries ``Authorization: Bearer <token>``; a no-op without a
    token. Shown in the OpenAPI schema as an HTTP bearer security scheme."""

    def __init__(self, token: bytes | None) -> None:
        super().__init__(description=f"the server's token (${TOKEN_ENV} or token_file)")
        self.token = token

    def make_not_authenticated_error(self) -> HTTPException:
        return HTTPException(401, "missing or wrong bearer token (Authorization: Bearer "
                                  "<token>)", headers=self.make_authenticate_headers())

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        if self.token is None:
            return
        credentials = await super().__call__(request)  # no header or another scheme: 401
        assert credentials is not None
        if not hmac.compare_digest(credentials.credentials.encode(), self.token):
            raise self.make_not_authenticated_error()
