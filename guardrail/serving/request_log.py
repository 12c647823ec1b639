"""One structlog event per HTTP request, written when its response has fully gone out.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``) so a streamed response is
logged when its last event was sent or its client went away, not when streaming starts.
Handlers add fields by updating the ``request.state.log`` mapping. When given ``observe``
(the server's metrics), it is called once per request with its path, method, status and
seconds, just before the response's last byte is sent.

The method and path a client sent are logged cut to :data:`LOGGED_CHARS` (escaping control
characters is the log renderer's job). A handler uvicorn cancels at shutdown before it sent
anything is answered here, 503 ``shutting_down`` in OpenAI's shape, rather than left to
uvicorn's plain-text 500.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import structlog

from guardrail.serving.errors import ApiError

log = structlog.get_logger("guardrail.serving")

ASGIApp = Any
LOGGED_CHARS = 512


class RequestLog:
    """Logs ``serve.request`` with method, path, status, milliseconds and the handler's fields."""

    def __init__(self, app: ASGIApp,
                 observe: Callable[[str, str, int, float], None] | None = None) -> None:
        self.app = app
        self.observe = observe

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        fields: dict[str, Any] = {}
        state["log"] = fields
        status: dict[str, int] = {}
        observed = False

        def observe(code: int) -> None:
            nonlocal observed
            if self.observe is not None and not observed:
                observed = True
                self.observe(scope["path"], scope["method"], code, time.perf_counter() - started)

        async def send_and_watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                observe(status.get("code", 500))
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except asyncio.CancelledError:
            if "code" in status:
                raise
            # uvicorn's graceful shutdown timed out on this request before it was answered.
            fields["error"] = "shutting_down"
            await _answer_shutting_down(send_and_watch)
        except BaseException:
            fields.setdefault("error", "unhandled exception")
            status.setdefault("code", 500)
            raise
        finally:
            fields = state.get("log", fields)
            code = status.get("code", 499)  # no response started: the client left first
            observe(code)
            level = log.warning if code >= 500 else log.info
            level("serve.request", method=str(scope["method"])[:32],
                  path=str(scope["path"])[:LOGGED_CHARS], status=code,
                  ms=round((time.perf_counter() - started) * 1000, 1), **fields)


async def _answer_shutting_down(send: Any) -> None:
    error = ApiError(503, "the server shut down before this request was answered",
                     code="shutting_down")
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
