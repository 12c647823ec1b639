"""Energy-model artifacts checked at load: header fields, tensor shapes, non-finite weights."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from guardrail_plugins.mlp_energy import MLPEnergyModel, MLPEnergyParams
from safetensors.torch import save_file

from guardrail.artifact.energy import HEADER_KEY, EnergyArtifact
from guardrail.cli import main
from guardrail.errors import ArtifactError
from guardrail.models import model_fingerprint
from guardrail.policy.model import parse_policy
from guardrail.steering.guard import Guardrail

from .conftest import write_policy


def _artifact(loaded: Any, layers: tuple[int, ...] = (1, 2)) -> EnergyArtifact:
    torch.manual_seed(0)
    hidden = loaded.model.config.hidden_size
    return EnergyArtifact(
        plugin="mlp", fingerprint=model_fingerprint(loaded.model, loaded.name),
        models={layer: MLPEnergyModel(hidden, MLPEnergyParams(hidden=[16], dropout=0.0)).eval()
                for layer in layers})


def _parts(artifact: EnergyArtifact) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors = {f"layers.{layer}.{key}": value.detach().clone()
               for layer in artifact.layers
               for key, value in artifact.models[layer].tensors().items()}
    return json.loads(json.dumps(artifact.header())), tensors


def _write(path: Path, header: Any, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})
    return path


def _policy(path: Path, layers: Any = "auto") -> Any:
    return parse_policy({
        "name": "tiny", "model": {"source": "unused"}, "generation": {"max_new_tokens": 4},
        "rails": [{"name": "eds", "layers": layers,
                   "energy_model": {"plugin": "mlp", "artifact": str(path)},
                   "steerer": {"plugin": "gradient-descent", "params": {"eta": 5.0}}}]})


def _edit_header(header: dict[str, Any], change: str) -> None:
    if change == "no energy_model":
        del header["energy_model"]
    elif change == "no configs":
        del header["configs"]
    elif change == "layers not a list":
        header["layers"] = "1,2"
    elif change == "layer twice":
        header["layers"] = [1, 1]
    elif change == "config not an object":
        header["configs"]["2"] = [16]
    elif change == "fingerprint field missing":
        del header["model"]["hidden_size"]


HEADER_CASES = [
    ("no energy_model", "header field 'energy_model': missing"),
    ("no configs", "header field 'configs': missing"),
    ("layers not a list", "header field 'layers': got '1,2'"),
    ("layer twice", "header field 'layers': got [1, 1]; expected each layer once"),
    ("config not an object", "header field 'configs.2': got [16]"),
    ("fingerprint field missing", "header field 'model.hidden_size': missing"),
]


@pytest.mark.parametrize(("change", "expected"), HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_bad_header_fields_are_artifact_errors_naming_file_and_field(
    tiny_loaded, tmp_path: Path, registry, change: str, expected: str  # type: ignore[no-untyped-def]
) -> None:
    header, tensors = _parts(_artifact(tiny_loaded))
    _edit_header(header, change)
    path = _write(tmp_path / "bad.safetensors", header, tensors)
    with pytest.raises(ArtifactError) as info:
        EnergyArtifact.load(path, registry)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)
    with pytest.raises(ArtifactError, match=r"tiny: rails\[0\]\.energy_model\.artifact: "):
        Guardrail.from_policy(_policy(path), loaded=tiny_loaded)


def test_tensor_shapes_are_checked_against_the_config(tiny_loaded, tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    header, tensors = _parts(_artifact(tiny_loaded))
    hidden = tiny_loaded.model.config.hidden_size
    tensors["layers.2.net.0.weight"] = torch.zeros(8, hidden)
    path = _write(tmp_path / "shape.safetensors", header, tensors)
    with pytest.raises(ArtifactError) as info:
        EnergyArtifact.load(path, registry)
    assert f"{path}: layer 2: " in str(info.value)
    assert f"tensor 'net.0.weight' has shape [8, {hidden}]; the config needs [16, {hidden}]" \
        in str(info.value)
    # A config that disagrees with its tensors is the same error seen from the other side.
    header, tensors = _parts(_artifact(tiny_loaded))
    header["configs"]["1"]["hidden"] = [12]
    path = _write(tmp_path / "config.safetensors", header, tensors)
    with pytest.raises(ArtifactError, match=r"layer 1: .*tensor 'net.0.weight' has shape "
                                            rf"\[16, {hidden}\]; the config needs \[12, {hidden}\]"):
        EnergyArtifact.load(path, registry)


@pytest.mark.parametrize(("edit", "expected"), [
    ({"hidden_size": 7}, "config field 'hidden_size' is 7 but the header's model has hidden_size"),
    ({"hidden": [10**9]}, "config field 'hidden.0': got 1000000000"),
    ({"hidden": []}, "config field 'hidden': got []"),
    ({"threshold": "high"}, "config field 'threshold': got 'high'"),
    ({"dropout": 2.0}, "config field 'dropout': got 2.0"),
])
def test_bad_layer_configs_name_the_field(tiny_loaded, tmp_path: Path, registry,  # type: ignore[no-untyped-def]
                                          edit: dict[str, Any], expected: str) -> None:
    header, tensors = _parts(_artifact(tiny_loaded))
    header["configs"]["1"].update(edit)
    path = _write(tmp_path / "cfg.safetensors", header, tensors)
    with pytest.raises(ArtifactError) as info:
        EnergyArtifact.load(path, registry)
    assert f"{path}: layer 1: " in str(info.value) and expected in str(info.value)


def test_missing_and_stray_tensors_are_named(tiny_loaded, tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    header, tensors = _parts(_artifact(tiny_loaded))
    del tensors["layers.1.input_std"]
    path = _write(tmp_path / "missing.safetensors", header, tensors)
    with pytest.raises(ArtifactError, match=r"layer 1: .*tensors \['input_std'\] are missing"):
        EnergyArtifact.load(path, registry)
    header, tensors = _parts(_artifact(tiny_loaded))
    tensors["layers.7.net.0.weight"] = torch.zeros(2)
    path = _write(tmp_path / "stray.safetensors", header, tensors)
    with pytest.raises(ArtifactError, match=r"tensors \['layers.7.net.0.weight'\] belong to no "
                                            r"layer in the header's 'layers' \[1, 2\]"):
        EnergyArtifact.load(path, registry)


def test_a_directory_is_not_an_artifact(tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ArtifactError, match="is a directory, not a file"):
        EnergyArtifact.load(tmp_path, registry)


def test_nonfinite_weights_disable_their_layers_with_one_warning(
    tiny_loaded, tmp_path: Path, capsys  # type: ignore[no-untyped-def]
) -> None:
    artifact = _artifact(tiny_loaded)
    with torch.no_grad():
        artifact.models[1].net[0].weight[0, 0] = float("nan")
        artifact.models[1].net[-1].bias.fill_(float("inf"))
    path = artifact.save(tmp_path / "nan.safetensors")
    guard = Guardrail.from_policy(_policy(path), loaded=tiny_loaded)
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if "artifact.nonfinite_weights" in line]
    assert len(warnings) == 1 and "layers=[1]" in warnings[0] and str(path) in warnings[0]
    rail = guard.rails[0]
    assert rail.layers == [2] and list(rail.energies) == [2]
    assert rail.disabled == {1: "non-finite weights in net.0.weight, net.3.bias"}
    result = guard.generate([[{"role": "user", "content": "where can i buy coke"}]])[0]
    assert [item.layer for item in result.telemetry.layers] == [2]
    assert result.telemetry.layers[0].steered_positions >= 1
    # Naming the bad layer explicitly disables it too; naming only bad layers is an error.
    assert Guardrail.from_policy(_policy(path, [1, 2]), loaded=tiny_loaded).rails[0].layers == [2]
    with pytest.raises(ArtifactError, match=r"every layer the rail steers is disabled \(1: "
                                            "non-finite weights"):
        Guardrail.from_policy(_policy(path, [1]), loaded=tiny_loaded)


def test_an_artifact_with_no_finite_layer_is_an_error(tiny_loaded, tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    artifact = _artifact(tiny_loaded, layers=(1,))
    with torch.no_grad():
        artifact.models[1].input_mean.fill_(float("nan"))
    path = artifact.save(tmp_path / "nan.safetensors")
    with pytest.raises(ArtifactError, match=r"every layer \(\[1\]\) has non-finite"):
        EnergyArtifact.load(path, registry)


def test_generate_compare_says_which_layers_are_skipped_or_disabled(
    tiny_loaded, tiny_model_dir: Path, tmp_path: Path, capsys  # type: ignore[no-untyped-def]
) -> None:
    artifact = _artifact(tiny_loaded, layers=(1, 2, 3))
    with torch.no_grad():
        artifact.models[3].net[0].weight.fill_(float("nan"))
        # Finite weights, but inputs scaled past float range: every energy at layer 2 is NaN.
        artifact.models[2].input_std.fill_(1e-45)
    path = artifact.save(tmp_path / "mixed.safetensors")
    policy = write_policy(tmp_path / "p.yaml", {
        "name": "tiny", "model": {"source": str(tiny_model_dir)},
        "generation": {"max_new_tokens": 3},
        "rails": [{"name": "eds", "energy_model": {"plugin": "mlp", "artifact": str(path)}}]})
    capsys.readouterr()
    assert main(["generate", "--compare", "--policy", str(policy), "where can i buy coke"]) == 0
    captured = capsys.readouterr()
    energy = next(line for line in captured.out.splitlines() if line.startswith("ENERGY"))
    assert "(no energy model)" not in energy
    assert "L1 " in energy and "->" in energy.split("L2")[0]
    assert re.search(r"L2 skipped at \d+ positions? \(non-finite energy\)", energy), energy
    assert "L3 disabled (non-finite weights in net.0.weight)" in energy
    skipped = [line for line in captured.err.splitlines() if "steer.nonfinite_skipped" in line]
    assert len(skipped) == 1 and "layer=2" in skipped[0]  # one request, one bad layer


# --- the fingerprint an artifact must match -------------------------------------------------
def test_a_config_that_only_reads_differently_still_fits(tiny_loaded, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                         registry) -> None:
    # Another transformers release writes the same architecture's config with other keys
    # (rope_scaling -> rope_parameters): its raw-config hash differs, the artifact still fits.
    artifact = _artifact(tiny_loaded)
    artifact.fingerprint = {**artifact.fingerprint, "config_sha256": "0" * 64}
    path = artifact.save(tmp_path / "a.safetensors")
    guard = Guardrail.from_policy(_policy(path), loaded=tiny_loaded)
    assert guard.fingerprint["tokenizer_sha256"]  # recorded from the loaded tokenizer
    assert guard.rails[0].layers == [1, 2]


@pytest.mark.parametrize(("key", "value"), [
    ("vocab_size", 99), ("intermediate_size", 65), ("num_attention_heads", 8),
    ("num_key_value_heads", 4), ("tokenizer_sha256", "f" * 64), ("num_layers", 5),
    ("model_type", "llama")])
def test_an_artifact_for_another_architecture_or_vocabulary_is_refused_naming_the_field(  # type: ignore[no-untyped-def]
        tiny_loaded, tmp_path: Path, key: str, value: Any) -> None:
    artifact = _artifact(tiny_loaded)
    artifact.fingerprint = {**artifact.fingerprint, "tokenizer_sha256": "0" * 64
                            if key != "tokenizer_sha256" else value, key: value}
    if key != "tokenizer_sha256":  # recorded as the loaded tokenizer's, so only `key` differs
        from guardrail.models.fingerprint import tokenizer_digest

        artifact.fingerprint["tokenizer_sha256"] = tokenizer_digest(tiny_loaded.tokenizer)
    path = artifact.save(tmp_path / "a.safetensors")
    with pytest.raises(ArtifactError) as caught:
        Guardrail.from_policy(_policy(path), loaded=tiny_loaded)
    message = str(caught.value)
    assert f"{key}: artifact {value!r} vs model" in message
    assert message.count(" vs model ") == 1


def test_an_artifact_written_before_the_wider_fingerprint_still_loads(  # type: ignore[no-untyped-def]
        tiny_loaded, tmp_path: Path, registry) -> None:
    # Format 1 headers recorded name, model_type, hidden_size, num_layers and config_sha256.
    header, tensors = _parts(_artifact(tiny_loaded))
    header["model"] = {key: header["model"][key] for key in
                       ("name", "model_type", "hidden_size", "num_layers")}
    header["model"]["config_sha256"] = "from another transformers release"
    path = _write(tmp_path / "old.safetensors", header, tensors)
    assert Guardrail.from_policy(_policy(path), loaded=tiny_loaded).rails[0].layers == [1, 2]
    header["model"]["hidden_size"] = 64
    path = _write(tmp_path / "wrong.safetensors", header, tensors)
    with pytest.raises(ArtifactError, match="hidden_size"):
        Guardrail.from_policy(_policy(path), loaded=tiny_loaded)
