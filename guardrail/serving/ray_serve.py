"""``guardrail serve --replicas N``: the same app on Ray Serve, as N replicas.

Each replica is a Ray Serve deployment replica that loads the policies itself
(:class:`~guardrail.serving.pool.PolicyPool`) and serves the very app ``guardrail serve``
serves (:func:`~guardrail.serving.app.create_app`): the same routes, bearer auth, Host
allow-list, body and token limits, batcher, metrics and request log. Ray Serve's proxy
spreads requests over the replicas; a request is answered by one replica from start to
end, so its policy, steering and telemetry are what a single server gives it.

What changes with replicas:

- every response carries ``x-guardrail-replica`` (the Serve replica id and its process id),
  and ``/metrics`` and ``/healthz`` describe the replica that answered them;
- shutdown: Ray Serve stops routing to a replica, waits up to ``graceful_shutdown_timeout_s``
  (the drain timeout plus :data:`~guardrail.serving.lifecycle.GRACE_S`) for its requests,
  then runs the app's lifespan shutdown, which drains as a single server does;
- each replica admits up to ``max_queue`` waiting plus one batch of running requests
  (``max_ongoing_requests``); beyond that the Serve proxy queues, then answers 503.

The same deployment from a Ray Serve config file (``serve run config.yaml``) goes through
:func:`app_builder` (docs/scaling.md).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import structlog

from guardrail.errors import GuardrailError
from guardrail.serving.config import ServeConfig
from guardrail.serving.lifecycle import GRACE_S

log = structlog.get_logger("guardrail.serving")

REPLICA_HEADER = "x-guardrail-replica"


def _ray_serve() -> Any:
    try:
        from ray import serve
    except ModuleNotFoundError as exc:
        raise GuardrailError(
            f"`guardrail serve --replicas` needs Ray Serve ({exc.name} is not installed); "
            "install it with: pip install 'guardrail-eds[ray]'") from exc
    return serve


class ReplicaHeader:
    """ASGI middleware: ``x-guardrail-replica: <serve replica id>/<pid>`` on every response."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.value = replica.encode("latin-1", "replace")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Add the header to the response start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, tagged)


class GuardrailReplica:
    """One Serve replica: the policies loaded, the app built (Ray Serve runs its lifespan)."""

    def __init__(self, policies: Sequence[str], config: dict[str, Any], device: str | None,
                 api_key: str | None, threads: int) -> None:
        import torch

        from guardrail.serving.app import create_app
        from guardrail.serving.pool import PolicyPool

        torch.set_num_threads(threads)
        serve_config = ServeConfig(**config)
        pool = PolicyPool.load(list(policies), serve_config, device=device)
        replica_id = _ray_serve().get_replica_context().replica_id.unique_id
        self.replica = f"{replica_id}/{os.getpid()}"
        app = create_app(pool, serve_config, api_key=api_key)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        self._asgi_app = app
        log.info("serve.replica_ready", replica=self.replica, policies=sorted(pool.policies))

    def __serve_build_asgi_app__(self) -> Any:
        """The app Ray Serve wraps (called once, after the constructor)."""
        return self._asgi_app


def build_application(policies: Sequence[str], config: ServeConfig, *, replicas: int,
                      device: str | None = None, api_key: str | None = None,
                      cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
                      threads: int | None = None) -> Any:
    """The Ray Serve application: ``replicas`` copies of :class:`GuardrailReplica`."""
    serve = _ray_serve()
    batch = config.max_batch_size or 16
    # Each replica answers 503 itself once its own queue is full, so Serve may hand it that
    # many waiting requests plus a running batch.
    ongoing = config.max_queue + batch
    env = {"OMP_NUM_THREADS": str(threads or max(1, int(cpus_per_replica))),
           "TOKENIZERS_PARALLELISM": "false",
           **{k: os.environ[k] for k in ("GUARDRAIL_CACHE_DIR", "GUARDRAIL_DATA", "HF_HOME")
              if k in os.environ}}
    deployment = serve.deployment(
        serve.ingress()(GuardrailReplica), name="guardrail", num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica,
                           "runtime_env": {"env_vars": env}},
        max_ongoing_requests=ongoing,
        graceful_shutdown_timeout_s=config.drain_timeout_s + GRACE_S,
        # Loading a model takes a while on a busy CPU.
        health_check_timeout_s=120.0)
    return deployment.bind(list(policies), asdict(config), device, api_key,
                           threads or max(1, int(cpus_per_replica)))


def app_builder(args: dict[str, Any]) -> Any:
    """For ``serve run guardrail.serving.ray_serve:app_builder policy=NAME replicas=2`` and
    for a Serve config file's ``import_path`` (its ``args:`` are these keys)."""
    policies = args.get("policy") or args.get("policies")
    if not policies:
        raise GuardrailError("app_builder: args need 'policy' (a policy file or shipped name, "
                             "or a list of them)")
    if isinstance(policies, str):
        policies = [p for p in policies.split(",") if p]
    limits = {k: args[k] for k in ("max_batch_size", "max_queue", "batch_wait_ms",
                                   "max_tokens_limit", "max_prompt_tokens", "request_timeout_s",
                                   "drain_timeout_s") if k in args}
    return build_application(policies, ServeConfig(**limits),
                             replicas=int(args.get("replicas", 1)), device=args.get("device"),
                             api_key=args.get("api_key") or os.environ.get("GUARDRAIL_API_KEY"),
                             cpus_per_replica=float(args.get("cpus_per_replica", 1.0)),
                             gpus_per_replica=float(args.get("gpus_per_replica", 0.0)))


def run_replicated(application: Any, *, host: str, port: int, address: str | None) -> None:
    """Deploy ``application`` at ``http://host:port/`` and serve until SIGINT/SIGTERM, then
    shut the deployment down (each replica drains) and leave the Ray cluster."""
    import ray

    serve = _ray_serve()
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"namespace": "guardrail-serve"}
        if address is None:
            kwargs["include_dashboard"] = False
        ray.init(address=address, **kwargs)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name="guardrail", route_prefix="/")
        log.info("serve.replicated", url=f"http://{host}:{port}/v1")
        stop.wait()
        log.info("serve.stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.shutdown()
        if started:
            ray.shutdown()
        log.info("serve.stopped")
