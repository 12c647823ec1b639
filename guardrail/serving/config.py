"""Limits and knobs of one server: queue size, batching, request sizes, timeouts, drain."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """What ``guardrail serve`` accepts and how it batches.

    ``max_batch_size`` of ``None`` uses each policy's ``generation.batch_size``.
    ``batch_wait_ms`` is how long the worker waits for company once a first request is
    queued: a few milliseconds let requests that arrive together share a forward pass.
    """

    max_batch_size: int | None = None
    max_queue: int = 64
    batch_wait_ms: float = 5.0
    max_tokens_limit: int = 1024
    max_prompt_tokens: int = 4096
    max_request_bytes: int = 1 << 20
    request_timeout_s: float = 300.0
    max_stop_sequences: int = 4
    #: On SIGTERM/SIGINT, how long running requests may take to finish (then they get 503).
    drain_timeout_s: float = 30.0
    #: ``Host`` names the server answers (``'*'``: any); None checks none (an embedded app).
    allowed_hosts: frozenset[str] | None = None

    def batch_size_for(self, policy_batch_size: int) -> int:
        """The largest batch the worker builds for a policy."""
        return self.max_batch_size if self.max_batch_size is not None else policy_batch_size
