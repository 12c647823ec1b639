"""Running the per-prompt work of ``train``, ``calibrate`` and ``eval`` on an executor.

One small interface (:class:`~guardrail.distributed.executor.Executor`) maps a picklable
per-shard job (:class:`~guardrail.distributed.executor.ShardWork`) over prompt shards: the
``local`` executor runs it in this process on the model already loaded, the ``ray`` executor
on Ray actors that each build one model replica from the policy. Results come back to the
driver, which writes them into the same content-addressed caches either way, one shard at a
time, so an interrupted or mixed run resumes from what is cached.

Nothing here imports Ray until a ``ray`` executor is opened (:mod:`.ray_actors`).
"""

from __future__ import annotations

from guardrail.distributed.executor import Executor, LocalExecutor
from guardrail.policy.executor import ExecutorSettings

__all__ = ["open_executor"]


def open_executor(settings: ExecutorSettings | None = None) -> Executor:
    """The executor ``settings`` describe; a ``ray`` one imports Ray here, and says how to
    install it when it is missing."""
    settings = settings or ExecutorSettings()
    if settings.kind == "local":
        return LocalExecutor()
    from guardrail.distributed.ray_actors import RayExecutor

    return RayExecutor(settings)
