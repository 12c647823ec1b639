"""The layers' energy models trained together: stacked parameters run by one vmapped call.

``torch.func.stack_module_state`` turns G models into parameters with a leading layer
dimension; ``vmap(functional_call)`` then computes every layer's energies in one call, so a
training step is a handful of batched matmuls instead of G small ones. A plugin model that
``torch.func`` cannot run falls back to :class:`Looped`, the same steps one layer at a time.
"""

from __future__ import annotations

import copy
from typing import Any

import structlog
import torch
from torch import nn

from guardrail.plugin.energy_model import EnergyModel

log = structlog.get_logger("guardrail.training")


class _EnergyCall(nn.Module):
    """Calls ``energy`` through ``forward`` so ``torch.func.functional_call`` can run it."""

    def __init__(self, model: EnergyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.model.energy(states)


class Stacked:
    """The layers' models as stacked parameters, run by one vmapped call."""

    def __init__(self, models: list[EnergyModel]) -> None:
        from torch.func import functional_call, stack_module_state, vmap

        self.models = models
        wrapped = [_EnergyCall(m) for m in models]
        params, buffers = stack_module_state(wrapped)
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.buffers = buffers
        self.best = {k: v.detach().clone() for k, v in self.params.items()}
        self.base = copy.deepcopy(wrapped[0]).to("meta")

        def call(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
            return functional_call(self.base, (p, b), (x,))

        self._train = vmap(call, randomness="different")
        self._eval = vmap(call)
        self.training = True

    def parameters(self) -> list[torch.Tensor]:
        """The tensors the optimiser updates."""
        return list(self.params.values())

    def train(self, mode: bool) -> None:
        """Training mode (dropout on) or evaluation mode."""
        self.training = mode
        self.base.train(mode)

    def energies(self, x: torch.Tensor) -> torch.Tensor:
        """``[G, n, hidden]`` standardised states -> ``[G, n]`` energies, layer g by model g."""
        fn = self._train if self.training else self._eval
        return fn(self.params, self.buffers, x)

    def snapshot(self, improved: torch.Tensor) -> None:
        """Remember the current parameters of the layers where ``improved`` is true."""
        for key, value in self.params.items():
            self.best[key][improved] = value.detach()[improved]

    def restore(self) -> list[EnergyModel]:
        """The models with each layer's remembered (best) parameters loaded."""
        for g, model in enumerate(self.models):
            state = {k.removeprefix("model."): v[g].clone() for k, v in self.best.items()}
            state.update({k.removeprefix("model."): v[g].clone() for k, v in self.buffers.items()})
            model.load_state_dict(state)
        return self.models


class Looped:
    """Fallback for models ``torch.func`` cannot vmap: the same steps, one layer at a time."""

    def __init__(self, models: list[EnergyModel]) -> None:
        self.models = models
        self.best = [copy.deepcopy(m.state_dict()) for m in models]

    def parameters(self) -> list[torch.Tensor]:
        """The tensors the optimiser updates."""
        return [p for m in self.models for p in m.parameters()]

    def train(self, mode: bool) -> None:
        """Training mode (dropout on) or evaluation mode."""
        for model in self.models:
            model.train(mode)

    def energies(self, x: torch.Tensor) -> torch.Tensor:
        """``[G, n, hidden]`` standardised states -> ``[G, n]`` energies, layer g by model g."""
        return torch.stack([m.energy(x[g]) for g, m in enumerate(self.models)])

    def snapshot(self, improved: torch.Tensor) -> None:
        """Remember the current parameters of the layers where ``improved`` is true."""
        for g in improved.nonzero().flatten().tolist():
            self.best[g] = copy.deepcopy(self.models[g].state_dict())

    def restore(self) -> list[EnergyModel]:
        """The models with each layer's remembered (best) parameters loaded."""
        for model, state in zip(self.models, self.best, strict=True):
            model.load_state_dict(state)
        return self.models


def stack_models(models: list[EnergyModel], probe: torch.Tensor) -> Stacked | Looped:
    """:class:`Stacked` if ``torch.func`` can run the models on ``probe``, else :class:`Looped`."""
    try:
        stacked = Stacked(models)
        with torch.no_grad():
            stacked.energies(probe)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot vmap this plugin"
        log.info("train.not_vectorised", model=type(models[0]).__name__,
                 reason=f"{type(exc).__name__}: {exc}")
        return Looped(models)
    return stacked
