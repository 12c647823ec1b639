"""The executor settings and options (no Ray needed), and the Ray executor on a real local
cluster: shards mapped, results once each, a request larger than the cluster refused."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guardrail.cli import main
from guardrail.distributed import open_executor
from guardrail.distributed.executor import LocalExecutor, ShardWork, current, using
from guardrail.errors import GuardrailError, PolicyError
from guardrail.policy.executor import ExecutorSettings
from guardrail.policy.model import load_policy

from .conftest import write_policy
from .ray_cluster import local_cluster, needs_ray


def policy_with(tmp_path: Path, executor: object) -> Path:
    return write_policy(tmp_path / "p.yaml", {
        "name": "p", "model": {"source": "smollm2-135m-instruct"},
        "training": {"sources": [{"path": "b.txt", "context": "benign"},
                                 {"path": "h.txt", "context": "harmful"}],
                     "executor": executor}})


def test_policy_executor_defaults_to_local_and_takes_a_shorthand(tmp_path: Path) -> None:
    assert ExecutorSettings().kind == "local"
    policy = load_policy(policy_with(tmp_path, "ray"))
    assert policy.training is not None and policy.training.executor.kind == "ray"


def test_bad_executor_value_names_file_key_and_value(tmp_path: Path) -> None:
    path = policy_with(tmp_path, {"kind": "spark", "workers": 0})
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    text = str(caught.value)
    assert str(path) in text
    assert "training.executor.kind: got 'spark'" in text
    assert "training.executor.workers: got 0" in text


def test_bad_option_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--policy", "eds-smollm2-135m", "--ray-workers", "0"])
    assert "--ray-workers" in capsys.readouterr().err


@dataclass(frozen=True)
class Square(ShardWork[list[int], list[int]]):
    """Squares each number; the replica is this worker's process id."""

    def replica_key(self) -> str:
        return "square"

    def load(self, device: str | None) -> int:
        import os

        return os.getpid()

    def run(self, replica: int, shard: list[int]) -> list[int]:
        return [x * x for x in shard]


def test_local_executor_is_the_default_and_runs_in_order() -> None:
    assert isinstance(current(), LocalExecutor)
    got: list[tuple[int, list[int]]] = []
    with using(open_executor()):
        current().map(Square(), [[1, 2], [3]], lambda i, r: got.append((i, r)))
    assert got == [(0, [1, 4]), (1, [9])]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    yield from local_cluster()


@needs_ray
def test_ray_executor_maps_every_shard_once(cluster: None) -> None:
    shards = [[i, i + 1] for i in range(0, 20, 2)]
    got: dict[int, list[int]] = {}

    def keep(index: int, result: list[int]) -> None:
        assert index not in got
        got[index] = result

    executor = open_executor(ExecutorSettings(kind="ray", workers=2))
    with using(executor):
        current().map(Square(), shards, keep)
    assert got == {i: [x * x for x in shard] for i, shard in enumerate(shards)}
    assert len(executor.pids) == 2  # type: ignore[attr-defined]  # both actors took shards
    assert executor.actors == []  # type: ignore[attr-defined]  # closed


@needs_ray
def test_ray_executor_refuses_more_than_the_cluster_has(cluster: None) -> None:
    executor = open_executor(ExecutorSettings(kind="ray", workers=3, cpus_per_worker=1))
    with pytest.raises(GuardrailError, match=r"--ray-workers 3 .* 3 CPU wanted, the cluster has 2"):
        executor.map(Square(), [[1]], lambda i, r: None)
    executor.close()
