"""Bearer-token authentication (``--api-key`` / ``GUARDRAIL_API_KEY``) as ASGI middleware.

Every path needs ``Authorization: Bearer <key>`` except the probes (``/healthz``,
``/readyz``), which orchestrators call without credentials. Keys are compared in constant
time (over their SHA-256 digests, so not even the length leaks), and a refusal is a 401 in
OpenAI's shape (``invalid_api_key``), so OpenAI clients raise ``AuthenticationError``. The
key itself is never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from guardrail.serving.errors import ApiError

ASGIApp = Any
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
ENV_VAR = "GUARDRAIL_API_KEY"


class BearerAuth:
    """Refuses requests without the right bearer token with an OpenAI-style 401."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = _bearer(scope)
        if given is not None and hmac.compare_digest(hashlib.sha256(given).digest(),
                                                     self._digest):
            await self.app(scope, receive, send)
            return
        message = ("invalid API key" if given is not None else
                   "missing API key: send `Authorization: Bearer <key>` (this server was "
                   "started with --api-key or GUARDRAIL_API_KEY)")
        error = ApiError(401, message, code="invalid_api_key")
        scope.setdefault("state", {}).setdefault("log", {})["error"] = "invalid_api_key"
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="guardrail"')]})
        await send({"type": "http.response.body", "body": body})


def _bearer(scope: dict[str, Any]) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return bytes(token.strip())
            return None
    return None
