"""Sharded labelling on a real local Ray cluster (2 CPU workers) with the packaged SmolLM2.

The sharded ``train`` must give what the single-process run gives (labels, selected layers,
states), and a run that loses an actor halfway must still label every prompt exactly once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from guardrail.cli import main
from guardrail.policy.model import load_policy
from guardrail.training.cache import StateCache, _read_header

from .conftest import write_policy
from .ray_cluster import DATA, local_cluster, needs_ray, needs_smollm2

pytestmark = [needs_ray, *needs_smollm2]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    yield from local_cluster()


def small_policy(path: Path, cache: Path, *, batch_size: int = 4) -> Path:
    """40 prompts (as tests/test_training_integration.py), 8-token labels."""
    return write_policy(path, {
        "name": "smol-ray",
        "model": {"source": "smollm2-135m-instruct"},
        "rails": [{"name": "eds", "energy_model": {
            "artifact": "smol.safetensors", "params": {"hidden": [32], "dropout": 0.0}}}],
        "training": {
            "sources": [
                {"path": str(DATA / "or_bench_hard_train.json"), "context": "benign",
                 "sample": 12},
                {"path": str(DATA / "harmless_train.json"), "context": "benign",
                 "sample": 8},
                {"path": str(DATA / "advbench.json"), "context": "harmful",
                 "sample": 20},
            ],
            "labels": {"max_new_tokens": 8, "batch_size": batch_size},
            "capture": {"cache_dir": str(cache)},
            "trainer": {"epochs": 4, "batch_size": 16, "val_fraction": 0.25},
            "selection": {"top_k": 4},
        },
    })


def cached_rows(cache_root: Path) -> dict[str, list[str]]:
    """Every shard file's keys, per file (a key in two files would be counted twice)."""
    return {str(p): _read_header(p)["keys"]  # type: ignore[index]
            for p in sorted(cache_root.rglob("shard-*.safetensors"))}


def cache_of(policy_path: Path, cache_root: Path) -> StateCache:
    from guardrail.steering.guard import Guardrail
    from guardrail.training.cache import weights_digest

    policy = load_policy(policy_path)
    guard = Guardrail.from_policy(policy.model_copy(update={"rails": []}))
    return StateCache(cache_root, guard.fingerprint, weights_digest(guard.model),
                      positions="last", max_new_tokens=8)


def test_sharded_train_matches_single_process(tmp_path: Path, cluster: None) -> None:
    policy = small_policy(tmp_path / "smol.yaml", tmp_path / "unused")
    runs = {}
    for executor in ("local", "ray"):
        cache, report = tmp_path / f"cache-{executor}", tmp_path / f"{executor}.json"
        started = time.perf_counter()
        assert main(["train", "--policy", str(policy), "--no-progress", "--cache-dir", str(cache),
                     "--output", str(tmp_path / f"{executor}.safetensors"),
                     "--report", str(report), "--executor", executor,
                     "--ray-workers", "2", "--ray-cpus-per-worker", "1"]) == 0
        runs[executor] = (json.loads(report.read_text()), cache, time.perf_counter() - started)
    local, ray_run = runs["local"][0], runs["ray"][0]
    assert sum(local["cells"]["train"].values()) + sum(local["cells"]["val"].values()) == 40
    assert ray_run["cells"] == local["cells"]
    assert ray_run["selected"] == local["selected"]
    assert ray_run["capture"]["batches"] == local["capture"]["batches"] == 10

    local_cache, ray_cache = (cache_of(policy, runs[k][1]) for k in ("local", "ray"))
    keys = sorted(local_cache.index())
    assert sorted(ray_cache.index()) == keys and len(keys) == 40
    a, b = local_cache.load(keys), ray_cache.load(keys)
    assert a.responses == b.responses
    assert torch.allclose(a.states.float(), b.states.float(), atol=1e-5, rtol=0)
    print({k: round(v[2], 1) for k, v in runs.items()})


def test_killed_actor_still_labels_every_prompt_once(tmp_path: Path, cluster: None) -> None:
    import ray

    from guardrail.distributed.executor import using
    from guardrail.distributed.ray_actors import RayExecutor
    from guardrail.policy.executor import ExecutorSettings
    from guardrail.training.pipeline import TrainOptions, train_policy

    cache = tmp_path / "cache"
    policy = load_policy(small_policy(tmp_path / "smol.yaml", cache, batch_size=2))
    executor = RayExecutor(ExecutorSettings(kind="ray", workers=2, max_retries=2))
    failure: list[BaseException] = []

    def train() -> None:
        try:
            with using(executor):
                train_policy(policy, options=TrainOptions(progress=False,
                                                          output=tmp_path / "a.safetensors"))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            failure.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 120
    while not list(cache.rglob("shard-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.2)
    written_before_kill = len(list(cache.rglob("shard-*.safetensors")))
    assert written_before_kill >= 1 and executor.actors, "no shard finished within 120 s"
    killed = executor.actors[0]
    pid_before = ray.get(killed.pid.remote())
    ray.kill(killed, no_restart=False)  # as a crashed worker: Ray restarts it
    # The actor is really lost and comes back as a new process (this call waits for the
    # restart, and runs while shards are still left, so before the executor closes).
    assert ray.get(killed.pid.remote(), timeout=180) != pid_before
    thread.join(timeout=300)
    assert not thread.is_alive() and not failure, failure

    rows = cached_rows(cache)
    every = [key for keys in rows.values() for key in keys]
    assert len(every) == len(set(every)) == 40  # every prompt once, none twice
    assert written_before_kill < len(rows) == 20  # the kill came with shards still to do
