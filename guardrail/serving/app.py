"""The FastAPI application: routes, error bodies, request logging, worker lifecycle."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from guardrail import __version__
from guardrail.serving import completions
from guardrail.serving.config import ServeConfig
from guardrail.serving.errors import ApiError
from guardrail.serving.pool import PolicyPool
from guardrail.serving.request_log import RequestLog
from guardrail.serving.schemas import ChatCompletionRequest, EnergiesRequest, parse_body

log = structlog.get_logger("guardrail.serving")


def create_app(pool: PolicyPool, config: ServeConfig | None = None, *,
               shutdown_timeout_s: float = 10.0) -> FastAPI:
    """An app serving ``pool``'s policies; its lifespan starts and stops the model workers."""
    config = config or pool.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.start()
        log.info("serve.started", policies=sorted(pool.policies),
                 models=[w.name for w in pool.workers])
        try:
            yield
        finally:
            log.info("serve.stopping")
            pool.stop(shutdown_timeout_s)
            log.info("serve.stopped")

    app = FastAPI(title="guardrail", version=__version__, lifespan=lifespan,
                  summary="OpenAI-compatible chat completions with energy-driven steering")
    app.state.pool = pool
    app.state.config = config
    app.add_middleware(RequestLog)
    _install_error_handlers(app)

    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_request_bytes:
            raise _too_large(int(declared), config)
        raw = await request.body()
        if len(raw) > config.max_request_bytes:
            raise _too_large(len(raw), config)
        return raw

    @app.get("/healthz", response_model=None)
    async def healthz() -> JSONResponse:
        """Queue state per model worker; 503 when a worker thread is not running."""
        health = pool.health()
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

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
        req: ChatCompletionRequest = parse_body(ChatCompletionRequest, await body_of(request))
        fields = completions.log_fields(request)
        fields.update(policy=req.model, stream=req.stream)
        served = pool.get(req.model)
        job = completions.chat_job(served, req, config)
        fields.update(request_id=job.id)
        served.worker.submit(job)
        if req.stream:
            return completions.stream(request, served, job, req, config)
        try:
            return await completions.complete(request, served, job, req, config)
        except completions.ClientGone:
            fields["disconnected"] = True
            return Response(status_code=499)

    @app.post("/v1/guardrail/energies")
    async def check_energies(request: Request) -> dict[str, Any]:
        """Energies of a conversation's prompt per rail and layer, without generating."""
        req: EnergiesRequest = parse_body(EnergiesRequest, await body_of(request))
        served = pool.get(req.model)
        result = await completions.energies(request, served, req, config)
        return result.model_dump(mode="json")

    return app


def _too_large(size: int, config: ServeConfig) -> ApiError:
    return ApiError(413, f"request body is {size} bytes; this server accepts at most "
                    f"{config.max_request_bytes} (--max-request-bytes)", code="request_too_large")


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
        log.error("serve.unhandled", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
        return JSONResponse(error.body(), status_code=500)
