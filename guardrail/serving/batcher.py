"""The bounded request queue and the one worker thread per loaded model.

Steering hooks are installed on the model for the length of a ``generate`` call, so two
calls on one model at the same time would steer each other. All model work for a loaded
model therefore runs on one thread. It takes the oldest waiting request and every other
waiting request it can share a forward pass with (same policy, same steering switch, same
sampling settings; ``max_tokens`` and ``stop`` may differ, they are per row), up to the
batch limit, and runs them as one :meth:`Guardrail.generate_batch`.

Shutting down is two steps. :meth:`ModelWorker.drain` refuses new work and answers every
queued request 503 ``shutting_down`` at once, while the running batch goes on;
:meth:`ModelWorker.cancel_running` (at the drain deadline) ends the running rows at their
next decoding step, and those requests are answered 503 as well. Nobody is left without an
answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from transformers import StoppingCriteriaList

from guardrail.serving.errors import ApiError
from guardrail.serving.streaming import BatchRows, RowText
from guardrail.steering.generation import eos_ids
from guardrail.steering.guard import Guardrail
from guardrail.telemetry import GenerationTelemetry

log = structlog.get_logger("guardrail.serving")

JobKind = Literal["chat", "energies"]


@dataclass
class JobResult:
    """What the worker hands back for one request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    telemetry: GenerationTelemetry
    queue_ms: float
    generate_ms: float
    batch_size: int
    #: From queueing to the batch's first generated token (None: nothing was generated).
    first_token_ms: float | None = None


@dataclass(eq=False)
class Job:
    """One queued request and the asyncio queue its events go to (``started``, ``delta``,
    ``done``, ``error``).

    ``key`` says which jobs may share a batch; the worker only reads the other fields.
    """

    kind: JobKind
    policy: str
    guard: Guardrail
    conversation: list[dict[str, str]]
    key: Hashable
    loop: asyncio.AbstractEventLoop
    max_batch: int = 1
    max_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    steer: bool = True
    generation: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    enqueued: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancel_reason: str | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self, reason: str) -> None:
        """Stop this request: skipped if still queued, its row ended if running."""
        if not self._cancelled.is_set():
            self.cancel_reason = reason
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called (safe from any thread)."""
        return self._cancelled.is_set()

    def emit(self, kind: str, payload: Any) -> None:
        """Put an event on the request's asyncio queue from the worker thread."""
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


@dataclass
class WorkerStats:
    """Counters ``/healthz`` reports per worker."""

    batches: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens_generated: int = 0
    largest_batch: int = 0
    running: int = 0


class ModelWorker:
    """One thread, one bounded queue, for every policy that shares one loaded model."""

    def __init__(self, name: str, *, max_queue: int, batch_wait_s: float) -> None:
        self.name = name
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.policies: list[str] = []
        self.stats = WorkerStats()
        #: Called with each batch's size (the server's metrics set it).
        self.observe_batch: Callable[[int], None] | None = None
        self._jobs: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"guardrail-worker-{self.name}",
                                            daemon=True)
            self._thread.start()

    def drain(self) -> int:
        """Refuse new work and answer queued requests 503; the running batch goes on.

        Returns how many queued requests were answered.
        """
        with self._cond:
            self._draining = True
            queued, self._jobs = list(self._jobs), deque()
            self._cond.notify_all()
        for job in queued:
            job.emit("error", _shutting_down("the server is shutting down; this request was "
                                             "still queued"))
        return len(queued)

    def cancel_running(self) -> int:
        """End the running rows at their next step (answered 503); returns how many."""
        with self._cond:
            running = list(self._running)
        for job in running:
            job.cancel("shutdown")
        return len(running)

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` or :meth:`stop` was called."""
        return self._draining or self._stopping

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new work, fail queued requests with 503, end running rows, join the thread."""
        with self._cond:
            self._stopping = True
            queued, self._jobs = list(self._jobs), deque()
            for job in self._running:
                job.cancel("shutdown")
            self._cond.notify_all()
        for job in queued:
            job.emit("error", _shutting_down("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            log.info("serve.worker_stopped", model=self.name, alive=self._thread.is_alive(),
                     dropped=len(queued))

    # --- queue --------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job; a full queue or a stopping worker answers 503 right away."""
        with self._cond:
            if self._stopping or self._draining:
                raise _shutting_down("the server is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise ApiError(
                    503, f"server at capacity: {len(self._jobs)} requests already queued for "
                    f"model {self.name!r} (--max-queue {self.max_queue}); retry shortly",
                    code="queue_full", headers={"retry-after": "1"},
                )
            self._jobs.append(job)
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        """Requests waiting (not yet in a batch)."""
        return len(self._jobs)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> dict[str, Any]:
        """Queue depth, rows running and counters."""
        return {"model": self.name, "policies": self.policies, "queued": self.queued,
                "max_queue": self.max_queue, **self.stats.__dict__, "alive": self.alive,
                "draining": self.draining}

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                self._drop_cancelled()
                if not self._jobs:
                    continue
                first = self._jobs[0]
                # Wait briefly for company: requests sent together then share a forward pass.
                deadline = time.monotonic() + self.batch_wait_s
                while (not self._stopping and self._compatible(first) < first.max_batch
                       and (left := deadline - time.monotonic()) > 0):
                    self._cond.wait(left)
                self._drop_cancelled()
                if first.cancelled or self._stopping:
                    continue
                batch: list[Job] = []
                rest: deque[Job] = deque()
                for job in self._jobs:
                    if job.key == first.key and len(batch) < first.max_batch:
                        batch.append(job)
                    else:
                        rest.append(job)
                self._jobs = rest
                self._running = batch
                return batch

    def _compatible(self, first: Job) -> int:
        return sum(1 for job in self._jobs if job.key == first.key)

    def _drop_cancelled(self) -> None:
        gone = [job for job in self._jobs if job.cancelled]
        if gone:
            self._jobs = deque(job for job in self._jobs if not job.cancelled)
            self.stats.cancelled += len(gone)

    # --- work ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._execute(batch)
            with self._cond:
                self._running = []

    def _execute(self, batch: list[Job]) -> None:
        started = time.perf_counter()
        self.stats.running = len(batch)
        if self.observe_batch is not None:
            self.observe_batch(len(batch))
        for job in batch:
            job.emit("started", None)
        first_token: list[float] = []
        try:
            outputs = (self._chat(batch, first_token) if batch[0].kind == "chat"
                       else self._energies(batch))
        except Exception as exc:
            log.error("serve.batch_failed", model=self.name, policy=batch[0].policy,
                      size=len(batch), error=f"{type(exc).__name__}: {exc}")
            error = ApiError(500, f"generation failed: {type(exc).__name__}: {exc}",
                             code="generation_failed")
            self.stats.failed += len(batch)
            for job in batch:
                job.emit("error", error)
            return
        finally:
            self.stats.running = 0
        generate_ms = (time.perf_counter() - started) * 1000
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for job, (text, ids, finish, telemetry) in zip(batch, outputs, strict=True):
            self.stats.tokens_generated += len(ids)
            if finish == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.completed += 1
            if finish == "cancelled" and job.cancel_reason == "shutdown":
                job.emit("error", _shutting_down(
                    f"the server shut down before this request finished ({len(ids)} tokens "
                    "generated; the drain timeout ran out)"))
                continue
            job.emit("done", JobResult(
                text=text, token_ids=ids, finish_reason=finish, telemetry=telemetry,
                queue_ms=(started - job.enqueued) * 1000, generate_ms=generate_ms,
                batch_size=len(batch),
                first_token_ms=((first_token[0] - job.enqueued) * 1000 if first_token else None),
            ))

    def _chat(self, batch: list[Job], first_token: list[float]
              ) -> list[tuple[str, list[int], str, GenerationTelemetry]]:
        guard = batch[0].guard
        rows = [
            RowText(guard.tokenizer, max_tokens=job.max_tokens, stop=job.stop,
                    sink=_delta_sink(job) if job.stream else None,
                    cancelled=lambda job=job: job.cancelled)  # type: ignore[misc]
            for job in batch
        ]
        stopper = BatchRows(rows, eos_ids(guard.model, guard.tokenizer))
        results = guard.generate_batch(
            [job.conversation for job in batch], steer=batch[0].steer,
            stopping_criteria=StoppingCriteriaList([stopper]),
            max_new_tokens=max(job.max_tokens for job in batch), **batch[0].generation,
        )
        stopper.close()
        if stopper.first_step_at is not None:
            first_token.append(stopper.first_step_at)
        outputs = []
        for row, result in zip(rows, results, strict=True):
            # Rows ended by the criterion are padded afterwards; the row's own record is exact.
            result.telemetry.completion_tokens = len(row.ids)
            outputs.append((row.text, row.ids, row.finish_reason or "length", result.telemetry))
        return outputs

    def _energies(self, batch: list[Job]) -> list[tuple[str, list[int], str, GenerationTelemetry]]:
        guard = batch[0].guard
        rows = guard.energies([job.conversation for job in batch], batch_size=len(batch))
        return [("", [], "stop", telemetry) for telemetry in rows]


def _shutting_down(message: str) -> ApiError:
    return ApiError(503, message, code="shutting_down")


def _delta_sink(job: Job) -> Any:
    def sink(text: str) -> None:
        job.emit("delta", text)

    return sink

