"""Hostile policy inputs that used to end in tracebacks or raw terminal output: symlink loops,
depth built from aliases, long ``extends`` chains, ``policy show --source`` on anything,
seeds, devices and layer indices no run can use, control characters in names, and secrets
expanded into paths. Each ends in a clean error naming the file (or an argparse error), and
nothing reaches the terminal unescaped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guardrail.cli import main
from guardrail.console import printable
from guardrail.policy.files import MAX_DEPTH
from guardrail.policy.model import MAX_EXTENDS

HEAD = "name: p\nmodel: {source: smollm2-135m-instruct}\n"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    return code, out, err


@pytest.fixture
def loop(tmp_path: Path) -> Path:
    """A policy path that is a symlink loop (a -> b -> a)."""
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


@pytest.mark.parametrize("argv", [
    ["validate", "{loop}"],
    ["policy", "show", "{loop}"],
    ["policy", "show", "--source", "{loop}"],
    ["policy", "init", "{out}", "--extends", "{loop}"],
    ["generate", "--policy", "{loop}", "hi"],
    ["serve", "--policy", "{loop}"],
])
def test_a_symlink_loop_is_a_clean_error_everywhere(loop: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    argv: list[str]) -> None:
    argv = [a.format(loop=loop, out=tmp_path / "new.yaml") for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 1 and str(loop) in err, err
    assert "symlink loop" in err or "file not found" in err or "not a policy file" in err


def test_validate_goes_on_after_a_loop_and_names_a_looping_artifact(
    loop: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art_a, art_b = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    art_a.symlink_to(art_b)
    art_b.symlink_to(art_a)
    policy = tmp_path / "p.yaml"
    policy.write_text(HEAD + "rails: [{name: r, energy_model: {artifact: x.safetensors}}]\n")
    good = tmp_path / "good.yaml"
    good.write_text(HEAD)
    code, out, err = run(["validate", str(loop), str(policy), str(good)], capsys)
    assert code == 1 and out.startswith(f"ok {good}")
    assert "rails[0].energy_model.artifact: got 'x.safetensors'; the path is a symlink loop" \
        in err


def test_depth_is_counted_after_alias_expansion(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Each anchor nests the one before one level deeper: 3 KB of text, 100 levels.
    lines = ["l0: &l0 [x]"] + [f"l{i}: &l{i} [*l{i - 1}]" for i in range(1, 100)]
    path = tmp_path / "deep.yaml"
    path.write_text(HEAD + "\n".join(lines) + "\n")
    assert len(path.read_bytes()) < 3000
    code, _, err = run(["validate", str(path)], capsys)
    assert code == 1
    assert f"nested more than {MAX_DEPTH} levels deep once aliases are expanded" in err
    # Shallow aliases are still fine.
    path.write_text(HEAD + "\n".join(lines[:20]) + "\n")
    code, _, err = run(["validate", str(path)], capsys)
    assert "levels deep" not in err


def test_a_long_extends_chain_is_refused_with_the_bound(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p0.yaml").write_text(HEAD)
    for i in range(1, 1000):
        (tmp_path / f"p{i}.yaml").write_text(f"extends: p{i - 1}.yaml\nname: p{i}\n")
    code, _, err = run(["validate", str(tmp_path / "p999.yaml")], capsys)
    assert code == 1 and f"the chain is more than {MAX_EXTENDS} files long" in err
    code, out, _ = run(["validate", str(tmp_path / f"p{MAX_EXTENDS - 1}.yaml")], capsys)
    assert code == 0 and out.startswith("ok ")


def test_policy_show_source_is_bounded_and_escaped(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["policy", "show", "--source", "/dev/zero"], capsys)
    assert code == 1 and "not a regular file" in err
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    code, _, err = run(["policy", "show", "--source", str(binary)], capsys)
    assert code == 1 and "not UTF-8 text" in err
    big = tmp_path / "big.yaml"
    with big.open("wb") as handle:
        handle.truncate(50 * 2**20)
    code, _, err = run(["policy", "show", "--source", str(big)], capsys)
    assert code == 1 and "policy files may be at most" in err
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(HEAD + "# \x1b]0;pwned\x07 \x1b[2J \u009b31m \u202egnp.exe\n")
    code, out, _ = run(["policy", "show", "--source", str(hostile)], capsys)
    assert code == 0 and "name: p\n" in out
    assert not any(c in out for c in "\x1b\x07\u009b\u202e")
    assert "\\x1b]0;pwned\\x07" in out and "\\u202egnp.exe" in out


@pytest.mark.parametrize(("text", "problem"), [
    ("generation: {seed: 1180591620717411303424, do_sample: true}",
     "generation.seed: got 1180591620717411303424; expected an integer from -2**63 to 2**64-1"),
    ("training: {seed: -9223372036854775809, sources: [{path: a.json, context: benign}, "
     "{path: b.json, context: harmful}]}",
     "training.seed: got -9223372036854775809; expected an integer from -2**63"),
    ("model: {source: smollm2-135m-instruct, device: meta}",
     "model.device: got 'meta'; expected 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'"),
    ("rails: [{name: r, layers: [1.0e+18]}]", "rails[0].layers: got [1000000000000000000]"),
    ("rails: [{name: r, layers: [3, 5000]}]", "expected layer indices under 4096"),
])
def test_values_no_run_can_use_are_refused_at_validate(tmp_path: Path, text: str, problem: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    head = HEAD if not text.startswith("model:") else "name: p\n"
    path.write_text(head + text + "\n")
    code, _, err = run(["validate", str(path)], capsys)
    assert code == 1 and problem in err, err


@pytest.mark.parametrize(("option", "value"), [
    ("--seed", str(2**70)), ("--seed", "-9223372036854775809"), ("--seed", "x"),
    ("--device", "meta"), ("--device", "cuda:x"),
])
def test_seed_and_device_flags_are_checked_before_loading(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["generate", "--policy", "p.yaml", option, value, "hi"], capsys)
    assert code == 2 and f"argument {option}: got '{value}'; expected" in err, err


def test_control_characters_in_names_and_paths_never_reach_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "evil\x1b[2J.yaml"
    path.write_text('name: "evil\\u009b31m\\u202e"\nmodel: {source: "m\\u2066"}\n')
    code, out, err = run(["validate", str(path)], capsys)
    assert code == 0
    assert not any(c in out + err for c in "\x1b\u009b\u202e\u2066"), out + err
    assert "evil\\x1b[2J.yaml" in out
    bad = tmp_path / "bad\u202e.yaml"
    bad.write_text("name: [\n")
    code, _, err = run(["validate", str(bad)], capsys)
    assert code == 1 and "\u202e" not in err and "bad\\u202e.yaml" in err


def test_secrets_expanded_into_paths_are_not_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "s3cr3t-token-0123456789"
    monkeypatch.setenv("GUARDRAIL_TEST_SECRET", secret)
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "rails: [{name: r, energy_model: "
                    "{artifact: '/tmp/${GUARDRAIL_TEST_SECRET}/a.safetensors'}}]\n")
    code, out, err = run(["validate", str(path)], capsys)
    assert code == 0 and "does not exist yet" in out
    assert secret not in out + err and "${GUARDRAIL_TEST_SECRET}" in out
    child = tmp_path / "child.yaml"
    child.write_text("extends: '/nowhere/${GUARDRAIL_TEST_SECRET}.yaml'\nname: c\n")
    code, _, err = run(["validate", str(child)], capsys)
    assert code == 1 and "not found" in err and secret not in err
    code, out, err = run(["policy", "show", str(path)], capsys)
    assert secret not in out + err
    assert printable(f"x {secret} y") == "x ${GUARDRAIL_TEST_SECRET} y"
    assert os.environ["GUARDRAIL_TEST_SECRET"] == secret
