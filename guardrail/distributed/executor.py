"""The executor interface: map a picklable per-shard job over prompt shards.

A :class:`ShardWork` says how a worker builds its model replica (:meth:`ShardWork.load`,
from the policy, never a pickled model) and what it does with one shard
(:meth:`ShardWork.run`). An :class:`Executor` runs it over every shard and hands each
result to the caller's ``on_result(index, result)`` as it arrives, in the driver process;
the caller writes it to its cache there, keyed per prompt, so a result written twice is
the same entry and a shard never finished is generated again on the next run.

The executor a command runs under is set with :func:`using` (``guardrail train``,
``calibrate`` and ``eval`` do this from their ``--executor`` options) and read with
:func:`current`, so the training and evaluation loops need no new arguments. The default is
the :class:`LocalExecutor`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

ShardT = TypeVar("ShardT")
ResultT = TypeVar("ResultT")


class ShardWork(Generic[ShardT, ResultT]):
    """Per-shard work, sent to workers by pickling: hold the policy and settings, not models."""

    def replica_key(self) -> str:
        """Which model replica :meth:`load` builds; a worker builds each key once and reuses it."""
        raise NotImplementedError

    def load(self, device: str | None) -> Any:
        """Build the replica on the worker (``device``: where the worker's resources are)."""
        raise NotImplementedError

    def run(self, replica: Any, shard: ShardT) -> ResultT:
        """Process one shard with the replica :meth:`load` built."""
        raise NotImplementedError


class Executor:
    """Maps :class:`ShardWork` over shards; see the module docstring."""

    kind = "local"
    #: How many shards run at once (what a caller may size its shards by).
    workers = 1

    def map(
        self,
        work: ShardWork[ShardT, ResultT],
        shards: Sequence[ShardT],
        on_result: Callable[[int, ResultT], None],
        *,
        replica: Any = None,
    ) -> None:
        """Run ``work`` on every shard; ``on_result(index, result)`` in this process for each.

        ``replica``: a replica this process already holds, which a local executor uses
        instead of building one (a remote executor ignores it).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (idempotent)."""


class LocalExecutor(Executor):
    """Every shard in this process, in order, on the caller's replica (or one it builds)."""

    def map(
        self,
        work: ShardWork[ShardT, ResultT],
        shards: Sequence[ShardT],
        on_result: Callable[[int, ResultT], None],
        *,
        replica: Any = None,
    ) -> None:
        """See :meth:`Executor.map`."""
        if not shards:
            return
        if replica is None:
            replica = work.load(None)
        for index, shard in enumerate(shards):
            on_result(index, work.run(replica, shard))




_active = threading.local()


def current() -> Executor:
    """The executor set by the innermost :func:`using` in this thread (default: local)."""
    stack: list[Executor] = getattr(_active, "stack", [])
    return stack[-1] if stack else LocalExecutor()


@contextmanager
def using(executor: Executor) -> Iterator[Executor]:
    """Make ``executor`` :func:`current` in this thread for the block; it is closed after."""
    stack: list[Executor] = getattr(_active, "stack", [])
    _active.stack = stack
    stack.append(executor)
    try:
        yield executor
    finally:
        stack.pop()
        executor.close()


def shards_of(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` in consecutive chunks of ``size`` (the last may be shorter)."""
    return [list(items[i : i + size]) for i in range(0, len(items), max(size, 1))]
