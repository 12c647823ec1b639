"""Prometheus metrics of one server (``GET /metrics``), through ``prometheus-client``.

Each app has its own registry, so two servers in one process (tests) never share counts.
Request counts and latencies are recorded by :class:`~guardrail.serving.request_log.RequestLog`
just before a response's last byte goes out, so a client that has its answer sees it counted;
completions add tokens, time to first token, steered layers, energies and non-finite skips;
the model workers add batch sizes; queue depth and rows running are read when scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from guardrail.serving.batcher import JobResult
from guardrail.serving.pool import PolicyPool
from guardrail.serving.schemas import GuardrailExtension

if TYPE_CHECKING:
    from guardrail.serving.admission import Admission

#: Routes by template; anything else is counted as ``other`` (no label per unknown path).
ROUTES = ("/v1/chat/completions", "/v1/models", "/v1/guardrail/energies", "/healthz", "/readyz",
          "/metrics")
#: HTTP methods counted by name; any other token a client sends is counted as ``other``, so
#: no request, authenticated or not, can add a label value (and grow ``/metrics``).
METHODS = ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ENERGY_BUCKETS = (-8, -4, -2, -1, -0.5, 0, 0.5, 1, 2, 4, 8)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def route_of(path: str) -> str:
    """The route template a path belongs to (bounded label values)."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{name}"
    return "other"


def method_of(method: str) -> str:
    """The method label: a standard method's name, else ``other``."""
    return method if method in METHODS else "other"


def status_of(status: int) -> str:
    """The status label: the code, if it is one (100-599), else ``other``."""
    return str(status) if 100 <= status <= 599 else "other"


class ServerMetrics:
    """The metrics of one app; ``render()`` is the ``/metrics`` body."""

    def __init__(self, pool: PolicyPool, admission: Admission | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("guardrail_requests", "HTTP requests answered, by route, "
                                "method and status", ["route", "method", "status"], registry=r)
        self.latency = Histogram("guardrail_request_duration_seconds", "Time from request to "
                                 "the last byte of the response", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("guardrail_time_to_first_token_seconds", "Time from "
                                     "queueing a completion to its batch's first generated "
                                     "token", ["policy"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("guardrail_tokens", "Prompt and completion tokens of answered "
                              "completions", ["policy", "kind"], registry=r)
        self.batch_size = Histogram("guardrail_batch_size", "Requests per forward pass",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.steered = Counter("guardrail_steered_layers", "Completions in which steering "
                               "moved at least one position, per rail and layer",
                               ["policy", "rail", "layer"], registry=r)
        self.energy_before = Histogram("guardrail_energy_before", "Energy at the last prompt "
                                       "token before steering", ["policy", "rail", "layer"],
                                       buckets=ENERGY_BUCKETS, registry=r)
        self.energy_after = Histogram("guardrail_energy_after", "Energy at the last prompt "
                                      "token after steering", ["policy", "rail", "layer"],
                                      buckets=ENERGY_BUCKETS, registry=r)
        self.nonfinite = Counter("guardrail_nonfinite_skips", "Positions left unsteered "
                                 "because their energy was not finite",
                                 ["policy", "rail", "layer"], registry=r)
        r.register(_PoolCollector(pool, admission))
        for worker in pool.workers:
            worker.observe_batch = self.batch_size.labels(model=worker.name).observe

    def observe_request(self, path: str, method: str, status: int, seconds: float) -> None:
        """One answered HTTP request."""
        route = route_of(path)
        self.requests.labels(route=route, method=method_of(method),
                             status=status_of(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_completion(self, policy: str, result: JobResult, ext: GuardrailExtension
                           ) -> None:
        """Tokens, time to first token and what steering did, for one answered completion."""
        self.tokens.labels(policy=policy, kind="prompt").inc(result.telemetry.prompt_tokens)
        self.tokens.labels(policy=policy, kind="completion").inc(len(result.token_ids))
        if result.first_token_ms is not None:
            self.first_token.labels(policy=policy).observe(result.first_token_ms / 1000)
        for item in ext.energies:
            labels = {"policy": policy, "rail": item.rail, "layer": str(item.layer)}
            if item.steered_positions:
                self.steered.labels(**labels).inc()
            if item.energy_before is not None:
                self.energy_before.labels(**labels).observe(item.energy_before)
            if item.energy_after is not None:
                self.energy_after.labels(**labels).observe(item.energy_after)
            if item.nonfinite_positions:
                self.nonfinite.labels(**labels).inc(item.nonfinite_positions)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return bytes(generate_latest(self.registry))


class _PoolCollector(Collector):
    """Queue depth, rows running and queue capacity per model worker, read at scrape time."""

    def __init__(self, pool: PolicyPool, admission: Admission | None = None) -> None:
        self.pool = pool
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        admitted = (self.admission.admitted if self.admission is not None
                    else lambda worker: 0)
        gauges: dict[str, tuple[str, Any]] = {
            "guardrail_queue_depth": ("Requests waiting per model worker", lambda w: w.queued),
            "guardrail_admitted_requests": ("Requests per model worker read but not queued "
                                            "yet (tokenising)", admitted),
            "guardrail_running_requests": ("Requests in the running batch per model worker",
                                           lambda w: w.stats.running),
            "guardrail_queue_capacity": ("--max-queue per model worker", lambda w: w.max_queue),
            "guardrail_draining": ("1 while the server is shutting down", lambda w: w.draining),
        }
        for name, (documentation, read) in gauges.items():
            family = GaugeMetricFamily(name, documentation, labels=["model"])
            for worker in self.pool.workers:
                family.add_metric([worker.name], float(read(worker)))
            yield family
