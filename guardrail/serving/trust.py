"""Trust boundaries of the HTTP server, checked before anything else runs: which ``Host`` a
request may name, and that request bodies are JSON.

A server on 127.0.0.1 without ``--api-key`` is still reachable from a browser on the same
machine: a web page can send it "simple" cross-site requests (``text/plain`` bodies need no
CORS preflight), and a DNS-rebinding page can make the browser send anything with its own
domain in ``Host``. So:

- ``Host`` must be one of the allowed names (default: the bound address and the localhost
  names; ``guardrail serve --allowed-host NAME`` adds one, ``'*'`` allows any), else 400
  ``host_not_allowed``. The probes (``/healthz``, ``/readyz``) are exempt: orchestrators
  call them by address, and they reveal nothing.
- a request with a body (``POST``, ``PUT``, ``PATCH``) must be ``application/json`` (UTF-8,
  the only charset JSON has), else 415 ``unsupported_media_type``: browsers cannot send that
  cross-site without a preflight this server never answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from guardrail.serving.errors import ApiError

ASGIApp = Any
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def default_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The names a server bound to ``bound`` answers: the localhost names, ``bound`` itself
    (unless it is a wildcard address) and ``extra``."""
    names = {*LOCAL_HOSTS, *(normalise(h) for h in extra)}
    if bound not in WILDCARD_BINDS:
        names.add(normalise(bound))
    return frozenset(names)


def normalise(host: str) -> str:
    """A host name as compared: lower case, no port, no IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        return name
    return host


class RequestGuard:
    """Refuses foreign ``Host`` headers and non-JSON bodies (see the module docstring).

    ``allowed_hosts`` of None checks no ``Host`` (an app embedded in another server, or a
    test client); ``guardrail serve`` always passes a set.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str] | None) -> None:
        self.app = app
        self.allowed = allowed_hosts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        error = self._host_problem(scope, headers) or self._body_problem(scope, headers)
        if error is None:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {}).setdefault("log", {})["error"] = error.code
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def _host_problem(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> ApiError | None:
        if self.allowed is None or "*" in self.allowed or scope["path"] in OPEN_PATHS:
            return None
        raw = headers.get(b"host")
        host = normalise(raw.decode("latin-1")) if raw is not None else None
        if host is not None and host in self.allowed:
            return None
        shown = "no Host header" if raw is None else f"Host {raw.decode('latin-1')[:100]!r}"
        return ApiError(400, f"{shown} is not a name this server answers to (allowed: "
                        f"{', '.join(sorted(self.allowed))}; add one with --allowed-host)",
                        code="host_not_allowed")

    @staticmethod
    def _body_problem(scope: dict[str, Any], headers: dict[bytes, bytes]) -> ApiError | None:
        if scope["method"] not in BODY_METHODS:
            return None
        raw = headers.get(b"content-type", b"").decode("latin-1")
        kind, _, params = raw.partition(";")
        charset = next((v.strip().strip('"').lower() for k, _, v in
                        (p.partition("=") for p in params.split(";"))
                        if k.strip().lower() == "charset"), "utf-8")
        if kind.strip().lower() == "application/json" and charset in ("utf-8", "utf8"):
            return None
        shown = f"{raw[:100]!r}" if raw else "none"
        return ApiError(415, f"content-type {shown}: request bodies must be JSON, sent as "
                        "'application/json' (UTF-8)", code="unsupported_media_type")
