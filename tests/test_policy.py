"""Policy files: schema, every error at once with key paths, extends, plugin params, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from guardrail.cli import main
from guardrail.errors import PolicyError
from guardrail.policy import load_policy, missing_artifacts, validate_policy_file

from .conftest import write_policy

ROOT = Path(__file__).resolve().parents[1]


def _policy(**extra: object) -> dict:
    base: dict = {"name": "p", "model": {"source": "smollm2-135m-instruct"}}
    base.update(extra)
    return base


def test_shipped_policies_validate(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in (ROOT / "policies").glob("*.yaml"))
    assert files, "policies/ ships no policy files"
    code = main(["validate", *files])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.count("ok ") == len(files)


def test_every_error_reported_with_key_path_and_value(tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    path = write_policy(
        tmp_path / "bad.yaml",
        _policy(
            generation={"max_new_tokens": -3, "temprature": 0.5},
            rails=[
                {
                    "name": "r",
                    "steerer": {
                        "plugin": "gradient-descent",
                        "params": {"eta": "fast", "stepz": 2},
                    },
                    "energy_model": {"plugin": "mlp", "artifact": "missing.safetensors"},
                }
            ],
        ),
    )
    with pytest.raises(PolicyError) as info:
        validate_policy_file(path, registry)
    text = str(info.value)
    assert str(path) in text
    assert "generation.max_new_tokens: got -3" in text
    assert "generation.temprature: unknown key" in text
    # Schema errors come first; plugin-level errors need a schema-valid file, checked below.
    path.write_text(
        json.dumps(
            _policy(
                rails=[
                    {
                        "name": "r",
                        "steerer": {
                            "plugin": "gradient-descent",
                            "params": {"eta": "fast", "stepz": 2},
                        },
                        "energy_model": {"plugin": "mlp", "artifact": "missing.safetensors"},
                    }
                ]
            )
        )
    )
    with pytest.raises(PolicyError) as info:
        validate_policy_file(path, registry)
    text = str(info.value)
    assert "rails[0].steerer.params.eta: got 'fast'" in text
    assert "rails[0].steerer.params.stepz: unknown key" in text
    policy = load_policy(path)
    assert missing_artifacts(policy) == [
        f"rails[0].energy_model.artifact: {tmp_path / 'missing.safetensors'} does not exist yet; "
        "train it with `guardrail train` from a policy with a `training:` section"
    ]


def test_missing_artifacts_name_the_command_that_writes_them(tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    shipped = load_policy(ROOT / "policies" / "eds-qwen2.5-coder-0.5b.yaml")
    caa = load_policy(ROOT / "policies" / "caa-qwen2.5-coder-0.5b.yaml")
    for policy, command in ((shipped, "guardrail train --policy"),
                            (caa, "guardrail baseline directions --policy")):
        rails = [r.model_copy(update={"energy_model": r.energy_model.model_copy(
            update={"artifact": str(tmp_path / "gone.safetensors")})}) for r in policy.rails]
        notes = missing_artifacts(policy.model_copy(update={"rails": rails}), registry)
        assert len(notes) == 1 and f"`{command} {policy.path}`" in notes[0], notes


def test_unknown_plugin_names_registered_ones(tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    path = write_policy(tmp_path / "p.yaml", _policy(classifier={"plugin": "gpt-judge"}))
    with pytest.raises(
        PolicyError,
        match=r"classifier.plugin: got 'gpt-judge'; unknown refusal_classifier 'gpt-judge'; registered: heuristic",
    ):
        validate_policy_file(path, registry)


def test_extends_merges_and_resolves_paths_per_file(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    write_policy(
        tmp_path / "base" / "base.yaml",
        _policy(
            generation={"max_new_tokens": 10, "batch_size": 2},
            rails=[{"name": "r", "energy_model": {"artifact": "art.safetensors"}}],
        ),
    )
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump(
            {"extends": "base/base.yaml", "name": "child", "generation": {"max_new_tokens": 20}}
        )
    )
    policy = load_policy(child)
    assert policy.name == "child"
    assert policy.generation.max_new_tokens == 20 and policy.generation.batch_size == 2
    assert policy.rails[0].energy_model is not None
    assert policy.rails[0].energy_model.artifact == str(tmp_path / "base" / "art.safetensors")


def test_extends_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(PolicyError, match="extends: cycle"):
        load_policy(tmp_path / "a.yaml")


def test_env_expansion_in_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ART_DIR", str(tmp_path / "arts"))
    path = write_policy(
        tmp_path / "p.yaml",
        _policy(rails=[{"name": "r", "energy_model": {"artifact": "${ART_DIR}/x.safetensors"}}]),
    )
    assert load_policy(path).rails[0].energy_model.artifact == str(
        tmp_path / "arts" / "x.safetensors"
    )  # type: ignore[union-attr]


def test_validate_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_policy(tmp_path / "good.yaml", _policy())
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nmodel: {source: y}\nrails: [{name: r, layers: [1, -2], steerer: {plugin: nope}}]\n"
    )
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "rails[0].steerer.plugin: got 'nope'" in err
    assert "rails[0].layers: got [1, -2]" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    assert main(["validate", str(broken)]) == 1
    assert "not valid YAML" in capsys.readouterr().err


def test_schema_command_prints_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "Policy"
    assert {"model", "rails", "classifier", "generation"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
