"""Reading hidden states without changing them: one capture, used by training, calibration,
gates and baselines.

:func:`capture_prefill` hooks the layers an :class:`ActivationSource` names and keeps, per
layer, the states of the first forward pass over the prompt (the prefill), reduced over
positions: the last prompt token (inputs are left padded) or the mean over each row's real
tokens. Decoding steps come later and are ignored, so labelling's generation and the capture
share one pass. :func:`read_states` is the capture around a bare forward pass that stops after
the deepest layer wanted (gates, calibration and baselines need no LM head).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from guardrail.plugin.components import ActivationSource

#: How a layer's ``[batch, seq, hidden]`` states are reduced to ``[batch, hidden]``.
POSITIONS = ("last", "mean")


class _StopForward(Exception):
    """Raised after the deepest requested layer: later layers and the LM head are skipped."""


def mean_over_prompt(states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[batch, seq, hidden]`` -> ``[batch, hidden]``: the mean over each row's real tokens
    (all positions without a mask), in the states' dtype."""
    if attention_mask is None:
        return states.mean(dim=1)
    weights = attention_mask.to(states.device, states.dtype)[:, :, None]
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def reduce_positions(
    states: torch.Tensor, attention_mask: torch.Tensor | None, positions: str
) -> torch.Tensor:
    """``[batch, seq, hidden]`` -> ``[batch, hidden]``: the last token (inputs are left padded)
    or the mean over real prompt tokens."""
    if positions == "last":
        return states[:, -1, :]
    if positions == "mean":
        return mean_over_prompt(states, attention_mask)
    raise ValueError(f"positions {positions!r}; expected one of {', '.join(POSITIONS)}")


@dataclass
class PrefillStates:
    """Filled by :func:`capture_prefill`: per position reduction and layer, ``[batch, hidden]``
    float32 on the CPU."""

    num_layers: int
    layers: list[int]
    by_positions: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    forward_passes: int = 0

    @property
    def by_layer(self) -> dict[int, torch.Tensor]:
        """The first reduction asked for, per layer."""
        return next(iter(self.by_positions.values()))

    @property
    def mean_by_layer(self) -> dict[int, torch.Tensor]:
        """The prompt-mean states per layer (what gates read), when asked for."""
        return self.by_positions.get("mean", {})

    def stacked(self, positions: str | None = None) -> torch.Tensor:
        """``[batch, layers, hidden]`` over the captured layers, in order; every one of them
        must have been reached."""
        found = self.by_positions[positions] if positions else self.by_layer
        missing = [layer for layer in self.layers if layer not in found]
        if missing:
            raise RuntimeError(f"layers {missing} produced no states (did the forward pass stop?)")
        return torch.stack([found[layer] for layer in self.layers], dim=1)

    def stacked_means(self) -> torch.Tensor:
        """``[batch, layers, hidden]`` prompt-mean states (``capture_prefill(mean_too=True)``)."""
        return self.stacked("mean")


@contextmanager
def capture_prefill(
    model: nn.Module,
    source: ActivationSource,
    attention_mask: torch.Tensor | None,
    positions: str = "last",
    *,
    mean_too: bool = False,
    layers: Sequence[int] | None = None,
    stop_after_deepest: bool = False,
) -> Iterator[PrefillStates]:
    """Hook ``layers`` (default: every layer ``source`` names) and keep each one's prefill
    states reduced by ``positions`` (and, with ``mean_too``, their prompt mean as well).

    With ``stop_after_deepest`` the forward pass is cut short after the deepest layer: run it
    with :func:`run_stopping`.
    """
    modules = source.modules(model)
    wanted = sorted(set(range(len(modules)) if layers is None else layers))
    reductions = [positions] + (["mean"] if mean_too and positions != "mean" else [])
    captured = PrefillStates(num_layers=len(modules), layers=wanted,
                             by_positions={p: {} for p in reductions})
    deepest = wanted[-1] if wanted else -1

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if layer in captured.by_layer:
                return  # a decoding step: the prefill came first
            states = source.read(output).detach().float()  # reduced in float32, any dtype
            if layer == wanted[0]:
                captured.forward_passes += 1
            mask = attention_mask.to(states.device) if attention_mask is not None else None
            for reduction, found in captured.by_positions.items():
                found[layer] = reduce_positions(states, mask, reduction).cpu()
            if stop_after_deepest and layer == deepest:
                raise _StopForward

        return hook

    handles = [modules[layer].register_forward_hook(make_hook(layer)) for layer in wanted]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_stopping(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """One forward pass without a cache or gradients, which a capture with
    ``stop_after_deepest`` may end early."""
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _StopForward:
        pass


def read_states(
    model: nn.Module,
    source: ActivationSource,
    inputs: dict[str, torch.Tensor],
    layers: Sequence[int] | None = None,
    positions: str = "last",
) -> dict[int, torch.Tensor]:
    """Per layer (default: every layer), ``[batch, hidden]`` states of one batch reduced by
    ``positions``, from one forward pass that stops after the deepest layer wanted."""
    with capture_prefill(model, source, inputs.get("attention_mask"), positions,
                         layers=layers, stop_after_deepest=True) as captured:
        run_stopping(model, inputs)
    return captured.by_layer
