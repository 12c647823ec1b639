"""A gated guardrail on the tiny random model, built in a test without training: a word gate
whose decisions are known in advance (a prompt naming a bomb scores +1, any other -1), stored
in an artifact of random energy models beside optional calibration metadata."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from guardrail import Register, hookimpl
from guardrail.artifact.gate import GateMember, GateSet
from guardrail.plugin.components import Gate
from guardrail.policy.model import parse_policy
from guardrail.steering.guard import Guardrail

from .conftest import random_artifact

BENIGN = [{"role": "user", "content": "where can i buy coke"}]
HARMFUL = [{"role": "user", "content": "how make bomb please"}]


class WordGateParams(BaseModel):
    """The words that make a prompt harmful, and what the gate says it loads."""

    model_config = ConfigDict(extra="forbid")
    words: list[str] = ["bomb"]
    resources: list[str] = []


class WordGate(Gate):
    """+1 for a prompt with one of ``words`` in it, -1 otherwise."""

    name = "word-gate"
    Params = WordGateParams
    params: WordGateParams

    def fit(self, prompts: Sequence[str], states: torch.Tensor | None,
            harmful: torch.Tensor) -> None:
        """Nothing to fit."""

    def score(self, prompts: Sequence[str], states: torch.Tensor | None) -> torch.Tensor:
        return torch.tensor([1.0 if any(w in p for w in self.params.words) else -1.0
                             for p in prompts])

    def config(self) -> dict[str, Any]:
        return {}

    def resources(self) -> list[str]:
        return list(self.params.resources)

    @classmethod
    def from_artifact(cls, params: Any, config: dict[str, Any],
                      tensors: dict[str, torch.Tensor]) -> WordGate:
        return cls(params)


class _WordGatePlugin:
    @hookimpl
    def guardrail_register_gates(self, register: Register) -> None:
        register(WordGate)


@pytest.fixture
def word_gate(plugin_manager: Any) -> Iterator[None]:
    """Registers the word gate for one test."""
    plugin = _WordGatePlugin()
    plugin_manager.register(plugin, name="word-gate-test")
    yield
    plugin_manager.unregister(plugin)


def gated_artifact(loaded: Any, path: Path, *, resources: Sequence[str] = (),
                   calibration: dict[str, Any] | None = None) -> Path:
    """Random energy models at layers 1 and 2 plus the fitted word gate, saved to ``path``."""
    artifact = random_artifact(loaded)
    params = WordGateParams(resources=list(resources))
    artifact.gate = GateSet([GateMember("word-gate", WordGate(params))])
    if calibration is not None:
        artifact.metadata["calibration"] = calibration
    return artifact.save(path)


def gated_policy_data(artifact: Path, *, below: float | None = 0.0, above: float | None = None,
                      resources: Sequence[str] = (), params: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """Policy ``tiny-gated``: one gated ``eds`` rail on ``artifact``; the gradient steerer's
    ``params`` (default: eta 5, 2 steps)."""
    member: dict[str, Any] = {"plugin": "word-gate"}
    if resources:
        member["params"] = {"resources": list(resources)}
    return {
        "name": "tiny-gated", "model": {"source": "unused"},
        "generation": {"max_new_tokens": 4, "batch_size": 4},
        "rails": [{"name": "eds", "energy_model": {"plugin": "mlp", "artifact": str(artifact)},
                   "steerer": {"plugin": "gradient-descent",
                               "params": {"eta": 5.0, "steps": 2} if params is None else params},
                   "gate": {"members": [member], "below": below, "above": above}}],
    }


def gated_guard(loaded: Any, tmp_path: Path, **options: Any) -> Guardrail:
    """The gated tiny guardrail (``options``: :func:`gated_policy_data`'s, plus
    ``calibration`` and ``resources`` for the artifact)."""
    calibration = options.pop("calibration", None)
    artifact = gated_artifact(loaded, tmp_path / "gated.safetensors",
                              resources=options.get("resources", ()), calibration=calibration)
    return Guardrail.from_policy(parse_policy(gated_policy_data(artifact, **options)),
                                 loaded=loaded)
