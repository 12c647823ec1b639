"""Energy model: an MLP with LayerNorm + SiLU over standardised hidden states (as in EDS).

The model class (:mod:`.model`) is an ``nn.Module``, so it is registered by import path with
its ``Params``: validating a policy, listing plugins and ``guardrail --help`` do not import
torch; the class is imported the first time an artifact is built or loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from guardrail import Register, hookimpl

if TYPE_CHECKING:
    from guardrail_plugins.mlp_energy.model import MLPEnergyModel

__all__ = ["MAX_WIDTH", "MLPEnergyModel", "MLPEnergyParams"]


# Wider than any energy model needs; a larger width is a typo that would exhaust memory.
MAX_WIDTH = 1 << 16


class MLPEnergyParams(BaseModel):
    """Hidden widths (default: four hidden layers, as in the paper) and training-time dropout."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    hidden: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(
        default_factory=lambda: [512, 256, 128, 64], min_length=1, max_length=16
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


@hookimpl
def guardrail_register_energy_models(register: Register) -> None:
    register("guardrail_plugins.mlp_energy.model:MLPEnergyModel", name="mlp",
             aliases=("mlp-energy",), params=MLPEnergyParams)


def __getattr__(name: str) -> Any:
    if name == "MLPEnergyModel":  # imports torch: only when asked for
        from guardrail_plugins.mlp_energy.model import MLPEnergyModel

        return MLPEnergyModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
