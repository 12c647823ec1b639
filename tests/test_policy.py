"""Policy files: schema, every error at once with key paths, extends, plugin params, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from guardrail.cli import main
from guardrail.errors import PolicyError
from guardrail.policy.artifacts import missing_artifacts, validate_policy_file
from guardrail.policy.checks import check_plugins
from guardrail.policy.model import load_policy

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


def test_an_installed_shipped_policy_is_never_told_to_write_into_the_package(  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], registry) -> None:
    # As installed from the wheel: the shipped folder is site-packages, not a checkout.
    monkeypatch.setattr("guardrail.policy.shipped.is_checkout", lambda: False)
    caa = load_policy("caa-qwen2.5-coder-0.5b")
    [note] = missing_artifacts(caa, registry)
    assert str(caa.path) not in note.split("does not exist yet", 1)[1]
    assert ("make one of your own first: `guardrail policy init my-policy.yaml --extends "
            "caa-qwen2.5-coder-0.5b`, set its rails[0] (name 'caa') energy_model.artifact to a "
            "file of yours, then compute it with `guardrail baseline directions --policy "
            "my-policy.yaml`") in note
    assert main(["validate", "caa-qwen2.5-coder-0.5b"]) == 0
    assert "guardrail policy init my-policy.yaml" in capsys.readouterr().out


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


# --- extends: rails merge by name -----------------------------------------------------------
def _rail(name: str, **extra: object) -> dict:
    return {"name": name, "energy_model": {"plugin": "mlp", "artifact": f"{name}.safetensors",
                                           "params": {"hidden": [8, 4], "dropout": 0.3}},
            "activation_source": {"plugin": "residual-stream",
                                  "params": {"prompt_positions": "last", "generated": False}},
            **extra}


def _family(tmp_path: Path, child: dict) -> Path:
    write_policy(tmp_path / "parent.yaml", _policy(rails=[_rail("a"), _rail("b")]))
    return write_policy(tmp_path / "child.yaml", {"extends": "parent.yaml", "name": "c", **child})


def test_extends_deep_merges_a_rail_of_the_same_name(tmp_path: Path) -> None:
    child = _family(tmp_path, {"rails": [
        {"name": "a", "energy_model": {"artifact": "mine.safetensors"},
         "steerer": {"params": {"eta": 0.5}}}]})
    policy = load_policy(child)
    assert [r.name for r in policy.rails] == ["a", "b"]
    a = policy.rails[0]
    assert a.energy_model is not None
    assert a.energy_model.artifact == str(tmp_path / "mine.safetensors")
    # What the child does not say stays as the parent had it.
    assert a.energy_model.params == {"hidden": [8, 4], "dropout": 0.3}
    assert a.activation_source.params == {"prompt_positions": "last", "generated": False}
    assert a.steerer.params == {"eta": 0.5}


def test_extends_appends_new_rails_and_enabled_false_drops_one(tmp_path: Path) -> None:
    child = _family(tmp_path, {"rails": [{"name": "b", "enabled": False}, _rail("z")]})
    assert [r.name for r in load_policy(child).rails] == ["a", "z"]


def test_extends_replaces_other_lists(tmp_path: Path) -> None:
    child = _family(tmp_path, {"rails": [{"name": "a", "energy_model": {
        "params": {"hidden": [16]}}}]})
    assert load_policy(child).rails[0].energy_model.params["hidden"] == [16]  # type: ignore[union-attr]


def test_extends_replaces_a_component_whole_when_the_child_names_another_plugin(
    tmp_path: Path, registry: object,
) -> None:
    # The shipped gated policy, its steerer swapped for another plugin: the parent's
    # gradient-descent params (normalize) are not inherited, the gate and the rest are kept.
    child = write_policy(tmp_path / "child.yaml", {
        "extends": "eds-smollm2-135m", "name": "swapped",
        "rails": [{"name": "eds", "steerer": {"plugin": "ablate"},
                   "energy_model": {"plugin": "linear", "artifact": "dirs.safetensors"}}],
        "classifier": {"plugin": "openai-judge",
                       "params": {"base_url": "http://127.0.0.1:9/v1", "model": "j"}}})
    policy = load_policy(child)
    parent = load_policy("eds-smollm2-135m")
    rail = policy.rails[0]
    assert rail.steerer.plugin == "ablate" and rail.steerer.params == {}
    assert rail.energy_model is not None and rail.energy_model.params == {}
    assert rail.energy_model.artifact == str(tmp_path / "dirs.safetensors")
    assert rail.gate == parent.rails[0].gate
    assert policy.classifier.params == {"base_url": "http://127.0.0.1:9/v1", "model": "j"}
    # Nor its calibration grids, which name gradient-descent's knobs (ablate has others).
    assert parent.calibration is not None and parent.calibration.grid
    assert policy.calibration is not None and policy.calibration.grid == {}
    assert policy.calibration.max_wrong_way == parent.calibration.max_wrong_way
    assert check_plugins(policy, registry) == []
    # The same plugin still merges params key by key.
    same = write_policy(tmp_path / "same.yaml", {
        "extends": "eds-smollm2-135m", "name": "same",
        "rails": [{"name": "eds", "steerer": {"plugin": "gradient-descent",
                                              "params": {"eta": 0.5}}}]})
    assert load_policy(same).rails[0].steerer.params == {"normalize": True, "eta": 0.5}


def test_the_own_prompts_example_of_the_training_docs_keeps_the_rail(tmp_path: Path) -> None:
    # docs/training.md: a child naming only the rail's artifact must not change the rail.
    text = (ROOT / "docs" / "training.md").read_text()
    block = text.split("### Your own prompts", 1)[1].split("cat > my-policy.yaml <<'EOF'\n", 1)[1]
    yaml_text = block.split("\nEOF", 1)[0]
    (tmp_path / "my_benign.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "my_harmful.jsonl").write_text('{"text": "ho"}\n')
    mine = load_policy(write_text(tmp_path / "my-policy.yaml", yaml_text))
    shipped = load_policy("eds-qwen2.5-coder-0.5b")
    ours, theirs = mine.rails[0], shipped.rails[0]
    assert ours.energy_model is not None and theirs.energy_model is not None
    assert ours.energy_model.artifact == str(tmp_path / "artifacts" / "my-eds.safetensors")
    assert ours.energy_model.params == theirs.energy_model.params
    assert ours.activation_source == theirs.activation_source
    assert ours.steerer == theirs.steerer


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_extends_and_policy_arguments_take_shipped_names(tmp_path: Path) -> None:
    child = write_text(tmp_path / "c.yaml", "extends: base-qwen2.5-coder-0.5b\nname: c\n")
    policy = load_policy(child)
    assert policy.model.source == "qwen2.5-coder-0.5b-instruct"
    assert load_policy("eds-qwen2.5-coder-0.5b").path == (
        ROOT / "policies" / "eds-qwen2.5-coder-0.5b.yaml").resolve()
    with pytest.raises(PolicyError, match="not a shipped policy name.*did you mean 'eds-qwen2.5"):
        load_policy("eds-qwen2.5-coder-0.5")
    bad = write_text(tmp_path / "d.yaml", "extends: no-such-policy\nname: d\n")
    with pytest.raises(PolicyError, match="extends: 'no-such-policy' not found"):
        load_policy(bad)


# --- the JSON Schema --------------------------------------------------------------------------
def _schema(capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["policy", "schema"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_shipped_policy_file_passes_the_exported_schema(capsys) -> None:  # type: ignore[no-untyped-def]
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema(capsys))
    files = sorted((ROOT / "policies").glob("*.yaml"))
    assert len(files) >= 6, f"policies/ ships {len(files)} policy files"  # else nothing is checked
    for path in files:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, (path.name, errors)


def test_schema_types_plugin_params_and_requires_a_complete_file_without_extends(capsys) -> None:  # type: ignore[no-untyped-def]
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema(capsys))
    ok = _policy(rails=[{"name": "r", "steerer": {"plugin": "eds", "params": {"eta": 0.5}}}])
    assert not list(validator.iter_errors(ok))
    typo = _policy(rails=[{"name": "r", "steerer": {"plugin": "gradient-descent",
                                                    "params": {"eta": "fast", "stepz": 2}}}])
    messages = " | ".join(e.message for e in validator.iter_errors(typo))
    assert "'fast' is not of type 'number'" in messages and "stepz" in messages
    unknown = _policy(classifier={"plugin": "gpt-judge"})
    assert "'gpt-judge' is not one of" in " ".join(e.message for e in validator.iter_errors(unknown))
    default_params = _policy(rails=[{"name": "r", "energy_model": {"params": {"hiden": [1]}}}])
    assert list(validator.iter_errors(default_params))  # the default (mlp) Params apply
    assert list(validator.iter_errors({"name": "no-model"}))
    # A child file may leave out everything but each rail's name...
    partial = {"extends": "base.yaml", "rails": [{"name": "eds", "steerer": {"params": {"eta": 2}}}]}
    assert not list(validator.iter_errors(partial))
    # ...and is still type-checked.
    assert list(validator.iter_errors({"extends": "b.yaml", "rails": [{"steerer": {}}]}))
    assert list(validator.iter_errors({"extends": "b.yaml", "generation": {"max_new_tokens": 0}}))


def test_validate_reports_schema_and_plugin_errors_in_one_pass(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = write_policy(tmp_path / "bad.yaml", _policy(
        generation={"max_new_tokens": -3},
        rails=[{"name": "r", "steerer": {"plugin": "gradient-descent", "params": {"eta": "fast"}},
                "energy_model": {"plugin": "mlp", "artifact": "x.safetensors"}}],
        classifier={"plugin": "gpt-judge"}))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "generation.max_new_tokens: got -3" in err
    assert "rails[0].steerer.params.eta: got 'fast'" in err
    assert "classifier.plugin: got 'gpt-judge'" in err


def test_validate_takes_a_shipped_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "base-qwen2.5-coder-0.5b"]) == 0
    assert "ok base-qwen2.5-coder-0.5b: policy 'base-qwen2.5-coder-0.5b'" in capsys.readouterr().out


# --- policy list | show | init ---------------------------------------------------------------
def test_policy_list_names_every_shipped_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "list"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == sorted(p.stem for p in (ROOT / "policies").glob("*.yaml"))
    eds = next(r for r in rows if r["name"] == "eds-qwen2.5-coder-0.5b")
    assert eds["extends"] == "base-qwen2.5-coder-0.5b"
    assert eds["artifacts"][0]["path"].endswith("artifacts/eds-qwen2.5-coder-0.5b.safetensors")


def test_policy_show_prints_the_merged_policy_or_the_source(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["policy", "show", "eds-qwen2.5-coder-0.5b"]) == 0
    merged = yaml.safe_load(capsys.readouterr().out)
    assert merged["model"]["source"] == "qwen2.5-coder-0.5b-instruct"  # from the parent
    assert "extends" not in merged
    assert main(["policy", "show", "--source", "eds-qwen2.5-coder-0.5b"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["extends"] == "base-qwen2.5-coder-0.5b.yaml"


def test_policy_init_writes_a_starter_that_validates_and_extends_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "mine.yaml"
    assert main(["policy", "init", str(target)]) == 0
    data = yaml.safe_load(target.read_text())
    assert data == {"extends": "eds-qwen2.5-coder-0.5b", "name": "mine",
                    "description": "My policy, starting from eds-qwen2.5-coder-0.5b."}
    assert main(["validate", str(target)]) == 0
    assert load_policy(target).rails == load_policy("eds-qwen2.5-coder-0.5b").rails
    assert main(["policy", "init", str(target)]) == 1  # no overwrite without --force
    assert "exists; pass --force" in capsys.readouterr().err
    # The commented example that steers harder is valid policy text once uncommented.
    text = target.read_text()
    block = text.split("# Steer harder or softer", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    harder = write_text(tmp_path / "harder.yaml",
                        text + "\n".join(line.removeprefix("# ") for line in block) + "\n")
    assert main(["validate", str(harder)]) == 0
    [rail] = load_policy(harder).rails
    assert rail.steerer.params == {**load_policy("eds-qwen2.5-coder-0.5b").rails[0].steerer.params,
                                   "eta": 0.5}
