"""The interfaces plugins implement: sources, energy models, steerers, gates, classifiers,
suites.

A plugin registers *classes*; the core instantiates them with parameters validated by the
class's own ``Params`` pydantic model, so a policy file's plugin parameters are checked at
``guardrail validate`` time with exact key paths.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

Phase = Literal["prefill", "decode"]


class NoParams(BaseModel):
    """Parameters of a component that takes none."""

    model_config = ConfigDict(extra="forbid")


class Component(ABC):  # noqa: B024 - abstract in intent: only subclasses are registered
    """Common base: a registered name and a pydantic ``Params`` model."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params if params is not None else self.Params()


# --- activation sources ---------------------------------------------------------------------
class ActivationSource(Component):
    """Where hidden states are read and written: which module per layer, which positions."""

    @abstractmethod
    def modules(self, model: nn.Module) -> list[nn.Module]:
        """Return one module per layer index whose output holds the states to steer."""

    @abstractmethod
    def read(self, output: Any) -> torch.Tensor:
        """Extract the ``[batch, seq, hidden]`` states from a module's forward output."""

    @abstractmethod
    def write(self, output: Any, states: torch.Tensor) -> Any:
        """Return ``output`` with its states replaced by ``states``."""

    @abstractmethod
    def positions(self, phase: Phase, seq_len: int) -> slice | None:
        """Which sequence positions to steer in this phase; ``None`` steers nothing."""


# --- energy models --------------------------------------------------------------------------
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
        """Rebuild a trained model from :meth:`config` and :meth:`tensors` output."""

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


# --- steering policies ----------------------------------------------------------------------
@dataclass
class SteerContext:
    """What a steerer knows about the call: the rail, the layer and the phase."""

    rail: str
    layer: int
    phase: Phase


@dataclass
class SteerOutcome:
    """Result of steering ``n`` states; per-row tensors are on the states' device."""

    states: torch.Tensor
    energy_before: torch.Tensor | None = None
    energy_after: torch.Tensor | None = None
    steps: torch.Tensor | None = None
    steered: torch.Tensor | None = None
    nonfinite: torch.Tensor | None = None


class Steerer(Component):
    """Given states at one layer and the rail's energy model, return steered states."""

    requires_energy_model: ClassVar[bool] = True
    #: The ``Params`` fields ``guardrail sweep`` may set from its grid (``eta``: step size,
    #: ``steps``: step count); a steerer that names none is one point of the sweep.
    sweep_params: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def steer(
        self, states: torch.Tensor, energy: EnergyModel | None, ctx: SteerContext
    ) -> SteerOutcome:
        """Steer ``[n, hidden]`` states; must never return non-finite values."""

    def prepare_conversation(self, conversation: list[dict[str, str]]) -> list[dict[str, str]]:
        """Optionally rewrite the conversation before tokenisation (prompt-only steerers)."""
        return conversation


# --- gates --------------------------------------------------------------------------------
class Gate(Component):
    """Scores prompts for harm before generation, so a rail steers only the rows it should.

    A gate is fitted by ``guardrail train`` on the training prompts (``harmful`` is True for
    prompts of the harmful context) and stored in the rail's artifact. It may read the user's
    message, the model's prompt states (mean-pooled over the prompt tokens at the layers
    :meth:`state_layers` names), or both. Higher scores mean more harmful; the core
    standardises them on the training prompts, so a score's scale is the gate's own business.
    """

    def state_layers(self, num_layers: int) -> list[int]:
        """Layers whose mean-pooled prompt states :meth:`fit` and :meth:`score` read (default:
        none, a text-only gate)."""
        return []

    @abstractmethod
    def fit(self, prompts: Sequence[str], states: torch.Tensor | None,
            harmful: torch.Tensor) -> None:
        """Fit on user messages, their states ``[n, len(state_layers), hidden]`` (None for a
        text-only gate) and boolean labels ``[n]``."""

    @abstractmethod
    def score(self, prompts: Sequence[str], states: torch.Tensor | None) -> torch.Tensor:
        """``[n]`` harm scores (higher: more harmful) for the same inputs as :meth:`fit`."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description :meth:`from_artifact` rebuilds the fitted gate from."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted tensors to store in an artifact (default: none)."""
        return {}

    @classmethod
    @abstractmethod
    def from_artifact(cls, params: BaseModel, config: dict[str, Any],
                      tensors: dict[str, torch.Tensor]) -> Gate:
        """Rebuild a fitted gate from its params and :meth:`config` / :meth:`tensors` output."""


# --- refusal classifiers --------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """C(X, Y): whether a response refuses, a score in [0, 1] (1 = refusal) and why."""

    refused: bool
    score: float
    reason: str = ""


class RefusalClassifier(Component):
    """C(X, Y) over batches of prompt/response pairs."""

    @abstractmethod
    def classify(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        """Return one :class:`Verdict` per pair."""


# --- evaluation suites ----------------------------------------------------------------------
@dataclass(frozen=True)
class SuiteItem:
    """One evaluation prompt; ``harmful`` says whether refusing it is the right answer."""

    prompt: str
    harmful: bool
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Suite(Component):
    """A named set of evaluation prompts."""

    @abstractmethod
    def load(self) -> list[SuiteItem]:
        """Return the suite's items."""
