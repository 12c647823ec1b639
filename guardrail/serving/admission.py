"""One admission path: a request counts against the queue bound from the moment the server
starts reading its body until it is queued for its model worker (or answered).

Reading a body, parsing it and tokenising its prompt (seconds, for a megabyte prompt) happen
before a request reaches its worker's queue. Each of those requests holds a :class:`Ticket`:

- the server as a whole admits at most the sum of its workers' ``--max-queue`` requests
  (tickets plus queued jobs); once a request's policy is known, its worker admits at most its
  own ``--max-queue`` (tickets bound to it plus its queue). Past either bound: 503
  ``queue_full``, before the body is read or the prompt tokenised.
- on shutdown, :meth:`Admission.drain` refuses new tickets and wakes every request still
  holding one: it is answered 503 ``shutting_down`` at once, whatever it was waiting for
  (its tokenisation, if not started, is cancelled).

Everything here runs on the server's event loop thread (request handlers and the drain both
do), so the bookkeeping needs no lock; the workers keep their own queue under theirs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from guardrail.serving.batcher import ModelWorker
from guardrail.serving.errors import ApiError
from guardrail.serving.pool import PolicyPool

T = TypeVar("T")


def shutting_down(message: str = "the server is shutting down") -> ApiError:
    """The 503 every request refused by a drain gets."""
    return ApiError(503, message, code="shutting_down")


def queue_full(where: str, held: int, capacity: int, flag: str) -> ApiError:
    """The 503 a request past the queue bound gets."""
    return ApiError(503, f"server at capacity: {held} requests already admitted {where} "
                    f"({flag} {capacity}); retry shortly", code="queue_full",
                    headers={"retry-after": "1"})


class Ticket:
    """One admitted request, until it is queued for its worker or answered."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.worker: ModelWorker | None = None
        self.refused = asyncio.Event()

    async def guard(self, step: Awaitable[T]) -> T:
        """``step``'s result, unless the server starts draining first: then 503
        ``shutting_down`` at once (and ``step`` is cancelled)."""
        task = asyncio.ensure_future(step)
        if self.refused.is_set():
            task.cancel()
            raise shutting_down("the server is shutting down; this request was not queued yet")
        waiter = asyncio.ensure_future(self.refused.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            waiter.cancel()
            raise
        if task.done():
            waiter.cancel()
            return task.result()
        task.cancel()
        raise shutting_down("the server is shutting down; this request was not queued yet")


class Admission:
    """The server's tickets; see the module docstring."""

    def __init__(self, pool: PolicyPool) -> None:
        self.pool = pool
        self.tickets: set[Ticket] = set()
        self.draining = False

    @property
    def capacity(self) -> int:
        """Requests the server holds at most: the sum of its workers' ``--max-queue``."""
        return sum(worker.max_queue for worker in self.pool.workers)

    def enter(self) -> Ticket:
        """Admit a request before its body is read (503 when full or shutting down)."""
        if self.draining:
            raise shutting_down()
        held = len(self.tickets) + sum(worker.queued for worker in self.pool.workers)
        if held >= self.capacity:
            raise queue_full("to this server", held, self.capacity, "--max-queue per model,")
        ticket = Ticket(self)
        self.tickets.add(ticket)
        return ticket

    def bind(self, ticket: Ticket, worker: ModelWorker) -> None:
        """The request is for ``worker``'s model: hold it against that worker's bound."""
        if self.draining or worker.draining:
            raise shutting_down()
        held = worker.queued + sum(1 for t in self.tickets if t.worker is worker)
        if held >= worker.max_queue:
            raise queue_full(f"for model {worker.name!r}", held, worker.max_queue,
                             "--max-queue")
        ticket.worker = worker

    def leave(self, ticket: Ticket) -> None:
        """The request was queued for its worker, or answered: it holds no ticket now."""
        self.tickets.discard(ticket)

    def admitted(self, worker: ModelWorker | None = None) -> int:
        """Requests holding a ticket (for ``worker``, if given)."""
        return sum(1 for t in self.tickets if worker is None or t.worker is worker)

    def drain(self) -> int:
        """Refuse new requests and answer every ticket holder 503 now; returns how many."""
        self.draining = True
        for ticket in self.tickets:
            ticket.refused.set()
        return len(self.tickets)

    def describe(self) -> dict[str, Any]:
        """For ``/healthz``: tickets held in all, and the server's bound."""
        return {"admitted": len(self.tickets), "capacity": self.capacity}
