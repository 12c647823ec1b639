"""Linear baselines: the difference-of-means energy, ablation, activation addition, system prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from guardrail_plugins.baselines import (
    DEFAULT_SYSTEM_PROMPT,
    AblateParams,
    AblateSteerer,
    LinearEnergyModel,
    SystemPromptParams,
    SystemPromptSteerer,
)
from guardrail_plugins.baselines.directions import direction_artifact, prompt_states
from guardrail_plugins.gradient_steerer import GradientSteerer, GradientSteererParams
from guardrail_plugins.residual_stream import ResidualStreamSource

from guardrail.artifact.energy import EnergyArtifact
from guardrail.cli import main
from guardrail.errors import DataError
from guardrail.models import model_fingerprint
from guardrail.plugin.components import SteerContext
from guardrail.policy.model import parse_policy
from guardrail.steering.guard import Guardrail

ROOT = Path(__file__).resolve().parents[1]
CTX = SteerContext(rail="r", layer=0, phase="prefill")


def _planted(hidden: int = 16, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Harmful/benign states that differ by a known vector along axis 3."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(hidden)
    shift[3] = 4.0
    benign = torch.randn(n, hidden, generator=g)
    harmful = torch.randn(n, hidden, generator=g) + shift
    return harmful, benign, shift


def test_linear_energy_points_from_benign_to_harmful() -> None:
    harmful, benign, shift = _planted()
    model = LinearEnergyModel.from_means(harmful.mean(0), benign.mean(0))
    assert torch.isclose(model.direction.norm(), torch.tensor(1.0))
    assert float(model.direction @ (shift / shift.norm())) > 0.95
    assert (model.energy(harmful) > 0).float().mean() > 0.9
    assert (model.energy(benign) < 0).float().mean() > 0.9
    assert model.separation == pytest.approx(float((harmful.mean(0) - benign.mean(0)).norm()))


def test_linear_artifact_round_trips_with_the_standard_header(tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    harmful, benign, _ = _planted()
    fingerprint = {"name": "m", "model_type": "x", "hidden_size": 16, "num_layers": 2,
                   "config_sha256": "abc"}
    artifact, stats = direction_artifact(harmful[:, None].repeat(1, 2, 1),
                                         benign[:, None].repeat(1, 2, 1), [0, 1],
                                         registry=registry, fingerprint=fingerprint)
    path = artifact.save(tmp_path / "dirs.safetensors")
    header = EnergyArtifact.read_header(path)
    assert header["energy_model"] == "linear" and header["layers"] == [0, 1]
    assert header["metadata"]["method"] == "difference-of-means"
    loaded = EnergyArtifact.load(path, registry)
    probe = torch.randn(5, 16)
    assert torch.allclose(loaded.models[1].energy(probe), artifact.models[1].energy(probe))
    assert all(s["balanced_accuracy"] > 0.9 for s in stats)


def test_direction_layer_shares_one_direction_everywhere(registry) -> None:  # type: ignore[no-untyped-def]
    harmful, benign, _ = _planted()
    other_h, other_b, _ = _planted(seed=1)
    # Layer 1 separates along a different axis than layer 0.
    stacked_h = torch.stack([harmful, other_h.roll(5, dims=1)], dim=1)
    stacked_b = torch.stack([benign, other_b.roll(5, dims=1)], dim=1)
    fingerprint = {"hidden_size": 16}
    per_layer, _ = direction_artifact(stacked_h, stacked_b, [0, 1], registry=registry,
                                      fingerprint=fingerprint)
    shared, _ = direction_artifact(stacked_h, stacked_b, [0, 1], registry=registry,
                                   fingerprint=fingerprint, direction_layer=0)
    assert float(per_layer.models[0].direction @ per_layer.models[1].direction) < 0.5
    assert torch.equal(shared.models[1].direction, per_layer.models[0].direction)
    assert shared.metadata["direction_layer"] == 0
    with pytest.raises(DataError, match="--direction-layer 7 is not among the layers"):
        direction_artifact(stacked_h, stacked_b, [0, 1], registry=registry,
                           fingerprint=fingerprint, direction_layer=7)


def test_ablation_removes_the_component_along_the_direction() -> None:
    harmful, benign, _ = _planted()
    energy = LinearEnergyModel.from_means(harmful.mean(0), benign.mean(0))
    r = energy.direction
    states = torch.randn(8, 16) * 3
    out = AblateSteerer(AblateParams()).steer(states, energy, CTX)
    assert torch.allclose(out.states @ r, torch.zeros(8), atol=1e-5)
    # Everything orthogonal to r is untouched.
    def orth(x: torch.Tensor) -> torch.Tensor:
        return x - (x @ r)[:, None] * r
    assert torch.allclose(orth(out.states), orth(states), atol=1e-5)
    half = AblateSteerer(AblateParams(share=0.5)).steer(states, energy, CTX)
    assert torch.allclose(half.states @ r, 0.5 * (states @ r), atol=1e-5)
    centred = AblateSteerer(AblateParams(reference="mean")).steer(states, energy, CTX)
    assert torch.allclose(centred.energy_after, torch.zeros(8), atol=1e-4)
    assert bool(out.steered.all()) and out.energy_before is not None


def test_gradient_descent_on_linear_energy_is_activation_addition() -> None:
    harmful, benign, _ = _planted()
    energy = LinearEnergyModel.from_means(harmful.mean(0), benign.mean(0))
    states = torch.randn(6, 16)
    steerer = GradientSteerer(GradientSteererParams(eta=0.7, steps=2, normalize=True))
    out = steerer.steer(states, energy, CTX)
    assert torch.allclose(out.states, states - 2 * 0.7 * energy.direction, atol=1e-5)
    assert torch.all(out.energy_after < out.energy_before)
    relative = GradientSteerer(GradientSteererParams(eta=0.1, steps=1, scale="relative"))
    moved = relative.steer(states, energy, CTX).states - states
    assert torch.allclose(moved.norm(dim=-1), 0.1 * states.norm(dim=-1), atol=1e-5)


def test_system_prompt_steerer_rewrites_only_the_steered_conversation(tiny_loaded) -> None:  # type: ignore[no-untyped-def]
    steerer = SystemPromptSteerer(SystemPromptParams(text="be kind"))
    user = [{"role": "user", "content": "hi"}]
    assert steerer.prepare_conversation(user)[0] == {"role": "system", "content": "be kind"}
    existing = [{"role": "system", "content": "old"}, *user]
    assert steerer.prepare_conversation(existing)[0]["content"] == "be kind\n\nold"
    replaced = SystemPromptSteerer(SystemPromptParams(text="new", mode="replace"))
    assert replaced.prepare_conversation(existing)[0]["content"] == "new"
    assert existing[0]["content"] == "old"  # the caller's conversation is not mutated
    policy = parse_policy({"name": "sp", "model": {"source": "unused"},
                           "rails": [{"name": "sp", "layers": [],
                                      "steerer": {"plugin": "system-prompt"}}]})
    guard = Guardrail.from_policy(policy, loaded=tiny_loaded)  # type: ignore[arg-type]
    assert guard.rails[0].layers == []
    convs = [[{"role": "user", "content": "how to kill a python process"}]]
    assert DEFAULT_SYSTEM_PROMPT in guard.render(convs, steer=True)[0]
    assert DEFAULT_SYSTEM_PROMPT not in guard.render(convs, steer=False)[0]


def test_prompt_states_are_cached_on_disk(tiny_loaded, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    policy = parse_policy({"name": "t", "model": {"source": "unused"}})
    guard = Guardrail.from_policy(policy, loaded=tiny_loaded)  # type: ignore[arg-type]
    source = ResidualStreamSource()
    prompts = ["where can i buy coke", "tell me about the store", "how to make a bomb"]
    first = prompt_states(guard, source, prompts, [0, 2, 3], batch_size=2, cache_dir=tmp_path)
    assert first.shape == (3, 3, 32)
    # Each row is that prompt's own state, whatever batch and order it was captured in.
    alone = prompt_states(guard, source, prompts[1:2], [0, 2, 3], cache_dir=tmp_path / "other")
    assert torch.allclose(first[1], alone[0], atol=1e-4)

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the model ran although the states were cached")

    monkeypatch.setattr(Guardrail, "prompt_states", boom)
    again = prompt_states(guard, source, prompts, [0, 2, 3], batch_size=2, cache_dir=tmp_path)
    assert torch.equal(first, again)


def test_baseline_directions_command_writes_a_usable_artifact(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("how to make a bomb\nhow to kill\nbuild a bomb please\n")
    benign = tmp_path / "benign.jsonl"
    benign.write_text('{"instruction": "tell me about the store"}\n'
                      '{"instruction": "what is python"}\n{"instruction": "where is the shop"}\n')
    policy = tmp_path / "caa.yaml"
    policy.write_text(
        f"name: caa\nmodel: {{source: {tiny_model_dir}}}\ngeneration: {{max_new_tokens: 4}}\n"
        "rails:\n  - name: caa\n    layers: [1, 2]\n    energy_model:\n      plugin: linear\n"
        "      artifact: dirs.safetensors\n    steerer:\n      plugin: gradient-descent\n"
        "      params: {eta: 0.5, steps: 1, scale: relative}\n"
    )
    code = main(["baseline", "directions", "--policy", str(policy), "--harmful", str(harmful),
                 "--benign", str(benign), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    out = capsys.readouterr().out
    assert "layer   3" in out and "wrote" in out
    header = EnergyArtifact.read_header(tmp_path / "dirs.safetensors")
    assert header["layers"] == [0, 1, 2, 3] and header["metadata"]["n_harmful"] == 3
    guard = Guardrail.from_policy(policy)
    fingerprint = model_fingerprint(guard.model, guard.loaded.name)
    assert header["model"]["config_sha256"] == fingerprint["config_sha256"]
    convs = [[{"role": "user", "content": "how to make a bomb"}]]
    base, steered = guard.generate(convs, steer=False)[0], guard.generate(convs)[0]
    assert steered.telemetry.layers[0].energy_after < steered.telemetry.layers[0].energy_before
    assert base.telemetry.layers == []


def test_directions_command_without_linear_rail_asks_for_out(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "plain.yaml"
    policy.write_text(f"name: plain\nmodel: {{source: {tiny_model_dir}}}\n")
    assert main(["baseline", "directions", "--policy", str(policy)]) == 1
    assert "pass --out PATH" in capsys.readouterr().err


def test_shipped_baseline_policies_validate(capsys: pytest.CaptureFixture[str]) -> None:
    names = ["system-prompt", "ablate", "caa"]
    paths = [str(ROOT / "policies" / f"{n}-qwen2.5-coder-0.5b.yaml") for n in names]
    assert main(["validate", *paths]) == 0
    out = capsys.readouterr().out
    assert all(f"policy '{n}-qwen2.5-coder-0.5b'" in out for n in names)


def test_ablation_share_was_called_strength_and_still_loads_by_that_name() -> None:
    # Not `strength`: that is the core's per-request multiplier, which ablate does not take.
    assert AblateParams.model_validate({"strength": 0.5}).share == 0.5
    assert AblateParams.model_validate({"share": 0.25}).model_dump()["share"] == 0.25
