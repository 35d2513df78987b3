"""The shared secret of the surrogate server and its clients: one reader, one check.

The token comes from a file (``--auth_token_file`` on the server,
``surrogate.auth_token_file`` in the trainer) or else from ``$SDCE_SURROGATE_TOKEN``.
Surrounding whitespace is never part of it: a file written by ``echo`` ends in a newline.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

TOKEN_ENV = "SDCE_SURROGATE_TOKEN"


def read_token(path: str | None) -> str | None:
    """The shared secret from ``path``, else from $SDCE_SURROGATE_TOKEN; None (no auth) when neither is set."""
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ValueError(f"the auth token file {path!r} does not exist")
        token = file.read_text().strip()
        if not token:
            raise ValueError(f"the auth token file {path!r} is empty; put the shared secret in it")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def bearer(token: str) -> str:
    """The value of the ``authorization`` header (HTTP) or metadata (gRPC) that carries ``token``."""
    return f"Bearer {token}"


def authorized(given: str | None, token: str) -> bool:
    """Whether ``given`` (an authorization value, or None) carries ``token``; constant time."""
    return hmac.compare_digest((given or "").encode(), bearer(token).encode())
