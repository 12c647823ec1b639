"""The energy-model interface: E(h), an ``nn.Module`` saved in and loaded from artifacts.

Apart from :mod:`guardrail.plugin.components` because defining it imports torch (``from
guardrail.plugin import EnergyModel`` resolves here on first use).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from guardrail.plugin.components import Component


class EnergyModel(Component, nn.Module):
    """E(h): low for desirable hidden states, high for undesirable ones. One instance per layer."""

    #: The command that writes this model's artifact, ``{policy}`` standing for the policy
    #: file; None: ``guardrail train`` from the policy's ``training:`` section.
    artifact_command: ClassVar[str | None] = None
    #: The decision energy: above it a state looks undesirable. ``guardrail train`` stores
    #: the one it measured on validation; the gradient steerer's ``gate: auto`` reads it.
    threshold: float = 0.0

    def __init__(self, params: BaseModel | None = None) -> None:
        Component.__init__(self, params)
        nn.Module.__init__(self)

    @classmethod
    @abstractmethod
    def build(cls, hidden_size: int, params: BaseModel) -> EnergyModel:
        """Create an untrained model for states of ``hidden_size``."""

    @abstractmethod
    def energy(self, states: torch.Tensor) -> torch.Tensor:
        """Map ``[n, hidden]`` states to ``[n]`` energies; differentiable in ``states``."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description from which :meth:`from_artifact` rebuilds the model."""

    def energy_and_grad(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n]`` energies and their ``[n, hidden]`` gradients in ``states`` (what a gradient
        steerer needs at every step). The default differentiates :meth:`energy` with autograd;
        a model with a closed form overrides it and builds no graph."""
        with torch.enable_grad():
            x = states.detach().requires_grad_(True)
            energy = self.energy(x)
            (grad,) = torch.autograd.grad(energy.sum(), x)
        return energy.detach(), grad

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store in an artifact (default: the module's state dict)."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    @abstractmethod
    def from_artifact(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> EnergyModel:
        """Rebuild a trained model from :meth:`config` and :meth:`tensors` output.

        Raise ``ValueError`` naming the config field or tensor that is wrong; the loader adds
        the file and the layer. :meth:`from_tensors` does the tensor checks.
        """

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """``cls(*args, **kwargs)`` with ``tensors`` as its state, checked name by name.

        The module is built on the meta device, so a config asking for absurd sizes
        allocates nothing; its weights are the artifact's tensors (cast to the module's
        dtypes). A missing, unexpected or mis-shaped tensor is a ``ValueError`` naming it.
        """
        with torch.device("meta"):
            model = cls(*args, **kwargs)
        expected = model.state_dict()
        problems = []
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing:
            problems.append(f"tensors {missing} are missing")
        if unexpected:
            problems.append(f"tensors {unexpected} are not part of this model")
        for name in sorted(set(expected) & set(tensors)):
            got, want = list(tensors[name].shape), list(expected[name].shape)
            if got != want:
                problems.append(f"tensor {name!r} has shape {got}; the config needs {want}")
            elif not tensors[name].is_floating_point():
                problems.append(f"tensor {name!r} is {tensors[name].dtype}; expected floats")
        if problems:
            raise ValueError("; ".join(problems))
        model.load_state_dict({name: tensors[name].to(expected[name].dtype) for name in expected},
                              assign=True)
        left = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
                if t.is_meta]
        if left:
            raise ValueError(f"tensors {left} are not stored in artifacts; {cls.__name__} must "
                             "register them as persistent state")
        return model

    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the per-feature ``mean`` and ``std`` the trainer standardised inputs with.

        ``guardrail train`` fits the model on ``(h - mean) / std``, so a trainable model must
        keep both (in its artifact tensors) and apply them in :meth:`energy`. A model that is
        not trained by ``guardrail train`` can leave this as it is.
        """
        raise TypeError(
            f"energy model {type(self).__name__} has no set_standardisation(mean, std); "
            "training standardises inputs and must store the statistics in the model"
        )
