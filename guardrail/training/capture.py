"""Capture prompt states at every layer during the one prefill forward pass of a batch.

The hooks keep only the first call per layer (the prefill; decoding steps are one position
wide and come later), so the labelling generation and the state capture share one pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from guardrail.plugin.components import ActivationSource
from guardrail.steering.capture import mean_over_prompt


@dataclass
class PrefillStates:
    """Filled by :func:`capture_prefill`: per layer ``[batch, hidden]`` float32 on CPU."""

    num_layers: int
    by_layer: dict[int, torch.Tensor] = field(default_factory=dict)
    forward_passes: int = 0
    #: The prompt-mean states per layer as well, when asked for (what gates read).
    mean_by_layer: dict[int, torch.Tensor] = field(default_factory=dict)

    def stacked_means(self) -> torch.Tensor:
        """``[batch, layers, hidden]`` prompt-mean states (``capture_prefill(mean_too=True)``)."""
        return torch.stack([self.mean_by_layer[layer] for layer in range(self.num_layers)], dim=1)

    def stacked(self) -> torch.Tensor:
        """``[batch, layers, hidden]``; every layer must have been captured."""
        missing = [layer for layer in range(self.num_layers) if layer not in self.by_layer]
        if missing:
            raise RuntimeError(f"layers {missing} produced no states (did the forward pass stop?)")
        return torch.stack([self.by_layer[layer] for layer in range(self.num_layers)], dim=1)


def reduce_positions(
    states: torch.Tensor, attention_mask: torch.Tensor | None, positions: str
) -> torch.Tensor:
    """``[batch, seq, hidden]`` -> ``[batch, hidden]``: the last token (inputs are left padded)
    or the mean over real prompt tokens."""
    if positions == "last":
        return states[:, -1, :]
    if positions == "mean":
        return mean_over_prompt(states, attention_mask)
    raise ValueError(f"positions {positions!r}; expected 'last' or 'mean'")


@contextmanager
def capture_prefill(
    model: nn.Module,
    source: ActivationSource,
    attention_mask: torch.Tensor | None,
    positions: str = "last",
    *,
    mean_too: bool = False,
) -> Iterator[PrefillStates]:
    """Hook every layer ``source`` names; states of the first multi-token forward are kept
    (and, with ``mean_too``, their mean over the prompt tokens as well)."""
    modules = source.modules(model)
    captured = PrefillStates(num_layers=len(modules))
    handles = []

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if layer in captured.by_layer:
                return  # a decoding step: the prefill came first
            states = source.read(output)
            if layer == 0:
                captured.forward_passes += 1
            mask = attention_mask.to(states.device) if attention_mask is not None else None
            reduced = reduce_positions(states.detach(), mask, positions)
            captured.by_layer[layer] = reduced.float().cpu()
            if mean_too:
                captured.mean_by_layer[layer] = (
                    reduce_positions(states.detach(), mask, "mean").float().cpu())

        return hook

    for layer, module in enumerate(modules):
        handles.append(module.register_forward_hook(make_hook(layer)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def capture_states(
    model: nn.Module,
    source: ActivationSource,
    inputs: dict[str, torch.Tensor],
    positions: str = "last",
) -> torch.Tensor:
    """States of every layer for a batch in one forward pass (no generation): ``[b, L, hidden]``."""
    with capture_prefill(model, source, inputs.get("attention_mask"), positions) as captured, \
            torch.no_grad():
        model(**inputs, use_cache=False)
    return captured.stacked()
