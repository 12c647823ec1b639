"""The ``linear`` energy model, E(h) = <h - mu, r_hat> (an ``nn.Module``, imported on first use)."""

from __future__ import annotations

from typing import Any

import torch
from guardrail_plugins.baselines.components import LinearEnergyParams
from pydantic import BaseModel

from guardrail.plugin.energy_model import EnergyModel


class LinearEnergyModel(EnergyModel):
    """E(h) = <h - mean, direction> with a unit ``direction``; ``threshold`` 0 is the midpoint."""

    name = "linear"
    Params = LinearEnergyParams
    artifact_command = "guardrail baseline directions --policy {policy}"
    direction: torch.Tensor
    mean: torch.Tensor

    def __init__(self, hidden_size: int, *, separation: float = 0.0, threshold: float = 0.0
                 ) -> None:
        super().__init__(LinearEnergyParams())
        self.hidden_size = hidden_size
        self.separation = separation
        self.threshold = threshold
        # An untrained model has a zero direction: zero energy and zero gradient everywhere.
        self.register_buffer("direction", torch.zeros(hidden_size))
        self.register_buffer("mean", torch.zeros(hidden_size))

    @classmethod
    def build(cls, hidden_size: int, params: BaseModel) -> LinearEnergyModel:
        return cls(hidden_size)

    @classmethod
    def from_means(cls, harmful: torch.Tensor, benign: torch.Tensor) -> LinearEnergyModel:
        """Difference of means: ``direction`` points from the benign mean to the harmful one."""
        diff = harmful.float() - benign.float()
        separation = float(diff.norm())
        model = cls(int(diff.shape[-1]), separation=separation)
        model.direction.copy_(diff / max(separation, 1e-12))
        model.mean.copy_((harmful.float() + benign.float()) / 2)
        return model

    def energy(self, states: torch.Tensor) -> torch.Tensor:
        return (states.to(self.mean.dtype) - self.mean) @ self.direction

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.energy(states)

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "separation": self.separation,
                "threshold": self.threshold}

    @classmethod
    def from_artifact(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
                      ) -> LinearEnergyModel:
        model: LinearEnergyModel = cls.from_tensors(
            tensors, int(config["hidden_size"]), separation=float(config.get("separation", 0.0)),
            threshold=float(config.get("threshold", 0.0)))
        return model.eval()
