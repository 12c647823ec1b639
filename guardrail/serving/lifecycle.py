"""Shutting down without leaving a request unanswered: the drain, and the uvicorn server.

On SIGTERM or SIGINT uvicorn stops accepting connections and waits for the open ones. By
itself it would let queued requests wait until its graceful timeout and then cancel every
handler, so clients would get no response at all. :class:`DrainingServer` starts the
:class:`Drain` first, the moment shutdown begins:

1. requests not queued yet (their body being read or parsed, their prompt tokenised; see
   :mod:`.admission`) are answered 503 ``shutting_down`` at once; the model workers refuse
   new requests and answer every queued request 503 at once;
2. running batches go on for up to the drain timeout;
3. at the deadline, rows still running end at their next decoding step and are answered
   503 too (a stream gets the error event, then ``[DONE]``);
4. uvicorn's own graceful timeout is the drain timeout plus :data:`GRACE_S`, room for those
   last answers to be written, after which the lifespan stops the workers. A handler still
   running then (a slow classifier, a client uploading forever) is cancelled; the request
   log answers it 503 ``shutting_down`` if nothing was sent yet, never uvicorn's plain-text
   500.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog

from guardrail.serving.admission import Admission
from guardrail.serving.pool import PolicyPool

log = structlog.get_logger("guardrail.serving")

#: Seconds past the drain timeout uvicorn waits for the last answers to be written.
GRACE_S = 10.0


class Drain:
    """The server's shutdown sequence for its model workers (idempotent)."""

    def __init__(self, pool: PolicyPool, timeout_s: float, admission: Admission | None = None
                 ) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        self.admission = admission
        self.started_at: float | None = None
        self._timer: threading.Timer | None = None

    @property
    def draining(self) -> bool:
        """Whether :meth:`begin` was called."""
        return self.started_at is not None

    def begin(self) -> None:
        """Refuse new work, answer queued requests 503, and arm the deadline for running ones."""
        if self.started_at is not None:
            return
        self.started_at = time.monotonic()
        # Requests not queued yet (reading, parsing, tokenising) first: each is answered 503
        # now, rather than queued by a worker that is about to refuse it.
        admitted = self.admission.drain() if self.admission is not None else 0
        counts = self.pool.drain()
        log.info("serve.draining", drain_timeout_s=self.timeout_s,
                 admitted_answered_503=admitted, **counts)
        self._timer = threading.Timer(self.timeout_s, self._deadline)
        self._timer.daemon = True
        self._timer.start()

    def _deadline(self) -> None:
        cancelled = self.pool.cancel_running()
        if cancelled:
            log.warning("serve.drain_timeout", drain_timeout_s=self.timeout_s,
                        cancelled=cancelled, answer="503 shutting_down")

    def close(self) -> None:
        """Disarm the deadline (the server has stopped)."""
        if self._timer is not None:
            self._timer.cancel()


def run_server(app: Any, *, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM, draining as described above."""
    import uvicorn

    drain: Drain = app.state.drain

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            drain.begin()
            await super().shutdown(sockets=sockets)

    # h11 and asyncio whatever else is installed (Ray Serve brings httptools and uvloop):
    # httptools answers an unknown method 400 itself, before the request log and metrics.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=int(drain.timeout_s + GRACE_S),
                            http="h11", loop="asyncio")
    DrainingServer(config).run()
