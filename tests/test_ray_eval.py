"""``guardrail eval --executor ray`` answers as the single-process run does (SmolLM2)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from guardrail.cli import main

from .ray_cluster import DATA, local_cluster, needs_ray, needs_smollm2

pytestmark = [needs_ray, *needs_smollm2]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    yield from local_cluster()


def answers(out: Path) -> dict[str, list[str]]:
    found = {}
    for path in sorted((out / "generations").rglob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        found[str(path.relative_to(out))] = [r["answer"] for r in rows]
    return found


def test_sharded_eval_matches_single_process(tmp_path: Path, cluster: None) -> None:
    runs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        assert main(["eval", "--policy", "eds-smollm2-135m", "--suite", "xstest", "--limit", "6",
                     "--data-dir", str(DATA), "--max-new-tokens", "6", "--batch-size", "2",
                     "--cache-dir", str(tmp_path / f"cache-{executor}"), "--out", str(out),
                     "--save-generations", "--executor", executor, "--ray-workers", "2"]) == 0
        runs[executor] = answers(out)
    assert runs["ray"] == runs["local"]
    assert sum(len(v) for v in runs["local"].values()) == 12  # base and steered, 6 items each
