"""Chat completions and energy checks: request -> queued job -> JSON or server-sent events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from guardrail.errors import GuardrailError
from guardrail.serving.batcher import Job, JobResult
from guardrail.serving.config import ServeConfig
from guardrail.serving.errors import ApiError
from guardrail.serving.pool import ServedPolicy
from guardrail.serving.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    EnergiesRequest,
    EnergiesResponse,
    GateDecision,
    GuardrailExtension,
    LayerEnergy,
    PromptEnergy,
    Timing,
    Usage,
    VerdictBody,
)
from guardrail.serving.streaming import sse

if TYPE_CHECKING:
    from guardrail.telemetry import GenerationTelemetry

log = structlog.get_logger("guardrail.serving")

# How often a waiting non-streamed request checks whether its client is still there.
DISCONNECT_POLL_S = 0.5


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def log_fields(request: Request) -> dict[str, Any]:
    """The fields of this request's ``serve.request`` event (see :mod:`request_log`)."""
    state = request.scope.setdefault("state", {})
    fields: dict[str, Any] = state.setdefault("log", {})
    return fields


# --- building a job -------------------------------------------------------------------------
def sampling(req: ChatCompletionRequest, served: ServedPolicy) -> dict[str, Any]:
    """Generation overrides: temperature 0 is greedy, > 0 samples; omitted uses the policy's."""
    defaults = served.guard.policy.generation
    if req.temperature is None:
        do_sample, temperature = defaults.do_sample, defaults.temperature
    else:
        do_sample, temperature = req.temperature > 0, req.temperature
    if not do_sample:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature,
            "top_p": req.top_p if req.top_p is not None else defaults.top_p, "seed": req.seed}


async def check_prompt(served: ServedPolicy, conversation: list[dict[str, str]], *, steer: bool,
                       max_tokens: int, config: ServeConfig) -> int:
    """Count prompt tokens (off the event loop); over the server's or the model's limit: 400."""
    tokens = await served.count_prompt_tokens(conversation, steer=steer)
    if tokens > config.max_prompt_tokens:
        raise ApiError(400, f"the prompt is {tokens} tokens; this server accepts at most "
                       f"{config.max_prompt_tokens} (--max-prompt-tokens)",
                       param="messages", code="context_length_exceeded")
    window = getattr(served.guard.model.config, "max_position_embeddings", None)
    if isinstance(window, int) and tokens + max_tokens > window:
        raise ApiError(400, f"the prompt ({tokens} tokens) plus max_tokens ({max_tokens}) exceeds "
                       f"the model's context window of {window} tokens",
                       param="messages", code="context_length_exceeded")
    return tokens


async def chat_job(served: ServedPolicy, req: ChatCompletionRequest, config: ServeConfig
                   ) -> Job:
    """Validate what the schema cannot (server limits, unsupported options) and build the job."""
    unsupported = req.unsupported()
    if unsupported is not None:
        raise ApiError(400, unsupported[1], param=unsupported[0], code="unsupported_value")
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = (req.max_completion_tokens or req.max_tokens
                  or served.guard.policy.generation.max_new_tokens)
    if max_tokens > config.max_tokens_limit:
        raise ApiError(400, f"{param}: got {max_tokens}; this server allows at most "
                       f"{config.max_tokens_limit} (--max-tokens-limit)", param=param,
                       code="invalid_value")
    stop = req.stop_sequences()
    if len(stop) > config.max_stop_sequences:
        raise ApiError(400, f"stop: got {len(stop)} sequences; at most "
                       f"{config.max_stop_sequences} are allowed", param="stop",
                       code="invalid_value")
    conversation = req.conversation()
    steer = req.guardrail.steer
    await check_prompt(served, conversation, steer=steer, max_tokens=max_tokens, config=config)
    generation = sampling(req, served)
    strength = req.guardrail.strength
    if steer and strength is not None and strength != 1:
        try:
            served.guard.rails_at(strength)
        except GuardrailError as exc:
            raise ApiError(400, str(exc).replace("strength:", "guardrail.strength:", 1),
                           param="guardrail.strength", code="invalid_value") from None
        generation["strength"] = strength  # and a batch holds one strength only
    key: tuple[Any, ...] = ("chat", served.name, steer, tuple(sorted(generation.items())))
    job = Job(kind="chat", policy=served.name, guard=served.guard, conversation=conversation,
              key=key, loop=asyncio.get_running_loop(), max_batch=served.max_batch,
              max_tokens=max_tokens, stop=stop, steer=steer, generation=generation,
              stream=req.stream)
    if generation.get("seed") is not None:
        # A seeded sampled request runs alone, so the same seed gives the same answer.
        job.key = (*key, job.id)
    return job


def _metrics(request: Request) -> Any:
    return request.app.state.metrics


# --- waiting --------------------------------------------------------------------------------
async def wait_started(job: Job, request: Request, timeout_s: float) -> None:
    """Until the worker takes the job into a batch (a stream's headers wait for this, so a
    request refused while queued, at shutdown say, gets a real 503 rather than an event)."""
    await wait_done(job, request, timeout_s, until="started")


async def wait_done(job: Job, request: Request, timeout_s: float, until: str = "done") -> Any:
    """The job's result; cancels it on timeout (504) or when the client goes away.

    With ``until="started"``, returns when the job joins a running batch instead.
    """
    deadline = job.enqueued + timeout_s
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            job.cancel("timeout")
            raise ApiError(504, f"the request did not finish within {timeout_s:g} s "
                           f"(--request-timeout)", code="timeout")
        try:
            kind, payload = await asyncio.wait_for(job.events.get(),
                                                   min(remaining, DISCONNECT_POLL_S))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel("disconnected")
                raise ClientGone from None
            continue
        if kind == until:
            return payload
        if kind == "error":
            raise payload


async def classify(served: ServedPolicy, req: ChatCompletionRequest, text: str
                   ) -> tuple[VerdictBody | None, str | None, float]:
    """The policy's refusal verdict on ``text``, off the event loop; errors are returned."""
    if not req.guardrail.classify:
        return None, None, 0.0
    users = [m.content for m in req.messages if m.role == "user"]
    started = time.perf_counter()
    try:
        verdict = (await asyncio.to_thread(served.guard.classify, [users[-1] if users else ""],
                                           [text]))[0]
    except Exception as exc:
        log.warning("serve.classify_failed", policy=served.name, error=str(exc))
        return None, str(exc), (time.perf_counter() - started) * 1000
    body = VerdictBody(refused=verdict.refused, score=verdict.score, reason=verdict.reason)
    return body, None, (time.perf_counter() - started) * 1000


def extension(served: ServedPolicy, result: JobResult, verdict: VerdictBody | None,
              verdict_error: str | None, classify_ms: float, total_ms: float) -> GuardrailExtension:
    """The ``guardrail`` field: energies per rail and layer, layers steered, verdict, timing."""
    telemetry = result.telemetry
    energies = [LayerEnergy(**{name: getattr(item, name) for name in LayerEnergy.model_fields})
                for item in telemetry.layers]
    return GuardrailExtension(
        policy=served.name, model=served.guard.loaded.name, steered=telemetry.steered,
        strength=telemetry.strength, gates=gate_decisions(telemetry),
        layers_steered=sorted({item.layer for item in telemetry.layers if item.steered_positions}),
        layers_skipped=sorted({item.layer for item in telemetry.layers
                               if item.nonfinite_positions}),
        layers_disabled=sorted({layer for rail in served.guard.rails for layer in rail.disabled}
                               if telemetry.steered else set()),
        energies=energies, verdict=verdict, verdict_error=verdict_error,
        timing=Timing(queue_ms=round(result.queue_ms, 1), generate_ms=round(result.generate_ms, 1),
                      classify_ms=round(classify_ms, 1), total_ms=round(total_ms, 1),
                      batch_size=result.batch_size),
    )


def gate_decisions(telemetry: GenerationTelemetry) -> list[GateDecision]:
    """The gated rails' decisions in a request's telemetry."""
    return [GateDecision(rail=g.rail, score=g.score, side=g.side, steered=g.steered,
                         below=g.below, above=g.above) for g in telemetry.gates]


def gate_headers(ext: GuardrailExtension) -> dict[str, str]:
    """``x-guardrail-steered`` and, with a gated rail, ``x-guardrail-gate``: one
    ``RAIL;score=S;side=SIDE`` entry per gated rail (side ``none``: left alone)."""
    headers = {"x-guardrail-steered": "true" if ext.steered else "false"}
    if ext.gates:
        headers["x-guardrail-gate"] = ", ".join(
            f"{g.rail};score={g.score:.4f};side={g.side or 'none'}" for g in ext.gates)
    if ext.strength is not None:
        headers["x-guardrail-strength"] = f"{ext.strength:g}"
    return headers


def _summary(ext: GuardrailExtension, result: JobResult) -> dict[str, Any]:
    before = [e.energy_before for e in ext.energies if e.energy_before is not None]
    after = [e.energy_after for e in ext.energies if e.energy_after is not None]
    return {
        "prompt_tokens": result.telemetry.prompt_tokens,
        "completion_tokens": len(result.token_ids), "finish_reason": result.finish_reason,
        "batch_size": result.batch_size, "queue_ms": ext.timing.queue_ms,
        "generate_ms": ext.timing.generate_ms, "steered": ext.steered,
        **({"gates": {g.rail: {"score": g.score, "side": g.side} for g in ext.gates}}
           if ext.gates else {}),
        **({"strength": ext.strength} if ext.strength is not None else {}),
        "layers_steered": ext.layers_steered,
        **({"layers_skipped": ext.layers_skipped} if ext.layers_skipped else {}),
        "energy_before": round(sum(before) / len(before), 4) if before else None,
        "energy_after": round(sum(after) / len(after), 4) if after else None,
        "refused": ext.verdict.refused if ext.verdict else None,
    }


def _usage(result: JobResult) -> Usage:
    prompt = result.telemetry.prompt_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=len(result.token_ids),
                 total_tokens=prompt + len(result.token_ids))


# --- responses ------------------------------------------------------------------------------
async def complete(request: Request, served: ServedPolicy, job: Job, req: ChatCompletionRequest,
                   config: ServeConfig) -> JSONResponse:
    """A non-streamed completion with timing headers."""
    result = await wait_done(job, request, config.request_timeout_s)
    verdict, verdict_error, classify_ms = await classify(served, req, result.text)
    total_ms = (time.perf_counter() - job.enqueued) * 1000
    ext = extension(served, result, verdict, verdict_error, classify_ms, total_ms)
    _metrics(request).observe_completion(served.name, result, ext)
    body = ChatCompletion(
        id=job.id, created=int(time.time()), model=served.name,
        choices=[Choice(message=AssistantMessage(content=result.text),
                        finish_reason=result.finish_reason)],
        usage=_usage(result), guardrail=ext,
    )
    log_fields(request).update(_summary(ext, result))
    headers = {
        "x-request-id": job.id,
        "openai-processing-ms": f"{total_ms:.0f}",
        "x-guardrail-queue-ms": f"{ext.timing.queue_ms:.1f}",
        "x-guardrail-generate-ms": f"{ext.timing.generate_ms:.1f}",
        "x-guardrail-classify-ms": f"{ext.timing.classify_ms:.1f}",
        "x-guardrail-total-ms": f"{ext.timing.total_ms:.1f}",
        "x-guardrail-batch-size": str(result.batch_size),
        **gate_headers(ext),
    }
    return JSONResponse(body.model_dump(mode="json"), headers=headers)


def stream(request: Request, served: ServedPolicy, job: Job, req: ChatCompletionRequest,
           config: ServeConfig) -> StreamingResponse:
    """Server-sent events: a role chunk, one chunk per text delta, a last chunk with
    ``finish_reason`` and ``guardrail``, a usage chunk if asked, then ``[DONE]``.

    A client that disconnects cancels the job, which ends its row in the running batch.
    """
    fields = log_fields(request)
    created = int(time.time())

    def chunk(delta: Delta, finish: str | None = None, **extra: Any) -> bytes:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        body = ChatCompletionChunk(id=job.id, created=created, model=served.name,
                                   choices=[choice], **extra)
        data = body.model_dump(mode="json", exclude_none=True)
        if body.guardrail is not None:  # whole, as non-streamed: a null there says something
            data["guardrail"] = body.guardrail.model_dump(mode="json")
        return sse(data)

    async def events() -> AsyncIterator[bytes]:
        finished = False
        try:
            yield chunk(Delta(role="assistant", content=""))
            deadline = job.enqueued + config.request_timeout_s
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    job.cancel("timeout")
                    error = ApiError(504, f"the request did not finish within "
                                     f"{config.request_timeout_s:g} s (--request-timeout)",
                                     code="timeout")
                    fields["error"] = error.code
                    yield sse(error.body())
                    break
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), remaining)
                except asyncio.TimeoutError:
                    continue
                if kind == "started":
                    continue
                if kind == "delta":
                    yield chunk(Delta(content=payload))
                elif kind == "error":
                    fields["error"] = payload.code
                    yield sse(payload.body())
                    break
                else:
                    result: JobResult = payload
                    verdict, verdict_error, classify_ms = await classify(served, req, result.text)
                    total_ms = (time.perf_counter() - job.enqueued) * 1000
                    ext = extension(served, result, verdict, verdict_error, classify_ms, total_ms)
                    _metrics(request).observe_completion(served.name, result, ext)
                    fields.update(_summary(ext, result))
                    yield chunk(Delta(), result.finish_reason, guardrail=ext)
                    if req.stream_options is not None and req.stream_options.include_usage:
                        usage = ChatCompletionChunk(id=job.id, created=created, model=served.name,
                                                    choices=[], usage=_usage(result))
                        yield sse(usage.model_dump(mode="json", exclude_none=True))
                    break
            yield sse("[DONE]")
            finished = True
        finally:
            if not finished:
                job.cancel("disconnected")
                fields["disconnected"] = True

    fields.update(request_id=job.id, policy=served.name, stream=True)
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"x-request-id": job.id, "cache-control": "no-cache"})


async def energies(request: Request, served: ServedPolicy, req: EnergiesRequest,
                   config: ServeConfig, *,
                   admit: Callable[[Awaitable[int]], Awaitable[int]] | None = None,
                   queued: Callable[[], object] | None = None) -> EnergiesResponse:
    """Energies at the prompt's last token per rail and layer; nothing is generated.

    ``admit`` wraps the tokenisation (the server's admission, see :mod:`.admission`);
    ``queued`` is called once the job is in the worker's queue."""
    conversation = req.conversation()
    counting = check_prompt(served, conversation, steer=True, max_tokens=0, config=config)
    tokens = await (admit(counting) if admit is not None else counting)
    job = Job(kind="energies", policy=served.name, guard=served.guard, conversation=conversation,
              key=("energies", served.name), loop=asyncio.get_running_loop(),
              max_batch=served.max_batch)
    fields = log_fields(request)
    fields.update(request_id=job.id, policy=served.name, prompt_tokens=tokens)
    served.worker.submit(job)
    if queued is not None:
        queued()
    result = await wait_done(job, request, config.request_timeout_s)
    thresholds = {(rail.name, layer): getattr(model, "threshold", None)
                  for rail in served.guard.rails for layer, model in rail.energies.items()}
    total_ms = (time.perf_counter() - job.enqueued) * 1000
    fields.update(batch_size=result.batch_size, queue_ms=round(result.queue_ms, 1))
    return EnergiesResponse(
        model=served.name, prompt_tokens=tokens,
        energies=[PromptEnergy(rail=item.rail, layer=item.layer, energy=item.energy_before,
                               threshold=thresholds.get((item.rail, item.layer)))
                  for item in result.telemetry.layers],
        gates=gate_decisions(result.telemetry),
        timing=Timing(queue_ms=round(result.queue_ms, 1), generate_ms=round(result.generate_ms, 1),
                      classify_ms=0.0, total_ms=round(total_ms, 1), batch_size=result.batch_size),
    )
