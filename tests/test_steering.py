"""Steered generation on a tiny random model: steering changes states, telemetry, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from guardrail_plugins.gradient_steerer import GradientSteerer, GradientSteererParams
from guardrail_plugins.mlp_energy import MLPEnergyModel, MLPEnergyParams

from guardrail.artifact.energy import EnergyArtifact
from guardrail.errors import ArtifactError, PluginError
from guardrail.models import model_fingerprint
from guardrail.plugin.components import SteerContext
from guardrail.steering.guard import Guardrail

from .conftest import (
    CONVERSATIONS,
    build_tiny_model,
    build_tiny_tokenizer,
    random_artifact,
    tiny_policy,
)


@pytest.fixture
def guard(tiny_loaded, tmp_path: Path) -> Guardrail:  # type: ignore[no-untyped-def]
    path = random_artifact(tiny_loaded).save(tmp_path / "art.safetensors")
    return Guardrail.from_policy(tiny_policy(path), loaded=tiny_loaded)  # type: ignore[arg-type]


def test_unsteered_matches_plain_generate(guard: Guardrail) -> None:
    results = guard.generate(CONVERSATIONS, steer=False)
    texts = guard.render(CONVERSATIONS, steer=False)
    for text, result in zip(texts, results, strict=True):
        enc = guard.encode([text])
        out = guard.model.generate(
            **enc, max_new_tokens=6, do_sample=False, pad_token_id=guard.tokenizer.pad_token_id
        )
        expected = out[0, enc["input_ids"].shape[1] :].tolist()
        eos = guard.tokenizer.eos_token_id
        expected = expected[: expected.index(eos)] if eos in expected else expected
        assert result.token_ids == expected
        assert result.telemetry.steered is False and result.telemetry.layers == []


def test_steering_lowers_energy_and_changes_output(guard: Guardrail) -> None:
    base = guard.generate(CONVERSATIONS, steer=False)
    steered = guard.generate(CONVERSATIONS, steer=True)
    assert [r.token_ids for r in base] != [r.token_ids for r in steered]
    for result in steered:
        tele = result.telemetry
        assert tele.steered and {t.layer for t in tele.layers} == {1, 2}
        for item in tele.layers:
            assert item.energy_after < item.energy_before
            # 3 steps at the prompt, then 3 per fed-back generated token
            assert item.steps == 3 * (1 + item.generated_positions)
            assert (
                item.generated_positions == max(result.telemetry.completion_tokens - 1, 0)
                or result.finish_reason == "stop"
            )


def test_batched_equals_one_by_one(guard: Guardrail) -> None:
    together = guard.generate(CONVERSATIONS, batch_size=3)
    alone = [guard.generate([c], batch_size=1)[0] for c in CONVERSATIONS]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_gate_above_all_energies_steers_nothing(
    guard: Guardrail, tiny_loaded, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    path = random_artifact(tiny_loaded).save(tmp_path / "gate.safetensors")
    gated = Guardrail.from_policy(tiny_policy(path, gate=1e9), loaded=tiny_loaded)  # type: ignore[arg-type]
    base = gated.generate(CONVERSATIONS, steer=False)
    result = gated.generate(CONVERSATIONS)
    assert [r.token_ids for r in base] == [r.token_ids for r in result]
    assert {item.layer for item in result[0].telemetry.layers} == {1, 2}
    for item in result[0].telemetry.layers:
        assert item.steps == 0 and item.steered_positions == 0 and item.gated_positions >= 1


def test_max_displacement_caps_the_move() -> None:
    torch.manual_seed(0)
    energy = MLPEnergyModel(8, MLPEnergyParams(hidden=[8], dropout=0.0)).eval()
    states = torch.randn(4, 8)
    steerer = GradientSteerer(GradientSteererParams(eta=2.0, steps=5, max_displacement=0.5))
    out = steerer.steer(states, energy, SteerContext("r", 0, "prefill"))
    assert torch.all((out.states - states).norm(dim=-1) <= 0.5 + 1e-5)
    assert torch.all(out.energy_after <= out.energy_before)


def test_nonfinite_energy_leaves_rows_unsteered_and_is_logged_once_per_row_and_layer(
    tiny_loaded, tmp_path: Path, capsys  # type: ignore[no-untyped-def]
) -> None:
    path = random_artifact(tiny_loaded, layers=(1,)).save(tmp_path / "e.safetensors")
    guard = Guardrail.from_policy(tiny_policy(path), loaded=tiny_loaded)  # type: ignore[arg-type]
    # Finite weights, but inputs scaled past float range: every energy at layer 1 is NaN.
    guard.rails[0].energies[1].input_std.fill_(1e-45)  # type: ignore[operator]
    base = guard.generate(CONVERSATIONS, steer=False)
    capsys.readouterr()
    steered = guard.generate(CONVERSATIONS)
    assert [r.token_ids for r in base] == [r.token_ids for r in steered]
    for result in steered:
        assert result.telemetry.layers
        item = result.telemetry.layers[0]
        assert item.steps == 0 and item.energy_before is None
        assert item.nonfinite_positions == 1 + item.generated_positions >= 2
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines()
             if "steer.nonfinite_skipped" in line]
    assert len(lines) == len(CONVERSATIONS)  # one per request and layer, not one per token
    assert all("layer=1" in line and "rail=eds" in line for line in lines)


def test_artifact_for_other_model_is_refused(tiny_loaded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other = build_tiny_model(len(build_tiny_tokenizer()), layers=6)
    artifact = random_artifact(tiny_loaded)
    artifact.fingerprint = model_fingerprint(other, "other-model")
    path = artifact.save(tmp_path / "other.safetensors")
    with pytest.raises(
        ArtifactError, match="trained for model 'other-model'.*num_layers: artifact 6 vs model 4"
    ):
        Guardrail.from_policy(tiny_policy(path), loaded=tiny_loaded)  # type: ignore[arg-type]


def test_corrupt_artifact_is_a_clear_error(tiny_loaded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="junk.safetensors: not a readable safetensors file"):
        Guardrail.from_policy(tiny_policy(path), loaded=tiny_loaded)  # type: ignore[arg-type]


def test_artifact_roundtrip_and_header(tiny_loaded, tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    artifact = random_artifact(tiny_loaded)
    artifact.models[1].threshold = 0.25
    path = artifact.save(tmp_path / "a.safetensors")
    header = EnergyArtifact.read_header(path)
    assert header["layers"] == [1, 2] and header["model"]["num_layers"] == 4
    assert header["configs"]["1"]["hidden"] == [16, 8]
    loaded = EnergyArtifact.load(path, registry)
    states = torch.randn(5, tiny_loaded.model.config.hidden_size)
    assert not loaded.models[1].training  # eval mode: no dropout noise while steering
    assert torch.allclose(loaded.models[1].energy(states), artifact.models[1].energy(states))
    assert loaded.models[1].threshold == 0.25
    raw = path.read_bytes()  # safetensors: 8-byte header length, then a JSON header; no pickle
    assert (
        raw[8:9] == b"{" and b"guardrail-energy/1" in raw[: 8 + int.from_bytes(raw[:8], "little")]
    )


def test_steerer_exception_names_plugin(guard: Guardrail) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bad steerer")

    guard.rails[0].steerer.steer = explode  # type: ignore[method-assign]
    with pytest.raises(
        PluginError,
        match="plugin 'gradient-descent' raised in Steerer.steer .*RuntimeError: bad steerer",
    ):
        guard.generate(CONVERSATIONS[:1])


def test_attach_steers_a_users_own_generate(guard: Guardrail) -> None:
    text = guard.render(CONVERSATIONS[:1])
    enc = guard.encode(text)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": guard.tokenizer.pad_token_id}
    plain = guard.model.generate(**enc, **kwargs)
    with guard.attach(guard.model) as session:
        attached = guard.model.generate(**enc, **kwargs)
    assert session.records, "no telemetry recorded while attached"
    steered = guard.generate(CONVERSATIONS[:1])[0]
    new = attached[0, enc["input_ids"].shape[1] :].tolist()
    assert new[: len(steered.token_ids)] == steered.token_ids
    assert not torch.equal(plain, attached)
    after = guard.model.generate(**enc, **kwargs)  # hooks removed on exit
    assert torch.equal(plain, after)


def test_attach_refuses_a_different_model(guard: Guardrail) -> None:
    other = build_tiny_model(len(build_tiny_tokenizer()), layers=6)
    with pytest.raises(ArtifactError, match="num_layers"), guard.attach(other):
        pass


def test_energies_without_generation(guard: Guardrail) -> None:
    rows = guard.energies(CONVERSATIONS)
    assert len(rows) == 3
    steered = guard.generate(CONVERSATIONS)
    for row, result in zip(rows, steered, strict=True):
        assert [m.layer for m in row.layers] == [1, 2]
        assert all(m.energy_before is not None for m in row.layers)
        for measured, item in zip(row.layers, result.telemetry.layers, strict=True):
            assert measured.layer == item.layer
            # Layer 1 sees unsteered input in both; deeper layers see layer 1's steering.
            if item.layer == 1:
                assert measured.energy_before == pytest.approx(item.energy_before, abs=1e-4)


@pytest.mark.parametrize("hidden", [[16], [32, 16, 8]])
def test_mlp_closed_form_gradient_matches_autograd(hidden: list[int]) -> None:
    from guardrail_plugins.mlp_energy import MLPEnergyModel, MLPEnergyParams

    from guardrail.plugin.energy_model import EnergyModel

    torch.manual_seed(0)
    model = MLPEnergyModel(24, MLPEnergyParams(hidden=hidden, dropout=0.2)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
        model.set_standardisation(torch.randn(24), torch.rand(24) + 0.5)
    states = torch.randn(5, 24) * 3
    energy, grad = model.energy_and_grad(states)
    ref_energy, ref_grad = EnergyModel.energy_and_grad(model, states)  # autograd
    assert torch.allclose(energy, ref_energy, atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-5, rtol=1e-4)
    assert grad.abs().sum() > 0
