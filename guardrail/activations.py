"""Capturing hidden states at many layers in one forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from guardrail.components import ActivationSource


class _StopForward(Exception):
    """Raised after the deepest requested layer: later layers and the LM head are skipped."""


def capture_last_prompt_states(
    model: nn.Module,
    source: ActivationSource,
    inputs: dict[str, torch.Tensor],
    layers: Sequence[int],
) -> torch.Tensor:
    """States at the last prompt token (left-padded inputs) for ``layers``: ``[batch, L, hidden]``.

    One forward pass serves every layer; the pass stops after the deepest requested layer.
    """
    modules = source.modules(model)
    wanted = sorted(set(layers))
    captured: dict[int, torch.Tensor] = {}
    deepest = wanted[-1]
    handles = []

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[layer] = source.read(output)[:, -1, :].detach().float().cpu()
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
    return torch.stack([captured[layer] for layer in layers], dim=1)
