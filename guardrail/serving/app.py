"""The FastAPI application: routes, error bodies, auth, metrics, request logging, lifecycle.

Middleware, outermost first: :class:`RequestLog` (one log event and the request metrics per
request, 401s included), :class:`RequestGuard` (``Host`` allow-list, JSON bodies), then
:class:`BearerAuth` when an API key is set, then the routes. Every request with a body goes
through one admission path (:mod:`.admission`) from the moment its body is read until it is
queued for its model worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from guardrail import __version__
from guardrail.serving import completions
from guardrail.serving.admission import Admission, Ticket
from guardrail.serving.auth import BearerAuth
from guardrail.serving.config import ServeConfig
from guardrail.serving.errors import ApiError
from guardrail.serving.lifecycle import Drain
from guardrail.serving.metrics import CONTENT_TYPE, ServerMetrics
from guardrail.serving.pool import PolicyPool
from guardrail.serving.request_log import RequestLog
from guardrail.serving.schemas import ChatCompletionRequest, EnergiesRequest, parse_body
from guardrail.serving.trust import RequestGuard

log = structlog.get_logger("guardrail.serving")

# Bodies up to this size are parsed on the event loop (microseconds); larger ones in a thread.
PARSE_INLINE_BYTES = 64 * 1024


def create_app(pool: PolicyPool, config: ServeConfig | None = None, *,
               api_key: str | None = None) -> FastAPI:
    """An app serving ``pool``'s policies; its lifespan starts and stops the model workers.

    ``app.state.drain`` (a :class:`Drain`) is what the server calls on SIGTERM/SIGINT;
    ``api_key`` turns on bearer authentication for everything but the probes;
    ``config.allowed_hosts`` (None: no check) the ``Host`` names the app answers.
    """
    config = config or pool.config
    admission = Admission(pool)
    drain = Drain(pool, config.drain_timeout_s, admission)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.start()
        log.info("serve.started", policies=sorted(pool.policies),
                 models=[w.name for w in pool.workers])
        try:
            yield
        finally:
            log.info("serve.stopping")
            drain.begin()
            pool.stop(config.drain_timeout_s)
            drain.close()
            log.info("serve.stopped")

    app = FastAPI(title="guardrail", version=__version__, lifespan=lifespan,
                  summary="OpenAI-compatible chat completions with energy-driven steering")
    metrics = ServerMetrics(pool, admission)
    app.state.pool = pool
    app.state.config = config
    app.state.metrics = metrics
    app.state.drain = drain
    app.state.admission = admission
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(RequestGuard, allowed_hosts=config.allowed_hosts)
    app.add_middleware(RequestLog, observe=metrics.observe_request)
    _install_error_handlers(app)

    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_request_bytes:
            raise _too_large(int(declared), config)
        # Read in chunks: a chunked body without content-length must not be buffered whole.
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > config.max_request_bytes:
                    raise _too_large(size, config, at_least=True)
                chunks.append(chunk)
        except ClientDisconnect:  # the client went away mid-upload
            raise completions.ClientGone from None
        return b"".join(chunks)

    async def admitted(request: Request, model: type[Any], ticket: Ticket) -> Any:
        """The request's body read and parsed while it holds ``ticket``."""
        raw = await ticket.guard(body_of(request))
        return await ticket.guard(parsed(model, raw))

    def gone(request: Request) -> Response:
        completions.log_fields(request)["disconnected"] = True
        return Response(status_code=499)

    @app.get("/healthz", response_model=None)
    async def healthz() -> JSONResponse:
        """Queue state per model worker; 503 when a worker thread is not running."""
        health = pool.health()
        health["admission"] = admission.describe()
        for worker in health["workers"]:
            worker["admitted"] = admission.admitted(
                next(w for w in pool.workers if w.name == worker["model"]))
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

    @app.get("/readyz", response_model=None)
    async def readyz() -> JSONResponse:
        """200 when every model is loaded and its queue has room; 503 (with reasons) else."""
        reasons = pool.readiness()
        if reasons:
            return JSONResponse({"status": "not_ready", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready", "policies": sorted(pool.policies)})

    @app.get("/metrics", response_model=None)
    async def prometheus_metrics() -> Response:
        """Prometheus text format: requests, latency, tokens, queues, batches, steering."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The served policies, as OpenAI models (``id`` is the policy name)."""
        return {"object": "list", "data": [_model_card(name) for name in sorted(pool.policies)]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        """One served policy."""
        pool.get(name)
        return _model_card(name)

    def _model_card(name: str) -> dict[str, Any]:
        served = pool.policies[name]
        return {"id": name, "object": "model", "created": served.created,
                "owned_by": "guardrail", "guardrail": served.describe()}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        """Steered chat completion; ``stream: true`` answers with server-sent events."""
        fields = completions.log_fields(request)
        ticket = admission.enter()
        try:
            req: ChatCompletionRequest = await admitted(request, ChatCompletionRequest, ticket)
            fields.update(policy=req.model, stream=req.stream)
            served = pool.get(req.model)
            admission.bind(ticket, served.worker)
            job = await ticket.guard(completions.chat_job(served, req, config))
            fields.update(request_id=job.id)
            served.worker.submit(job)
            admission.leave(ticket)
            if req.stream:
                await completions.wait_started(job, request, config.request_timeout_s)
                return completions.stream(request, served, job, req, config)
            return await completions.complete(request, served, job, req, config)
        except completions.ClientGone:
            return gone(request)
        finally:
            admission.leave(ticket)

    @app.post("/v1/guardrail/energies", response_model=None)
    async def check_energies(request: Request) -> Response:
        """Energies of a conversation's prompt per rail and layer, without generating."""
        ticket = admission.enter()
        try:
            req: EnergiesRequest = await admitted(request, EnergiesRequest, ticket)
            served = pool.get(req.model)
            admission.bind(ticket, served.worker)
            result = await completions.energies(request, served, req, config,
                                                admit=ticket.guard,
                                                queued=lambda: admission.leave(ticket))
            return JSONResponse(result.model_dump(mode="json"))
        except completions.ClientGone:
            return gone(request)
        finally:
            admission.leave(ticket)

    return app


async def parsed(model: type[Any], raw: bytes) -> Any:
    """:func:`parse_body`; a large body is decoded and checked off the event loop."""
    if len(raw) < PARSE_INLINE_BYTES:
        return parse_body(model, raw)
    return await asyncio.to_thread(parse_body, model, raw)


def _too_large(size: int, config: ServeConfig, at_least: bool = False) -> ApiError:
    return ApiError(413, f"request body is {'over ' if at_least else ''}{size} bytes; this "
                    f"server accepts at most {config.max_request_bytes} (--max-request-bytes)",
                    code="request_too_large")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        completions.log_fields(request).update(error=exc.code or exc.type)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                         code="not_found" if exc.status_code == 404 else None)
        return await api_error(request, error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("serve.unhandled", path=request.url.path[:512],
                  error=f"{type(exc).__name__}: {exc}"[:1000])
        error = ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error")
        return JSONResponse(error.body(), status_code=500)
