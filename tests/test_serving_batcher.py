"""The model worker: which queued requests share a batch, cancellation, failures, shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from guardrail.serving.batcher import Job, JobResult, ModelWorker
from guardrail.serving.errors import ApiError
from guardrail.steering.guard import Guardrail

from .test_serving_app import COKE, KILL, STORE, tiny_guards


@pytest.fixture
def guard(tiny_loaded, tmp_path: Path) -> Guardrail:  # type: ignore[no-untyped-def]
    return tiny_guards(tiny_loaded, tmp_path)[0]


def job(guard: Guardrail, conversation: list[dict[str, str]], *, key: Any = "greedy",
        max_batch: int = 8, max_tokens: int = 3) -> Job:
    return Job(kind="chat", policy=guard.policy.name, guard=guard, conversation=conversation,
               key=key, loop=asyncio.get_running_loop(), max_batch=max_batch,
               max_tokens=max_tokens, generation={"do_sample": False})


async def outcome(job: Job) -> JobResult | ApiError:
    while True:
        kind, payload = await asyncio.wait_for(job.events.get(), 30)
        if kind in ("done", "error"):
            return payload  # type: ignore[no-any-return]


def run(worker: ModelWorker, make_jobs: Any) -> list[JobResult | ApiError]:
    """Queue every job first, then start the worker, so batching does not depend on timing."""

    async def main() -> list[JobResult | ApiError]:
        jobs = make_jobs()
        for item in jobs:
            worker.submit(item)
        worker.start()
        try:
            return list(await asyncio.gather(*[outcome(item) for item in jobs]))
        finally:
            worker.stop()

    return asyncio.run(main())


def test_batches_respect_max_batch_and_arrival_order(guard: Guardrail) -> None:
    worker = ModelWorker("tiny", max_queue=16, batch_wait_s=0)
    results = run(worker, lambda: [job(guard, [COKE, KILL, STORE][i % 3], max_batch=2)
                                   for i in range(5)])
    assert [r.batch_size for r in results] == [2, 2, 2, 2, 1]  # type: ignore[union-attr]
    assert worker.stats.batches == 3 and worker.stats.completed == 5


def test_incompatible_requests_never_share_a_batch(guard: Guardrail) -> None:
    worker = ModelWorker("tiny", max_queue=16, batch_wait_s=0)
    keys = ["greedy", "sample-0.7", "greedy", "sample-0.7", "greedy"]
    results = run(worker, lambda: [job(guard, COKE, key=k) for k in keys])
    assert [r.batch_size for r in results] == [3, 2, 3, 2, 3]  # type: ignore[union-attr]
    # The oldest request's group goes first.
    assert results[0].queue_ms <= results[1].queue_ms  # type: ignore[union-attr]


def test_cancelled_queued_request_is_skipped(guard: Guardrail) -> None:
    worker = ModelWorker("tiny", max_queue=16, batch_wait_s=0)

    async def main() -> tuple[JobResult | ApiError, bool]:
        first, second = job(guard, COKE), job(guard, KILL)
        worker.submit(first)
        worker.submit(second)
        second.cancel("disconnected")
        worker.start()
        try:
            result = await outcome(first)
            await asyncio.sleep(0.1)
            return result, second.events.empty()
        finally:
            worker.stop()

    result, nothing_for_second = asyncio.run(main())
    assert isinstance(result, JobResult) and result.batch_size == 1
    assert nothing_for_second
    assert worker.stats.cancelled == 1 and worker.stats.completed == 1


def test_failing_batch_answers_500_and_the_worker_goes_on(guard: Guardrail, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = ModelWorker("tiny", max_queue=16, batch_wait_s=0)
    real = guard.generate_batch
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("steerer exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(guard, "generate_batch", flaky)
    results = run(worker, lambda: [job(guard, COKE, key="a"), job(guard, KILL, key="a"),
                                   job(guard, STORE, key="b")])
    first, second, third = results
    assert isinstance(first, ApiError) and first.status == 500
    assert first.code == "generation_failed" and "RuntimeError: steerer exploded" in first.message
    assert second is first
    assert isinstance(third, JobResult)
    assert worker.stats.failed == 2 and worker.stats.completed == 1


def test_full_queue_and_stopped_worker_refuse_with_503(guard: Guardrail) -> None:
    worker = ModelWorker("tiny", max_queue=1, batch_wait_s=0)

    async def main() -> tuple[ApiError, JobResult | ApiError, ApiError]:
        worker.submit(job(guard, COKE))
        with pytest.raises(ApiError) as full:
            worker.submit(job(guard, KILL))
        queued = worker._jobs[0]
        worker.stop()
        dropped = await outcome(queued)
        with pytest.raises(ApiError) as stopped:
            worker.submit(job(guard, STORE))
        return full.value, dropped, stopped.value

    full, dropped, stopped = asyncio.run(main())
    assert (full.status, full.code) == (503, "queue_full") and "--max-queue 1" in full.message
    assert isinstance(dropped, ApiError) and dropped.code == "shutting_down"
    assert (stopped.status, stopped.code) == (503, "shutting_down")
