"""A steering strength per call, per attach() and per request: a multiplier on each rail's
calibrated step size, bounded by what the artifact's calibration found within the budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from guardrail.errors import GuardrailError
from guardrail.policy.model import parse_policy
from guardrail.serving import ServeConfig, create_app
from guardrail.serving.pool import PolicyPool
from guardrail.steering.guard import Guardrail

from .conftest import CONVERSATIONS, random_artifact, tiny_policy
from .gated_guard import BENIGN, HARMFUL, gated_guard, word_gate  # noqa: F401

# Calibration tried eta 1, 2 and 4 at 2 steps; 1 and 2 held the budget, 4 did not.
CALIBRATION = {
    "rail": "eds", "steerer": {"eta": 1.0, "steps": 2}, "gate": {"below": 0.0, "above": None},
    "curves": {"answer": [
        {"eta": 1.0, "steps": 2, "threshold": 0.0, "feasible": True},
        {"eta": 2.0, "steps": 2, "threshold": 0.0, "feasible": True},
        {"eta": 4.0, "steps": 2, "threshold": 0.0, "feasible": False},
        {"eta": 8.0, "steps": 2, "threshold": -5.0, "feasible": True}], "refuse": []},
}


@pytest.fixture
def calibrated(tiny_loaded: Any, tmp_path: Path, word_gate: None) -> Guardrail:  # noqa: F811
    """The gated tiny guardrail whose step size comes from its calibration (eta 1)."""
    return gated_guard(tiny_loaded, tmp_path, calibration=CALIBRATION, params={})


def _steered(result: Any) -> list[tuple[int, float | None]]:
    return [(item.layer, item.energy_after) for item in result.telemetry.layers]


def test_the_limit_is_the_largest_budget_holding_step_size_over_the_calibrated_one(
    calibrated: Guardrail,
) -> None:
    assert calibrated.rails[0].steerer.params.eta == 1.0  # type: ignore[attr-defined]
    assert calibrated.strength_limit == 2.0
    assert calibrated.rails_at(2.0)[0].steerer.params.eta == 2.0  # type: ignore[attr-defined]
    assert calibrated.rails_at(0.25)[0].steerer.params.eta == 0.25  # type: ignore[attr-defined]
    assert calibrated.rails_at(1.0) is calibrated.rails
    for bad in (3.0, 0.0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(GuardrailError, match=r"^strength: got"):
            calibrated.generate([BENIGN], strength=bad)  # type: ignore[arg-type]
    with pytest.raises(GuardrailError, match="rail 'eds' allows at most 2 "):
        calibrated.generate([BENIGN], strength=2.5)


def test_a_strength_steers_as_a_policy_with_that_step_size_would(
    calibrated: Guardrail, tiny_loaded: Any, tmp_path: Path,
) -> None:
    doubled = gated_guard(tiny_loaded, tmp_path / "x", calibration=CALIBRATION,
                          params={"eta": 2.0})
    convs = [BENIGN, HARMFUL]
    scaled = calibrated.generate(convs, strength=2.0, max_new_tokens=3)
    plain = calibrated.generate(convs, max_new_tokens=3)
    reference = doubled.generate(convs, max_new_tokens=3)
    for ours, theirs in zip(scaled, reference, strict=True):
        assert [layer for layer, _ in _steered(ours)] == [layer for layer, _ in _steered(theirs)]
        assert [e for _, e in _steered(ours)] == pytest.approx(
            [e for _, e in _steered(theirs)], abs=1e-5)
    assert [r.token_ids for r in scaled] == [r.token_ids for r in reference]
    assert _steered(scaled[0]) != _steered(plain[0])  # it did steer harder
    assert scaled[0].telemetry.strength == 2.0 and plain[0].telemetry.strength is None
    assert scaled[0].telemetry.summary()["strength"] == 2.0
    # The gate still decides: the harmful row is left alone whatever the strength.
    assert not scaled[1].telemetry.steered and scaled[1].telemetry.gates[0].side is None
    stream = calibrated.stream(BENIGN, strength=2.0, max_new_tokens=3)
    assert "".join(stream) == scaled[0].text and stream.result is not None
    assert [e for _, e in _steered(stream.result)] == pytest.approx(
        [e for _, e in _steered(scaled[0])], abs=1e-5)


def test_without_calibration_a_strength_may_only_weaken(tiny_loaded: Any, tmp_path: Path) -> None:
    path = random_artifact(tiny_loaded).save(tmp_path / "a.safetensors")
    guard = Guardrail.from_policy(tiny_policy(path), loaded=tiny_loaded)  # type: ignore[arg-type]
    assert guard.strength_limit == 1.0
    guard.generate(CONVERSATIONS[:1], strength=0.5, max_new_tokens=2)
    with pytest.raises(GuardrailError, match="allows at most 1 "):
        guard.generate(CONVERSATIONS[:1], strength=1.5, max_new_tokens=2)


def test_attach_takes_a_strength_too(tiny_loaded: Any, tmp_path: Path) -> None:
    path = random_artifact(tiny_loaded).save(tmp_path / "a.safetensors")
    guard = Guardrail.from_policy(tiny_policy(path), loaded=tiny_loaded)  # type: ignore[arg-type]
    half = Guardrail.from_policy(tiny_policy(path, eta=2.5), loaded=tiny_loaded)  # type: ignore[arg-type]
    tok = tiny_loaded.tokenizer
    inputs = tok.apply_chat_template(CONVERSATIONS[:2], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True, padding=True,
                                     padding_side="left")
    with guard.attach(strength=0.5) as session:
        assert session.rails[0].steerer.params.eta == 2.5  # type: ignore[attr-defined]
        scaled = guard.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with half.attach():
        reference = half.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert scaled.tolist() == reference.tolist()
    with pytest.raises(GuardrailError, match="allows at most 1 "), guard.attach(strength=2.0):
        pass
    assert not guard.model._forward_hooks and not guard.model._forward_pre_hooks


def test_a_prompt_only_rail_has_no_strength_and_is_left_as_it_is(
    tiny_loaded: Any, tmp_path: Path,
) -> None:
    policy = parse_policy({"name": "sp", "model": {"source": "unused"},
                           "rails": [{"name": "sp", "steerer": {
                               "plugin": "system-prompt", "params": {"text": "be helpful"}}}]})
    guard = Guardrail.from_policy(policy, loaded=tiny_loaded)
    assert guard.rails_at(0.5) == guard.rails  # nothing to scale


# --- the server ---------------------------------------------------------------------------
CONFIG = ServeConfig(max_tokens_limit=16, max_prompt_tokens=40, request_timeout_s=30,
                     batch_wait_ms=20)


def _complete(client: TestClient, messages: list[dict[str, str]], **guardrail: Any) -> Any:
    return client.post("/v1/chat/completions", json={
        "model": "tiny-gated", "messages": messages, "max_tokens": 3, "temperature": 0,
        **({"guardrail": guardrail} if guardrail else {})})


def test_a_request_takes_a_strength_bounded_by_the_calibration(calibrated: Guardrail) -> None:
    with TestClient(create_app(PolicyPool([calibrated], CONFIG), CONFIG)) as client:
        reply = _complete(client, BENIGN, strength=2)
        assert reply.status_code == 200, reply.text
        ext = reply.json()["guardrail"]
        assert ext["strength"] == 2.0 and ext["steered"] is True
        assert reply.headers["x-guardrail-strength"] == "2"
        direct = calibrated.generate([BENIGN], strength=2.0, max_new_tokens=3)[0]
        assert [e["energy_after"] for e in ext["energies"]] == pytest.approx(
            [e for _, e in _steered(direct)], abs=1e-4)
        assert _complete(client, BENIGN).json()["guardrail"]["strength"] is None
        too_much = _complete(client, BENIGN, strength=3)
        assert too_much.status_code == 400
        error = too_much.json()["error"]
        assert error["param"] == "guardrail.strength" and error["code"] == "invalid_value"
        assert error["message"].startswith("guardrail.strength: got 3")
        assert "allows at most 2" in error["message"]
        for bad in (0, -1, "2", None):
            reply = _complete(client, BENIGN, strength=bad) if bad is not None else \
                client.post("/v1/chat/completions", json={
                    "model": "tiny-gated", "messages": BENIGN,
                    "guardrail": {"strength": "NaN"}})
            assert reply.status_code == 400, bad
        # Unsteered, a strength changes nothing and is not reported.
        base = _complete(client, BENIGN, steer=False, strength=2)
        assert base.status_code == 200 and base.json()["guardrail"]["strength"] is None
