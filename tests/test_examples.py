"""The example applications under docs/examples/ run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from guardrail.models import is_installed

from .conftest import random_artifact

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2-135m-instruct"


@pytest.mark.integration
@pytest.mark.skipif(not is_installed(SMOLLM2),
                    reason=f"{SMOLLM2} not installed; run `guardrail models fetch {SMOLLM2}`")
def test_own_model_example_wraps_streams_and_reads_telemetry(tmp_path: Path) -> None:
    from guardrail.models import load_model

    # A stand-in artifact (random weights) for SmolLM2, so the run does not need a trained one;
    # the policy is the shipped one with only the rail's artifact changed ...
    artifact = random_artifact(load_model(SMOLLM2, device="cpu"), layers=(4, 9))
    artifact.save(tmp_path / "stand-in.safetensors")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "extends": "eds-smollm2-135m", "name": "example",
        # ... and no gate: a stand-in artifact has none fitted.
        "rails": [{"name": "eds", "energy_model": {"artifact": "stand-in.safetensors"},
                   "gate": None}],
    }))
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "own_model.py"), "--policy",
         str(policy), "--max-new-tokens", "12", "Where can I buy a can of coke?"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    steered = next(line for line in out.splitlines() if line.startswith("steered:"))
    assert len(steered.removeprefix("steered:").strip()) > 0
    for layer in (4, 9):
        assert re.search(rf"rail 'eds' layer  {layer}: energy .*\b\d+ steps", out), out
    assert "summary:" in out and "verdict:" in out and "attach():" in out
