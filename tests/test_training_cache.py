"""The state cache: keying, round trips, and resuming an interrupted capture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from guardrail_plugins.residual_stream import ResidualStreamSource

from guardrail.policy.model import parse_policy
from guardrail.policy.training import LabelSettings
from guardrail.steering.guard import Guardrail
from guardrail.training.cache import StateCache, prompt_key, weights_digest
from guardrail.training.labelling import generate_and_capture
from guardrail.training.sources import TrainingPrompt

from .conftest import build_tiny_model

FINGERPRINT = {"name": "m", "config_sha256": "abc123", "num_layers": 2, "hidden_size": 3}


def cache(root: Path, **kw: Any) -> StateCache:
    options = {"positions": "last", "max_new_tokens": 16, **kw}
    return StateCache(root, FINGERPRINT, kw.pop("weights", "w1"), **options)


def test_round_trip_in_any_order_and_across_instances(tmp_path: Path) -> None:
    first = cache(tmp_path)
    states = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3)
    first.write(["k1", "k2"], ["p1", "p2"], ["r1", "r2"], states)
    first.write(["k3"], ["p3"], ["r3"], states[:1] + 100)
    reopened = cache(tmp_path)
    assert reopened.missing(["k3", "k4", "k1"]) == ["k4"]
    rows = reopened.load(["k3", "k2", "k1"])
    assert rows.responses == ["r3", "r2", "r1"]
    assert rows.states.dtype == torch.float16
    assert torch.equal(rows.states[1].float(), states[1])
    assert torch.equal(rows.states[0].float(), states[0] + 100)


def test_keys_separate_models_positions_and_label_lengths(tmp_path: Path) -> None:
    base = cache(tmp_path)
    base.write(["k"], ["p"], ["r"], torch.zeros(1, 2, 3))
    assert cache(tmp_path).missing(["k"]) == []
    assert cache(tmp_path, positions="mean").missing(["k"]) == ["k"]
    assert cache(tmp_path, max_new_tokens=8).missing(["k"]) == ["k"]
    other_model = StateCache(tmp_path, {**FINGERPRINT, "config_sha256": "zzz"}, "w1",
                             positions="last", max_new_tokens=16)
    assert other_model.missing(["k"]) == ["k"]
    other_weights = StateCache(tmp_path, FINGERPRINT, "w2", positions="last", max_new_tokens=16)
    assert other_weights.missing(["k"]) == ["k"]
    assert prompt_key("a") != prompt_key("b") and prompt_key("a") == prompt_key("a")


def test_weights_digest_tells_checkpoints_apart() -> None:
    assert weights_digest(build_tiny_model(40, seed=0)) == weights_digest(build_tiny_model(40, seed=0))
    assert weights_digest(build_tiny_model(40, seed=0)) != weights_digest(build_tiny_model(40, seed=1))


def test_rejects_states_of_the_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected \(1, 2, 3\)"):
        cache(tmp_path).write(["k"], ["p"], ["r"], torch.zeros(1, 3, 3))


def test_interrupted_capture_resumes_without_redoing_finished_batches(
    tmp_path: Path, tiny_loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = parse_policy({"name": "t", "model": {"source": "unused"}})
    guard = Guardrail.from_policy(policy, loaded=tiny_loaded)
    words = ["coke", "bomb", "python", "store", "shop", "steps", "help", "tell", "kill", "make"]
    prompts = [TrainingPrompt(f"where can i buy {w}", "benign", "s") for w in words]
    settings = LabelSettings(max_new_tokens=2, batch_size=4)
    fingerprint = {"name": "tiny", "config_sha256": "x", "num_layers": 4, "hidden_size": 32}
    state_cache = StateCache(tmp_path, fingerprint, "w", positions="last", max_new_tokens=2)
    source = ResidualStreamSource()
    calls: list[int] = []
    fail_at = [2]
    real_generate = guard.model.generate

    def flaky_generate(**kwargs: Any) -> Any:
        calls.append(kwargs["input_ids"].shape[0])
        if len(calls) in fail_at:
            raise RuntimeError("killed")  # say the machine ran out of memory in batch 2
        return real_generate(**kwargs)

    monkeypatch.setattr(guard.model, "generate", flaky_generate)
    with pytest.raises(RuntimeError, match="killed"):
        generate_and_capture(guard, source, prompts, state_cache, settings)
    assert calls == [4, 4]
    assert len(list(state_cache.dir.glob("shard-*.safetensors"))) == 1
    assert not list(state_cache.dir.glob(".*tmp*"))

    calls.clear()
    fail_at.clear()
    resumed = StateCache(tmp_path, fingerprint, "w", positions="last", max_new_tokens=2)
    stats = generate_and_capture(guard, source, prompts, resumed, settings)
    assert (stats.cached, stats.generated) == (4, 6)
    assert calls == [4, 2]
    texts = guard.render([[{"role": "user", "content": p.text}] for p in prompts], steer=False)
    assert resumed.missing([prompt_key(t) for t in texts]) == []
