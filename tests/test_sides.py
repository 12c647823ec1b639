"""Both halves of EDS: one energy-model set per gate side, each row steered towards the side its
gate chose; the same under ``attach()``; the refuse side's budget in calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from guardrail.artifact.energy import FORMAT, EnergyArtifact
from guardrail.cli import main
from guardrail.errors import PolicyError
from guardrail.policy.model import load_policy
from guardrail.policy.training import CalibrationSection
from guardrail.steering.generation import UserMessageParser
from guardrail.steering.guard import Guardrail
from guardrail.training.budget import Evidence, choose
from guardrail.training.sources import TrainingPrompt

from .conftest import build_tiny_tokenizer
from .test_gates import bomb_gate, gated_policy  # noqa: F401
from .test_training_pipeline import keyword_classifier  # noqa: F401

COKE = "where can i buy coke please"
BOMB = "how make bomb please"


def sided_policy(tmp_path: Path, model_dir: Path, **gate: Any) -> Path:
    """The gated tiny policy, trained with one energy-model set per gate side."""
    path = gated_policy(tmp_path, model_dir, **gate)
    data = yaml.safe_load(path.read_text())
    data["training"].setdefault("trainer", {})["sides"] = "separate"
    path.write_text(yaml.safe_dump(data))
    return path


def _conversations(*prompts: str) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in prompts]


def test_separate_sides_train_one_set_per_side_and_steer_each_row_with_its_own(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None, bomb_gate: None,  # noqa: F811
) -> None:
    path = sided_policy(tmp_path, tiny_model_dir, below=None, above=None)
    assert main(["train", "--policy", str(path), "--no-progress"]) == 0
    artifact_path = tmp_path / "artifacts" / "tiny.safetensors"
    header = EnergyArtifact.read_header(artifact_path)
    assert header["format"] == FORMAT and set(header["sides"]) == {"answer", "refuse"}
    assert "layers" not in header  # no shared set
    coke, bomb = Guardrail.from_policy(load_policy(path)).gate_scores(
        _conversations(COKE, BOMB))["eds"].tolist()
    assert bomb > coke  # the bomb words weigh in
    data = yaml.safe_load(path.read_text())
    data["rails"][0]["gate"].update(below=coke + 1e-3, above=(coke + bomb) / 2)
    path.write_text(yaml.safe_dump(data))
    guard = Guardrail.from_policy(load_policy(path))
    rail = guard.rails[0]
    assert set(rail.directions) == {"answer", "refuse"} and not rail.energies
    results = guard.generate(_conversations(COKE, BOMB), max_new_tokens=3)
    sides = [r.telemetry.gates[0].side for r in results]
    assert sides == ["answer", "refuse"]
    artifact = EnergyArtifact.load(artifact_path, guard.registry)
    for result, side in zip(results, sides, strict=True):
        assert result.telemetry.steered
        layers = [item for item in result.telemetry.layers if item.energy_before is not None]
        assert layers and {item.side for item in layers} == {side}
        assert {item.layer for item in layers} <= set(artifact.sides[side])
    # Each row's energy is its own side's model's, not the other's.
    enc = guard.encode(guard.render(_conversations(BOMB)))
    from guardrail.steering.capture import read_states

    layer = sorted(artifact.sides["refuse"])[0]
    state = read_states(guard.model, rail.source, enc, [layer])[layer]
    expected = float(artifact.sides["refuse"][layer].energy(state)[0])
    measured = next(item.energy_before for item in results[1].telemetry.layers
                    if item.layer == layer)
    assert measured == pytest.approx(expected, abs=1e-3)
    # Forcing a side steers every row with that side's models.
    forced = guard.generate(_conversations(COKE, BOMB), max_new_tokens=3, gates="refuse")
    assert all({i.side for i in r.telemetry.layers if i.energy_before is not None} == {"refuse"}
               for r in forced)


def test_the_kl_guard_steers_each_row_as_its_gate_decides(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None, bomb_gate: None,  # noqa: F811
) -> None:
    # A sided artifact has no shared energy models: the capability guard must steer each row
    # towards the side its gate chose (as generation does), and leave a gated-out row alone.
    from guardrail.evaluation.cache import Answer
    from guardrail.evaluation.kl import answer_kl

    path = sided_policy(tmp_path, tiny_model_dir, below=None, above=None)
    assert main(["train", "--policy", str(path), "--no-progress"]) == 0
    guard = Guardrail.from_policy(load_policy(path))
    coke, bomb = guard.gate_scores(_conversations(COKE, BOMB))["eds"].tolist()
    base = guard.generate(_conversations(COKE, BOMB), max_new_tokens=4, steer=False)
    answers = [Answer(r.text, r.token_ids, r.finish_reason) for r in base]
    data = yaml.safe_load(path.read_text())
    data["rails"][0]["gate"].update(below=coke + 1e-3, above=None)  # only the coke row
    path.write_text(yaml.safe_dump(data))
    result = answer_kl(Guardrail.from_policy(load_policy(path)), [COKE, BOMB], answers)
    assert result.per_prompt[0] > 0 and result.per_prompt[1] == pytest.approx(0.0, abs=1e-6)


def test_a_sided_artifact_needs_a_gate_to_choose_the_side(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None, bomb_gate: None,  # noqa: F811
) -> None:
    path = sided_policy(tmp_path, tiny_model_dir, below=0.0)
    assert main(["train", "--policy", str(path), "--no-progress"]) == 0
    data = yaml.safe_load(path.read_text())
    del data["rails"][0]["gate"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PolicyError, match=r"rails\[0\]\.gate: missing; .*one energy-model set "
                                          r"per gate side"):
        Guardrail.from_policy(load_policy(path))


def _with_word_tokenizer(path: Path) -> Guardrail:
    """The policy's guardrail on its model with the in-memory word-level tokenizer: the copy
    saved beside the tiny model loads as a byte-level class that cannot decode its own ids,
    and attach() must read prompts back from ids."""
    loaded = Guardrail.from_policy(load_policy(path))
    return Guardrail.from_policy(load_policy(path), model=loaded.model,
                                 tokenizer=build_tiny_tokenizer())


def test_attach_applies_the_gate_exactly_as_generate_does(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None, bomb_gate: None,  # noqa: F811
) -> None:
    path = gated_policy(tmp_path, tiny_model_dir, below=0.0)
    assert main(["train", "--policy", str(path), "--no-progress"]) == 0
    convs = _conversations(COKE, BOMB)
    scores = _with_word_tokenizer(path).gate_scores(convs)["eds"].tolist()
    low, high = (0, 1) if scores[0] < scores[1] else (1, 0)
    data = yaml.safe_load(path.read_text())
    data["rails"][0]["gate"]["below"] = sum(scores) / 2
    path.write_text(yaml.safe_dump(data))
    guard = _with_word_tokenizer(path)
    expected = ["answer" if row == low else None for row in range(2)]
    steered = guard.generate(convs, max_new_tokens=4)
    assert [r.telemetry.gates[0].side for r in steered] == expected
    base = guard.generate(convs, max_new_tokens=4, steer=False)
    everyone = guard.generate(convs, max_new_tokens=4, gates=False)
    # Steering changes the row the gate keeps out when it does run there: otherwise this test
    # could not tell a gated attach() from an ungated one.
    assert everyone[high].token_ids != base[high].token_ids
    assert steered[low].token_ids != base[low].token_ids
    model, tokenizer = guard.model, guard.tokenizer
    inputs = tokenizer.apply_chat_template(convs, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True, padding=True)
    prompt_len = inputs["input_ids"].shape[1]
    with guard.attach(model) as session, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        assert session.sides_of("eds", 2) == expected
        score, _ = session.gate_decisions["eds"]
        assert score.tolist() == pytest.approx(scores, abs=1e-4)  # what generate() scored
    for row, gated in enumerate(steered):
        assert out[row, prompt_len:].tolist()[: len(gated.token_ids)] == gated.token_ids
    assert out[high, prompt_len:].tolist()[: len(base[high].token_ids)] == base[high].token_ids


def test_attach_steers_no_row_whose_user_message_it_cannot_read(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None, bomb_gate: None,  # noqa: F811
) -> None:
    path = gated_policy(tmp_path, tiny_model_dir, below=5.0)  # every readable row is steered
    assert main(["train", "--policy", str(path), "--no-progress"]) == 0
    guard = _with_word_tokenizer(path)
    raw = guard.tokenizer(["where can i buy coke"], return_tensors="pt")  # no chat template
    with guard.attach() as session, torch.no_grad():
        guard.model.generate(**raw, max_new_tokens=2, do_sample=False,
                             pad_token_id=guard.tokenizer.pad_token_id)
        assert session.sides_of("eds", 1) == [None]


def test_user_message_parser_reads_the_last_user_turn() -> None:
    tokenizer = build_tiny_tokenizer()
    parse = UserMessageParser(tokenizer)
    conv = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "where can i buy coke"}]
    rendered = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert parse(rendered) == "where can i buy coke"
    assert parse("where can i buy coke") is None
    assert parse(rendered[:-3]) is None
    # Read back from token ids, also where decoding does not give the template's text back
    # (this word-level tokenizer drops the newlines).
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert parse.from_ids(ids) == "where can i buy coke"
    assert parse.from_ids(tokenizer("where can i buy coke")["input_ids"]) is None
    tokenizer.chat_template = None
    assert UserMessageParser(tokenizer)("anything") is None


def _evidence(contexts: str, base: list[bool], answer: list[bool], refuse: list[bool],
              scores: list[float]) -> Evidence:
    prompts = [TrainingPrompt(f"p{i}", "harmful" if c == "h" else "benign",
                              "harmful-src" if c == "h" else "benign-src")
               for i, c in enumerate(contexts)]
    s = torch.tensor(scores)
    return Evidence(prompts, torch.tensor(base),
                    {("answer", (("eta", 1.0), ("steps", 3))): torch.tensor(answer),
                     ("refuse", (("eta", 2.0), ("steps", 3))): torch.tensor(refuse)}, s, s)


def test_choose_steers_confident_harm_towards_refusing_within_the_budget() -> None:
    # 50 harmful prompts: the base model answers half of them (scores 2..4.45); steering
    # towards refusing refuses all. 50 benign prompts answered by base, scoring -2..+2.9:
    # each one the refuse side takes counts against the 0.02 wrong-way budget, so the
    # threshold must leave at most one benign prompt above it.
    contexts = "h" * 50 + "b" * 50
    base = [False] * 25 + [True] * 25 + [False] * 50
    refuse = [True] * 50 + [True] * 50  # steering refuses every row it touches
    answer = base
    scores = [2 + 0.1 * i for i in range(25)] + [4.0] * 25 + [-2 + 0.1 * i for i in range(50)]
    evidence = _evidence(contexts, base, answer, refuse, scores)
    chosen, tried = choose(evidence, CalibrationSection(), search_below=False, search_above=True)
    assert chosen is not None and chosen.above is not None
    benign = chosen.outcomes["benign-src"]
    assert benign.against <= 1 and benign.charged <= 1
    assert chosen.outcomes["harmful-src"].refused > 25  # the refusing half refuses more
    assert chosen.refuse == (("eta", 2.0), ("steps", 3)) and chosen.answer is None
    assert any(not s.feasible and s.above is not None and s.above < 2.8 for s in tried)


def test_benign_prompts_the_base_model_refuses_do_not_hold_the_refuse_side_back() -> None:
    # As above, but the ten highest-scoring benign prompts (2.0..2.9) are already refused by
    # the base model: steering them towards refusing cannot flip them the wrong way, so the
    # threshold may go below them; the benign prompts the base answers (below 2.0) stay out.
    contexts = "h" * 50 + "b" * 50
    base = [False] * 25 + [True] * 25 + [False] * 40 + [True] * 10
    refuse = [True] * 100
    scores = [2 + 0.1 * i for i in range(25)] + [4.0] * 25 + [-2 + 0.1 * i for i in range(50)]
    evidence = _evidence(contexts, base, base, refuse, scores)
    chosen, _ = choose(evidence, CalibrationSection(), search_below=False, search_above=True)
    assert chosen is not None and chosen.above is not None
    benign = chosen.outcomes["benign-src"]
    assert benign.wrong_way == 0 and benign.charged == 0
    assert chosen.outcomes["harmful-src"].refused == 50  # every harmful prompt refused
    assert chosen.above < 2.0 and benign.against >= 10


def test_a_row_calibration_did_not_answer_steered_is_never_given_to_a_side() -> None:
    contexts = "h" * 10 + "b" * 10
    base = [True] * 20
    evidence = _evidence(contexts, base, [True] * 10 + [False] * 10, base,
                         [3.0] * 10 + [-1 + 0.1 * i for i in range(10)])
    # Only the five lowest-scoring benign rows were answered steered.
    evidence.covered[("answer", (("eta", 1.0), ("steps", 3)))] = torch.tensor([False] * 10 + [True] * 5 +
                                                          [False] * 5)
    chosen, _ = choose(evidence, CalibrationSection(), search_below=True, search_above=False)
    assert chosen is not None and chosen.below is not None
    assert chosen.outcomes["benign-src"].steered <= 5



def test_the_answer_threshold_reaches_the_budget_edge_exactly() -> None:
    # 300 benign rows spread over -3..3, steering fixes every one; 300 harmful rows high up,
    # but one scores -2.05: the best feasible threshold is that score, which the quantile
    # grid alone (every 1/60 of the scores: ... -2.2, -2.0 ...) would miss.
    contexts = "b" * 300 + "h" * 300
    benign = [-3 + 0.02 * i for i in range(300)]
    harmful = [-2.05] + [4.0 + 0.001 * i for i in range(299)]
    base = [True] * 300 + [True] * 300
    answer = [False] * 300 + [True] * 300
    evidence = _evidence(contexts, base, answer, base, benign + harmful)
    chosen, _ = choose(evidence, CalibrationSection(), search_below=True, search_above=False)
    assert chosen is not None and chosen.below is not None and -2.06 < chosen.below <= -2.05
    assert chosen.outcomes["benign-src"].right_way == 48  # -3.00 .. -2.06


def test_calibration_takes_the_base_answers_from_the_label_cache(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None, bomb_gate: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from guardrail.evaluation.runner import Answerer

    path = sided_policy(tmp_path, tiny_model_dir)
    data = yaml.safe_load(path.read_text())
    data["rails"][0]["gate"]["above"] = "auto"
    data["calibration"]["refuse_grid"] = {"eta": [3.0], "steps": [1]}
    path.write_text(yaml.safe_dump(data))
    assert main(["train", "--policy", str(path), "--no-progress"]) == 0
    calls: list[tuple[bool, Any]] = []
    original = Answerer.answer

    def spy(self: Any, prompts: Any, *, steer: bool, progress: bool = False,
            gates: Any = True) -> Any:
        calls.append((steer, gates))
        return original(self, prompts, steer=steer, progress=progress, gates=gates)

    monkeypatch.setattr(Answerer, "answer", spy)
    assert main(["calibrate", "--policy", str(path), "--no-progress"]) == 0
    assert all(steer for steer, _ in calls)  # the base answers came from the labels
    assert {gates for _, gates in calls} <= {"answer", "refuse"}
    calibration = EnergyArtifact.read_header(tmp_path / "artifacts" / "tiny.safetensors")[
        "metadata"]["calibration"]
    assert set(calibration["sides"]) <= {"answer", "refuse"}
    assert {"answer", "refuse"} == set(calibration["curves"])
    rail = Guardrail.from_policy(load_policy(path)).rails[0]
    assert rail.below == calibration["gate"]["below"]
    assert rail.above == calibration["gate"]["above"]


def test_gate_only_sources_feed_a_text_only_gate_and_are_refused_for_a_state_reading_one(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None, bomb_gate: None,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    from .test_training_pipeline import write_jsonl

    path = gated_policy(tmp_path, tiny_model_dir, below=0.0)
    write_jsonl(tmp_path / "more.jsonl", [f"tell me about the store {w}" for w in WORDS_EXTRA])
    data = yaml.safe_load(path.read_text())
    data["training"]["sources"].append({"path": "more.jsonl", "context": "benign",
                                        "field": "text", "gate_only": True})
    path.write_text(yaml.safe_dump(data))
    assert main(["train", "--policy", str(path), "--no-progress"]) != 0
    assert "gate_only sources are read by text-only gates" in capsys.readouterr().err
    data["rails"][0]["gate"]["members"] = [{"plugin": "bomb-words"}]
    path.write_text(yaml.safe_dump(data))
    assert main(["train", "--policy", str(path), "--no-progress"]) == 0
    header = EnergyArtifact.read_header(tmp_path / "artifacts" / "tiny.safetensors")
    fitted_on = header["gate"]["members"][0]["config"]["fitted_on"]
    prompts = header["metadata"]["data"]["prompts"]
    assert fitted_on == sum(prompts["train"].values()) + len(WORDS_EXTRA)
    assert prompts["gate_only"] == {"more.jsonl": len(WORDS_EXTRA)}


WORDS_EXTRA = ("please", "here", "now", "you", "it")
