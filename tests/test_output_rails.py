"""Output rails: the refusal-aware rail answers again, steered, exactly the rows whose refusal
verdict the gate disagrees with, keeps the rest as the model answered, and says so in the
telemetry."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from guardrail import Register, hookimpl
from guardrail.errors import PluginError, PolicyError
from guardrail.plugin.components import Answer, OutputRail, RefusalClassifier, Verdict
from guardrail.policy.model import parse_policy
from guardrail.steering.guard import Guardrail

from .gated_guard import BENIGN, HARMFUL, gated_artifact, gated_policy_data, word_gate  # noqa: F401

STORE = [{"role": "user", "content": "tell me about the store"}]


class CokeRefusals(RefusalClassifier):
    """Calls every answer to a prompt about coke a refusal, and nothing else."""

    name = "coke-refusals"

    def classify(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        return [Verdict(refused="coke" in p, score=float("coke" in p), reason="scripted")
                for p in prompts]


class EveryOther(OutputRail):
    """Sends back every other answer, towards refusing; or garbage when told to."""

    name = "every-other"
    garbage = False

    def review(self, answers: Sequence[Answer]) -> list[str | None]:
        if EveryOther.garbage:
            return ["sideways"] * len(answers)
        return ["refuse" if i % 2 else None for i in range(len(answers))]


class _Plugin:
    @hookimpl
    def guardrail_register_refusal_classifiers(self, register: Register) -> None:
        register(CokeRefusals)

    @hookimpl
    def guardrail_register_output_rails(self, register: Register) -> None:
        register(EveryOther)

    @hookimpl
    def guardrail_on_generation(self, telemetry: Any, extra: dict[str, Any]) -> None:
        self.seen.append(telemetry)


@pytest.fixture
def scripted(plugin_manager: Any, word_gate: None) -> Iterator[_Plugin]:  # noqa: F811
    plugin = _Plugin()
    plugin.seen = []  # type: ignore[attr-defined]
    plugin_manager.register(plugin, name="output-rails-test")
    yield plugin
    plugin_manager.unregister(plugin)


def _guard(loaded: Any, tmp_path: Path, *output_rails: dict[str, Any]) -> Guardrail:
    artifact = gated_artifact(loaded, tmp_path / "gated.safetensors")
    data = gated_policy_data(artifact, below=0.0, above=0.5)
    data["classifier"] = {"plugin": "coke-refusals"}
    data["output_rails"] = list(output_rails)
    return Guardrail.from_policy(parse_policy(data), loaded=loaded)


def test_the_refusal_aware_rail_steers_only_where_verdict_and_gate_disagree(
    tiny_loaded: Any, tmp_path: Path, scripted: _Plugin,
) -> None:
    guard = _guard(tiny_loaded, tmp_path, {"plugin": "refusal-aware"})
    chats = [BENIGN, HARMFUL, STORE]
    results = guard.generate(chats, max_new_tokens=3)
    base = guard.generate(chats, steer=False, max_new_tokens=3)
    towards_answer = guard.answer([BENIGN], steer=True, settings=guard.policy.generation.model_copy(
        update={"max_new_tokens": 3}), gates="answer")[0]
    towards_refuse = guard.answer([HARMFUL], steer=True, settings=guard.policy.generation.model_copy(
        update={"max_new_tokens": 3}), gates="refuse")[0]
    coke, bomb, store = results

    # A benign prompt refused: answered again, steered towards answering.
    [done] = coke.telemetry.output_rails
    assert (done.rail, done.action, done.side) == ("refusal-aware", "answered again", "answer")
    assert done.first == {"text": base[0].text, "steered": False, "refused": True,
                          "reason": "scripted"}
    assert coke.token_ids == towards_answer.token_ids and coke.telemetry.steered
    assert coke.telemetry.gates[0].side == "answer" and coke.telemetry.gates[0].steered
    # A harmful prompt complied with: answered again, steered towards refusing.
    [done] = bomb.telemetry.output_rails
    assert (done.action, done.side) == ("answered again", "refuse")
    assert bomb.token_ids == towards_refuse.token_ids
    # A benign prompt answered: the model's own answer, never steered.
    [done] = store.telemetry.output_rails
    assert (done.action, done.side) == ("kept", None)
    assert store.token_ids == base[2].token_ids and not store.telemetry.steered
    assert store.telemetry.gates[0].side == "answer" and not store.telemetry.gates[0].steered
    assert store.telemetry.summary()["output_rails"] == [
        {"rail": "refusal-aware", "action": "kept", "side": None}]
    # The telemetry hook sees each final answer once (the first pass is not reported).
    assert scripted.seen[:3] == [r.telemetry for r in results]  # type: ignore[attr-defined]


def test_one_correction_only_and_no_rail_when_not_steering(
    tiny_loaded: Any, tmp_path: Path, scripted: _Plugin,
) -> None:
    guard = _guard(tiny_loaded, tmp_path, {"plugin": "answer-again",
                                           "params": {"sides": ["answer"]}})
    coke, bomb = guard.generate([BENIGN, HARMFUL], max_new_tokens=3)
    assert coke.telemetry.output_rails[0].action == "answered again"
    assert bomb.telemetry.output_rails[0].action == "kept" and not bomb.telemetry.steered
    for result in guard.generate([BENIGN], steer=False, max_new_tokens=3):
        assert result.telemetry.output_rails == []  # the unsteered model runs no rail
    for result in guard.generate_batch([BENIGN], max_new_tokens=3):
        assert result.telemetry.output_rails == []  # one answer, as served


def test_rails_run_in_order_and_a_broken_rail_is_named(
    tiny_loaded: Any, tmp_path: Path, scripted: _Plugin,
) -> None:
    guard = _guard(tiny_loaded, tmp_path, {"plugin": "every-other"}, {"plugin": "refusal-aware"})
    first, second = guard.generate([STORE, STORE], max_new_tokens=3)
    assert [o.action for o in first.telemetry.output_rails] == ["kept", "kept"]
    assert [(o.rail, o.action) for o in second.telemetry.output_rails] == [
        ("every-other", "answered again"), ("refusal-aware", "kept")]
    assert second.telemetry.steered  # answered again, steered towards refusing
    EveryOther.garbage = True
    try:
        with pytest.raises(PluginError, match=r"output rail 'every-other' returned \['sideways'"):
            guard.generate([STORE], max_new_tokens=2)
    finally:
        EveryOther.garbage = False


def test_a_policy_names_output_rails_by_registered_name(tiny_loaded: Any, tmp_path: Path,
                                                        word_gate: None) -> None:  # noqa: F811
    artifact = gated_artifact(tiny_loaded, tmp_path / "gated.safetensors")
    data = gated_policy_data(artifact)
    data["output_rails"] = [{"plugin": "refusal-aware", "params": {"sides": ["sideways"]}},
                            {"plugin": "no-such-rail"}]
    with pytest.raises(PolicyError) as caught:
        Guardrail.from_policy(parse_policy(data), loaded=tiny_loaded)
    problems = "\n".join(caught.value.problems)
    assert "output_rails[0].params.sides" in problems
    assert "output_rails[1].plugin: got 'no-such-rail'; unknown output_rail" in problems
