"""The ``ray`` executor: shards on Ray actors, one model replica per actor.

Each actor reserves ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs, sets torch to as
many threads, and builds a replica the first time a job needs it (:meth:`ShardWork.load`;
a calibration's grid points share one model load per actor). Shards go to idle actors
through Ray's :class:`~ray.util.ActorPool`. A lost actor is restarted by Ray and the shard
it held runs again (``max_restarts`` and ``max_task_retries``, both ``max_retries``); the
driver writes each result once, as it arrives, keyed per prompt, so nothing is lost or
counted twice. When the retries run out the command stops; every finished shard is cached
and the next run resumes from there.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from guardrail.distributed.executor import Executor, ResultT, ShardT, ShardWork
from guardrail.errors import GuardrailError
from guardrail.policy.executor import ExecutorSettings

log = structlog.get_logger("guardrail.distributed")

try:
    import ray
    from ray.exceptions import RayActorError, RayTaskError
    from ray.util import ActorPool
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise GuardrailError(
        f"--executor ray needs Ray ({exc.name} is not installed); install it with: "
        "pip install 'guardrail-eds[ray]'") from exc

#: Environment variables a worker needs to find what the driver finds (caches, prompt sets,
#: the offline switches); copied into every actor's runtime environment when set.
FORWARDED_ENV = ("GUARDRAIL_CACHE_DIR", "GUARDRAIL_DATA", "GUARDRAIL_DISABLE_PLUGINS",
                 "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
#: Replicas an actor keeps (a calibration builds one guardrail per grid point, on one model).
KEPT_REPLICAS = 16


class _Replica:
    """A Ray actor holding model replicas; runs shards of any :class:`ShardWork`."""

    def __init__(self, threads: int, device: str) -> None:
        import torch

        torch.set_num_threads(threads)
        self.device = device
        self.replicas: dict[str, Any] = {}

    def pid(self) -> int:
        """The actor's process id (a restarted actor has a new one)."""
        return os.getpid()

    def run(self, work: ShardWork[Any, Any], index: int, shard: Any) -> tuple[int, Any, int]:
        """``(index, result, pid)``: the pid lets a caller see that a restarted actor took over."""
        key = work.replica_key()
        replica = self.replicas.get(key)
        if replica is None:
            if len(self.replicas) >= KEPT_REPLICAS:
                self.replicas.pop(next(iter(self.replicas)))
            replica = self.replicas[key] = work.load(self.device)
        return index, work.run(replica, shard), os.getpid()


class RayExecutor(Executor):
    """See the module docstring; actors start on the first :meth:`map` and stay until
    :meth:`close`."""

    kind = "ray"

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self.workers = settings.workers
        self.run_id = uuid.uuid4().hex[:8]
        self.actors: list[Any] = []
        #: Worker process ids that returned a result (more than ``workers``: one restarted).
        self.pids: set[int] = set()
        self._started_ray = False

    # --- cluster ------------------------------------------------------------------------------
    def _connect(self) -> None:
        if ray.is_initialized():
            return
        address = self.settings.address
        kwargs: dict[str, Any] = {"namespace": "guardrail", "log_to_driver": True}
        if address is None:
            kwargs["include_dashboard"] = False
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise GuardrailError(f"--ray-address {address!r}: cannot connect to a Ray cluster "
                                 f"({type(exc).__name__}: {exc})") from exc
        self._started_ray = True
        log.info("ray.connected", address=address or "local", resources=ray.cluster_resources())

    def _check_resources(self) -> None:
        s = self.settings
        have = ray.cluster_resources()
        wanted = {"CPU": s.workers * s.cpus_per_worker, "GPU": s.workers * s.gpus_per_worker}
        short = {k: (v, have.get(k, 0.0)) for k, v in wanted.items() if v > have.get(k, 0.0)}
        if not short:
            return
        text = ", ".join(f"{v:g} {k} wanted, the cluster has {h:g}" for k, (v, h) in short.items())
        message = (f"--ray-workers {s.workers} x (--ray-cpus-per-worker {s.cpus_per_worker:g}, "
                   f"--ray-gpus-per-worker {s.gpus_per_worker:g}): {text}")
        if s.address is None:
            # Nothing will add nodes to a Ray instance started for this run: actors would wait
            # for ever.
            raise GuardrailError(message + "; ask for fewer workers or less per worker")
        log.warning("ray.resources_short", detail=message + " (waiting for the cluster to grow)")

    def _start_actors(self) -> None:
        if self.actors:
            return
        self._connect()
        self._check_resources()
        s = self.settings
        threads = max(1, int(s.cpus_per_worker))
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false",
               **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
        device = "cuda" if s.gpus_per_worker > 0 else "cpu"
        actor_cls = ray.remote(_Replica)
        for i in range(s.workers):
            self.actors.append(actor_cls.options(
                name=f"guardrail-{self.run_id}-{i}", num_cpus=s.cpus_per_worker,
                num_gpus=s.gpus_per_worker, max_restarts=s.max_retries,
                max_task_retries=s.max_retries, runtime_env={"env_vars": env},
            ).remote(threads, device))
        log.info("ray.actors_started", workers=s.workers, cpus_per_worker=s.cpus_per_worker,
                 gpus_per_worker=s.gpus_per_worker, device=device, run=self.run_id)

    # --- work ---------------------------------------------------------------------------------
    def map(
        self,
        work: ShardWork[ShardT, ResultT],
        shards: Sequence[ShardT],
        on_result: Callable[[int, ResultT], None],
        *,
        replica: Any = None,
    ) -> None:
        """See :meth:`Executor.map`; ``replica`` is ignored (each actor builds its own)."""
        if not shards:
            return
        self._start_actors()
        work_ref = ray.put(work)
        pool = ActorPool(self.actors)
        results = pool.map_unordered(
            lambda actor, item: actor.run.remote(work_ref, item[0], item[1]),
            list(enumerate(shards)))
        done = 0
        try:
            for index, result, pid in results:
                self.pids.add(pid)
                on_result(index, result)
                done += 1
        except (RayActorError, RayTaskError) as exc:
            raise GuardrailError(
                f"a Ray worker failed after {self.settings.max_retries} retries "
                f"(--ray-max-retries); {done} of {len(shards)} shards finished and are cached, "
                f"so running the command again resumes: {type(exc).__name__}: "
                f"{str(exc)[:2000]}") from exc

    def close(self) -> None:
        """Kill the actors; shut Ray down if this executor started it."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - an actor already gone is fine
                log.debug("ray.kill_failed", error=str(exc))
        self.actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
