"""Activation source: the residual stream at the output of each decoder block.

torch is imported inside the methods: registering this plugin (``guardrail validate``,
``guardrail plugins``, ``guardrail --help``) must not pay for importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from guardrail import Register, hookimpl
from guardrail.plugin.components import ActivationSource, Phase

if TYPE_CHECKING:
    import torch
    from torch import nn


class ResidualStreamParams(BaseModel):
    """Which positions to steer: the prompt's last token or all prompt tokens, and new tokens."""

    model_config = ConfigDict(extra="forbid")
    prompt_positions: Literal["last", "all", "none"] = "last"
    generated: bool = True


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama/Qwen/Mistral/GPT-2 style layouts)."""
    from torch import nn

    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        node: Any = model
        for attr in path.split("."):
            node = getattr(node, attr, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return node
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


class ResidualStreamSource(ActivationSource):
    """Reads and writes the hidden states each decoder block outputs."""

    name = "residual-stream"
    Params = ResidualStreamParams
    params: ResidualStreamParams

    def modules(self, model: nn.Module) -> list[nn.Module]:
        return list(decoder_layers(model))

    def read(self, output: Any) -> torch.Tensor:
        import torch

        return output if isinstance(output, torch.Tensor) else output[0]

    def write(self, output: Any, states: torch.Tensor) -> Any:
        import torch

        if isinstance(output, torch.Tensor):
            return states
        return (states, *output[1:])

    def positions(self, phase: Phase, seq_len: int) -> slice | None:
        if phase == "decode":
            return slice(0, None) if self.params.generated else None
        return {"last": slice(seq_len - 1, None), "all": slice(0, None), "none": None}[
            self.params.prompt_positions
        ]


@hookimpl
def guardrail_register_activation_sources(register: Register) -> None:
    register(ResidualStreamSource, aliases=("residual_stream",))
