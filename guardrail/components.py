"""The interfaces plugins implement: sources, energy models, steerers, classifiers, suites.

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

    @abstractmethod
    def steer(
        self, states: torch.Tensor, energy: EnergyModel | None, ctx: SteerContext
    ) -> SteerOutcome:
        """Steer ``[n, hidden]`` states; must never return non-finite values."""

    def prepare_conversation(self, conversation: list[dict[str, str]]) -> list[dict[str, str]]:
        """Optionally rewrite the conversation before tokenisation (prompt-only steerers)."""
        return conversation


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
