"""Bring your own model: from_policy(model=, tokenizer=), attach() and padding, stream()."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from guardrail.errors import GuardrailError
from guardrail.models import model_fingerprint
from guardrail.steering.guard import Guardrail
from guardrail.steering.streams import PaddingError

from .conftest import (
    CONVERSATIONS,
    build_tiny_model,
    build_tiny_tokenizer,
    random_artifact,
    tiny_policy,
)


class _Own:
    """A model and tokenizer as a user would have them: right padding, no changes by us."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.tokenizer = build_tiny_tokenizer()
        self.tokenizer.padding_side = "right"
        self.model = build_tiny_model(len(self.tokenizer)).to(dtype)


@pytest.fixture
def own() -> _Own:
    return _Own()


def _guard(own: _Own, tmp_path: Path, **steerer: object) -> Guardrail:
    class Loaded:  # what random_artifact reads: a model and its name
        model = own.model
        name = "tiny"

    artifact = random_artifact(Loaded).save(tmp_path / "own.safetensors")
    return Guardrail.from_policy(tiny_policy(artifact, **steerer), model=own.model,  # type: ignore[arg-type]
                                 tokenizer=own.tokenizer)


def test_own_model_is_wrapped_as_it_is(own: _Own, tmp_path: Path) -> None:
    before = copy.deepcopy(own.model.state_dict())
    guard = _guard(own, tmp_path)
    assert guard.model is own.model and guard.tokenizer is own.tokenizer
    results = guard.generate(CONVERSATIONS, max_new_tokens=4)
    assert [len(r.telemetry.layers) for r in results] == [2, 2, 2]
    # 3 steps at the prompt and at each of the 3 generated tokens after the first
    assert all(item.steps == 3 * 4 for r in results for item in r.telemetry.layers)
    # Batched generation padded on the left although the tokenizer pads right; nothing changed.
    assert own.tokenizer.padding_side == "right"
    assert all(torch.equal(v, before[k]) for k, v in own.model.state_dict().items())


def test_own_model_in_bfloat16(tmp_path: Path) -> None:
    own = _Own(torch.bfloat16)
    guard = _guard(own, tmp_path)
    assert guard.loaded.dtype is torch.bfloat16
    [result] = guard.generate(CONVERSATIONS[:1], max_new_tokens=4)
    assert result.telemetry.layers and all(
        item.energy_before is not None and item.energy_after is not None
        for item in result.telemetry.layers)
    assert next(own.model.parameters()).dtype is torch.bfloat16


def test_own_quantised_model(tmp_path: Path) -> None:
    own = _Own()
    quantized = torch.ao.quantization.quantize_dynamic(own.model, {torch.nn.Linear},
                                                       dtype=torch.qint8)
    assert quantized is not own.model
    own.model = quantized
    guard = _guard(own, tmp_path)
    [result] = guard.generate(CONVERSATIONS[:1], max_new_tokens=4)
    assert {item.layer for item in result.telemetry.layers} == {1, 2}
    # 3 steps at the prompt and at each of the 3 generated tokens after the first
    assert all(item.steps == 3 * 4 for item in result.telemetry.layers)


def test_own_model_needs_its_tokenizer_and_a_causal_lm(own: _Own, tmp_path: Path) -> None:
    artifact = random_artifact(type("L", (), {"model": own.model, "name": "t"})).save(
        tmp_path / "a.safetensors")
    with pytest.raises(GuardrailError, match="tokenizer=: got NoneType"):
        Guardrail.from_policy(tiny_policy(artifact), model=own.model)  # type: ignore[arg-type]
    with pytest.raises(GuardrailError, match="model=: got Linear; expected a Hugging Face"):
        Guardrail.from_policy(tiny_policy(artifact), model=torch.nn.Linear(2, 2),  # type: ignore[arg-type]
                              tokenizer=own.tokenizer)


def test_attach_steers_a_left_padded_generate(own: _Own, tmp_path: Path) -> None:
    guard = _guard(own, tmp_path)
    texts = guard.render(CONVERSATIONS[:2])
    inputs = own.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                           add_special_tokens=False)
    with guard.attach(own.model) as session:
        own.model.generate(**inputs, max_new_tokens=3, do_sample=False,
                           pad_token_id=own.tokenizer.pad_token_id)
    [row_a, row_b] = session.telemetry([3, 3])
    # Each row was steered at its own last prompt token: the same energies generate() reports,
    # before and after the step (a measure-only attach() would leave them equal).
    results = guard.generate(CONVERSATIONS[:2], max_new_tokens=3, batch_size=2)
    for row, result in zip((row_a, row_b), results, strict=True):
        assert [i.energy_before for i in row] == pytest.approx(
            [i.energy_before for i in result.telemetry.layers], abs=1e-4)
        assert [i.energy_after for i in row] == pytest.approx(
            [i.energy_after for i in result.telemetry.layers], abs=1e-4)
        assert any(i.steps > 0 and i.energy_after < i.energy_before for i in row), row


def test_attach_refuses_a_right_padded_batch(own: _Own, tmp_path: Path) -> None:
    guard = _guard(own, tmp_path)
    texts = guard.render(CONVERSATIONS[:2])
    inputs = own.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert inputs["attention_mask"][:, -1].tolist().count(0) == 1  # one row is right-padded
    with pytest.raises(PaddingError, match=r"rows \[\d\] of the batch are right-padded.*"
                                           r"padding_side='left'"), guard.attach(own.model):
        own.model.generate(**inputs, max_new_tokens=2, pad_token_id=own.tokenizer.pad_token_id)
    # The hooks are gone afterwards: the model runs unsteered and unchecked.
    own.model.generate(**inputs, max_new_tokens=1, pad_token_id=own.tokenizer.pad_token_id)


def test_attach_checks_another_model_object_is_the_same_architecture(
    own: _Own, tmp_path: Path
) -> None:
    guard = _guard(own, tmp_path)
    other = build_tiny_model(len(own.tokenizer), layers=3)
    assert model_fingerprint(other, "x")["num_layers"] == 3
    with pytest.raises(GuardrailError, match="num_layers: artifact 4 vs model 3"), \
            guard.attach(other):
        pass


def test_stream_yields_the_answer_then_its_result(own: _Own, tmp_path: Path) -> None:
    guard = _guard(own, tmp_path)
    stream = guard.stream(CONVERSATIONS[0], max_new_tokens=5)
    pieces = list(stream)
    assert stream.result is not None
    assert "".join(pieces).strip() == stream.result.text.strip()
    assert stream.result.telemetry.layers and stream.result.telemetry.steered
    assert list(stream) == []  # consumed once
    [batch] = guard.generate(CONVERSATIONS[:1], max_new_tokens=5)
    assert stream.result.token_ids == batch.token_ids


def test_generation_overrides_are_checked(own: _Own, tmp_path: Path) -> None:
    guard = _guard(own, tmp_path)
    with pytest.raises(GuardrailError, match=r"generation settings \['num_beams'\] are not "
                                             r"supported; expected any of max_new_tokens"):
        guard.generate(CONVERSATIONS[:1], num_beams=4)
    with pytest.raises(GuardrailError, match="max_new_tokens: got 0"):
        guard.generate(CONVERSATIONS[:1], max_new_tokens=0)
    with pytest.raises(GuardrailError, match="num_beams"):
        guard.stream(CONVERSATIONS[0], num_beams=4)
