"""The MLP energy model (an ``nn.Module``): imported on first use, see the package."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from guardrail_plugins.mlp_energy import MAX_WIDTH, MLPEnergyParams
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from guardrail.plugin.energy_model import EnergyModel


class MLPArtifactConfig(BaseModel):
    """A layer's config as :meth:`MLPEnergyModel.config` stores it in an artifact."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    hidden_size: int = Field(ge=1, le=1 << 20)
    hidden: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(min_length=1, max_length=16)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    threshold: float = 0.0


class MLPEnergyModel(EnergyModel):
    """E(h) = MLP((h - mean) / std); ``threshold`` is the decision energy stored by training."""

    name = "mlp"
    Params = MLPEnergyParams
    params: MLPEnergyParams
    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, hidden_size: int, params: MLPEnergyParams) -> None:
        super().__init__(params)
        self.hidden_size = hidden_size
        self.threshold = 0.0
        widths = [hidden_size, *params.hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(width_in, width_out), nn.LayerNorm(width_out), nn.SiLU()]
            if params.dropout > 0:
                layers.append(nn.Dropout(params.dropout))
        layers.append(nn.Linear(widths[-1], 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("input_mean", torch.zeros(hidden_size))
        self.register_buffer("input_std", torch.ones(hidden_size))

    @classmethod
    def build(cls, hidden_size: int, params: BaseModel) -> MLPEnergyModel:
        return cls(hidden_size, MLPEnergyParams.model_validate(params.model_dump()))

    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training statistics the inputs are standardised with."""
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(1e-6))

    def energy(self, states: torch.Tensor) -> torch.Tensor:
        x = (states.to(self.input_mean.dtype) - self.input_mean) / self.input_std
        return self.net(x).squeeze(-1)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.energy(states)

    def energy_and_grad(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies and gradients in closed form (Linear -> LayerNorm -> SiLU, backwards by
        hand): no autograd graph, no host sync. Dropout is off, as in eval mode, which is the
        only mode steering runs in; in training mode the autograd default is used."""
        if self.training:
            return super().energy_and_grad(states)
        a = (states.to(self.input_mean.dtype) - self.input_mean) / self.input_std
        saved = []
        for linear, norm in self._blocks():
            z = a @ linear.weight.T + linear.bias
            mean = z.mean(-1, keepdim=True)
            rstd = (z.var(-1, unbiased=False, keepdim=True) + norm.eps).rsqrt()
            xhat = (z - mean) * rstd
            u = xhat * norm.weight + norm.bias
            gate = torch.sigmoid(u)
            a = u * gate
            saved.append((linear, norm, xhat, rstd, u, gate))
        head = self.net[-1]
        assert isinstance(head, nn.Linear)
        energy = a @ head.weight[0] + head.bias[0]
        grad = head.weight[0].expand_as(a)
        for linear, norm, xhat, rstd, u, gate in reversed(saved):
            grad = grad * gate * (1 + u * (1 - gate))  # SiLU'
            grad = grad * norm.weight
            grad = rstd * (grad - grad.mean(-1, keepdim=True)
                           - xhat * (grad * xhat).mean(-1, keepdim=True))  # LayerNorm'
            grad = grad @ linear.weight
        return energy, grad / self.input_std

    def _blocks(self) -> list[tuple[nn.Linear, nn.LayerNorm]]:
        """The hidden (Linear, LayerNorm) pairs of ``net``, in order (SiLU and Dropout skipped)."""
        modules = list(self.net)
        pairs = []
        for first, second in zip(modules, modules[1:], strict=False):
            if isinstance(first, nn.Linear) and isinstance(second, nn.LayerNorm):
                pairs.append((first, second))
        return pairs

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "threshold": self.threshold,
            **self.params.model_dump(),
        }

    @classmethod
    def from_artifact(
        cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> MLPEnergyModel:
        try:
            stored = MLPArtifactConfig.model_validate(config)
        except ValidationError as exc:
            raise ValueError("; ".join(
                f"config field {'.'.join(str(p) for p in err['loc'])!r}: got "
                f"{repr(err.get('input'))[:80]}; {err['msg'].lower()}" for err in exc.errors()
            )) from None
        params = MLPEnergyParams(hidden=stored.hidden, dropout=stored.dropout)
        model: MLPEnergyModel = cls.from_tensors(tensors, stored.hidden_size, params)
        model.threshold = stored.threshold
        # Steering always runs the model in eval mode: no dropout noise in the gradient.
        return model.eval()
