"""Capturing hidden states at many layers in one forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from guardrail.plugin.components import ActivationSource


class _StopForward(Exception):
    """Raised after the deepest requested layer: later layers and the LM head are skipped."""


def mean_over_prompt(states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[batch, seq, hidden]`` -> ``[batch, hidden]``: the mean over each row's real tokens
    (all positions without a mask), in the states' dtype."""
    if attention_mask is None:
        return states.mean(dim=1)
    weights = attention_mask.to(states.device, states.dtype)[:, :, None]
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def capture_last_prompt_states(
    model: nn.Module,
    source: ActivationSource,
    inputs: dict[str, torch.Tensor],
    layers: Sequence[int],
) -> torch.Tensor:
    """States at the last prompt token (left-padded inputs) for ``layers``: ``[batch, L, hidden]``.

    One forward pass serves every layer; the pass stops after the deepest requested layer.
    """
    captured = _capture(model, source, inputs, layers,
                        lambda states: states[:, -1, :].detach().float())
    return torch.stack([captured[layer] for layer in layers], dim=1)


def mean_prompt_states(model: nn.Module, source: ActivationSource,
                       inputs: dict[str, torch.Tensor], layers: Sequence[int]
                       ) -> dict[int, torch.Tensor]:
    """Per layer, ``[batch, hidden]`` states averaged over each row's real prompt tokens (what
    gates read). One forward pass, stopped after the deepest requested layer."""
    mask = inputs.get("attention_mask")
    return _capture(model, source, inputs, layers,
                    lambda states: mean_over_prompt(states.detach().float(), mask))


def _capture(model: nn.Module, source: ActivationSource, inputs: dict[str, torch.Tensor],
             layers: Sequence[int], reduce: Any) -> dict[int, torch.Tensor]:
    """Layer -> ``reduce(states)`` on the CPU for ``layers``, from one forward pass that stops
    after the deepest of them."""
    modules = source.modules(model)
    wanted = sorted(set(layers))
    captured: dict[int, torch.Tensor] = {}
    deepest = wanted[-1]
    handles = []

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[layer] = reduce(source.read(output)).cpu()
            if layer == deepest:
                raise _StopForward

        return hook

    for layer in wanted:
        handles.append(modules[layer].register_forward_hook(make_hook(layer)))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured
