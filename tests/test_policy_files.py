"""Hostile policy files: every one gets a clean PolicyError naming the file, fast, in bounded
memory, and ``validate`` goes on to the next file."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest

from guardrail.cli import main
from guardrail.errors import PolicyError
from guardrail.policy.artifacts import validate_policy_file
from guardrail.policy.files import MAX_BYTES, MAX_DEPTH, MAX_NODES, read_policy_file
from guardrail.policy.model import load_policy

HEAD = "name: p\nmodel: {source: smollm2-135m-instruct}\n"


def alias_bomb(levels: int, fanout: int = 9) -> str:
    """``levels`` anchors, each a list of ``fanout`` aliases of the one before: fanout**levels."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * fanout)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels)]
    return HEAD + "\n".join(lines) + "\n"


def problems_of(path: Path) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.path == str(path)
    return str(info.value)


@pytest.mark.parametrize("levels", [7, 9, 12])
def test_alias_bombs_are_refused_fast_without_echoing_the_value(tmp_path: Path, levels: int) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels))
    tracemalloc.start()
    started = time.perf_counter()
    text = problems_of(path)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert f"expands to more than {MAX_NODES} nodes" in text and "alias bomb" in text
    assert "lol" not in text and len(text) < 500
    assert seconds < 1 and peak < 20 * 2**20


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(HEAD + "x: &x [*x]\n")
    assert "alias *x refers to a node that contains it" in problems_of(path)


def test_oversize_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with path.open("wb") as handle:
        handle.truncate(50 * 2**20)  # 50 MB of NUL bytes, sparse on disk
    started = time.perf_counter()
    text = problems_of(path)
    assert f"the file is {50 * 2**20} bytes; policy files may be at most {MAX_BYTES}" in text
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("binary", b"name: \xff\xfe\x00\x01\n", "not UTF-8 text: byte 0xff at offset 6"),
    ("deep lists", (HEAD + "x: " + "[" * 5000 + "]" * 5000).encode(), "nest"),
    ("deep mappings", (HEAD + "x: " + "{a: " * 5000 + "1" + "}" * 5000).encode(),
     f"nested more than {MAX_DEPTH} levels deep"),
    ("NUL in a path", (HEAD + 'rails: [{name: r, energy_model: {artifact: "a\\0b"}}]\n').encode(),
     "a string contains a NUL character"),
    ("lone surrogate", (HEAD + 'description: "\\ud800"\n').encode(), "not valid YAML"),
    ("terminal escape", (HEAD + 'description: "\\x1b[2J"\n').encode(),
     "a string contains a control character (U+001B)"),
    ("unknown user's home", (HEAD + "rails: [{name: r, energy_model: {artifact: '~nosuchuser/a'}}]\n").encode(),
     "rails[0].energy_model.artifact: got '~nosuchuser/a'; cannot expand '~'"),
    ("duplicate key", (HEAD + "name: q\n").encode(),
     "line 3, column 1: duplicate key 'name' (first at line 1)"),
    ("non-string key", (HEAD + "1: x\n").encode(), "mapping key 1 (int) is not a string"),
    ("huge integer", (HEAD + "generation: {seed: " + "9" * 5000 + "}\n").encode(),
     "integer too large"),
    ("python tag", (HEAD + "x: !!python/object/apply:os.system [id]\n").encode(),
     "is not allowed in a policy file"),
    ("not a mapping", b"- a\n- b\n", "top level: expected a mapping, got list"),
    ("two documents", (HEAD + "---\n" + HEAD).encode(), "expected a single document"),
])
def test_malformed_files_are_clean_policy_errors(tmp_path: Path, name: str, content: bytes,
                                                 expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert expected in problems_of(path)


def test_timestamps_stay_strings_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(HEAD + "base: &b {x: 1, y: 2}\nderived: {<<: *b, y: 3}\nwhen: 2024-01-01\n")
    assert read_policy_file(path) == {
        "name": "p", "model": {"source": "smollm2-135m-instruct"},
        "base": {"x": 1, "y": 2}, "derived": {"x": 1, "y": 3}, "when": "2024-01-01"}


def test_unset_variable_is_an_error_naming_it_and_empty_default_is_explicit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GUARDRAIL_TEST_UNSET", raising=False)
    path = tmp_path / "p.yaml"
    path.write_text("name: p\nmodel: {source: '${GUARDRAIL_TEST_UNSET}'}\n"
                    "rails: [{name: r, energy_model: {artifact: '${GUARDRAIL_TEST_UNSET}/e.st'}}]\n")
    text = problems_of(path)
    assert "model.source: environment variable ${GUARDRAIL_TEST_UNSET} is not set" in text
    assert "rails[0].energy_model.artifact: environment variable ${GUARDRAIL_TEST_UNSET}" in text
    path.write_text("name: p\nmodel: {source: 'm${GUARDRAIL_TEST_UNSET:-}'}\n")
    assert load_policy(path).model.source == "m"
    path.write_text("name: p\nmodel: {source: '${GUARDRAIL_TEST_UNSET:-}'}\n")
    assert "model.source: got ''" in problems_of(path)
    path.write_text("extends: '${GUARDRAIL_TEST_UNSET}/base.yaml'\nname: p\n")
    assert "extends: environment variable ${GUARDRAIL_TEST_UNSET} is not set" in problems_of(path)


def _validate_problems(path: Path, registry: object) -> str:
    with pytest.raises(PolicyError) as info:
        validate_policy_file(path, registry)
    return str(info.value)


def test_settings_that_would_be_accepted_silently_are_errors(tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "dir.safetensors").mkdir()
    path = tmp_path / "p.yaml"
    rails = [{"name": "eds", "layers": [],
              "energy_model": {"plugin": "mlp", "artifact": "dir.safetensors"}}]
    path.write_text(json.dumps({"name": "p", "model": {"source": "m"}, "rails": rails, "training": {
        "rail": "nosuchrail",
        "sources": [{"path": "a.json", "context": "benign"},
                    {"path": "b.json", "context": "harmful"}]}}))
    text = _validate_problems(path, registry)
    assert "rails[0].layers: got []; expected 'auto' or at least one layer index" in text
    assert "training.rail: got 'nosuchrail'; expected one of ['eds']" in text
    assert f"rails[0].energy_model.artifact: {tmp_path / 'dir.safetensors'} is a directory" in text
    rails[0].update(layers="auto", energy_model={"plugin": "mlp", "artifact": "x.safetensors",
                                                 "params": {"hidden": [-5, 0]}})
    path.write_text("name: p\nmodel: {source: m}\ngeneration: {temperature: .inf}\ntraining:\n"
                    "  sources: [{path: a.json, context: benign, sample: 1.0e+30},\n"
                    "            {path: b.json, context: harmful, sample: 0}]\n")
    text = _validate_problems(path, registry)
    assert "generation.temperature: got inf" in text
    assert "training.sources[0].sample: got 1e+30" in text
    assert "training.sources[1].sample: got 0" in text
    path.write_text(json.dumps({"name": "p", "model": {"source": "m"}, "rails": rails}))
    text = _validate_problems(path, registry)
    assert "rails[0].energy_model.params.hidden[0]: got -5" in text
    assert "rails[0].energy_model.params.hidden[1]: got 0" in text


def test_prompt_only_rails_may_have_no_layers(tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps({"name": "p", "model": {"source": "m"}, "rails": [
        {"name": "sp", "layers": [], "steerer": {"plugin": "system-prompt"}}]}))
    assert validate_policy_file(path, registry).rails[0].layers == []


def test_long_values_are_not_echoed_in_full(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "generation: {max_new_tokens: '" + "7" * 100_000 + "'}\n")
    text = problems_of(path)
    assert "generation.max_new_tokens: got '777" in text and "(100002 characters)" in text
    assert len(text) < 1000


def test_validate_reports_every_file_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(HEAD)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(9))
    assert main(["validate", str(binary), str(bomb), str(tmp_path / "missing.yaml"), str(good)]) == 1
    captured = capsys.readouterr()
    assert f"invalid policy {binary}" in captured.err and f"invalid policy {bomb}" in captured.err
    assert f"{tmp_path / 'missing.yaml'}:\n  - file not found" in captured.err
    assert captured.out.startswith(f"ok {good}")


def test_bad_cli_options_get_an_argparse_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--log-level", "FOO", "plugins"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "guardrail: error: argument --log-level: got 'FOO'; expected one of DEBUG, INFO" in err


@pytest.mark.parametrize("argv", [
    ["generate", "--policy", "p.yaml", "--max-new-tokens", "-5", "hi"],
    ["generate", "--policy", "p.yaml", "--temperature", "nan", "hi"],
    ["generate", "--policy", "p.yaml", "--top-p", "5", "hi"],
    ["train", "--policy", "p.yaml", "--top-k", "0"],
    ["eval", "--policy", "p.yaml", "--batch-size", "many"],
    ["serve", "--policy", "p.yaml", "--request-timeout", "-1"],
])
def test_bad_sizes_on_the_command_line_are_argparse_errors(argv: list[str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    option, value = next((a, b) for a, b in zip(argv, argv[1:], strict=False) if a.startswith("--") and a != "--policy")
    assert f"error: argument {option}: got '{value}'; expected" in capsys.readouterr().err
