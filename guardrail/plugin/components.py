"""The interfaces plugins implement: sources, energy models, steerers, gates, classifiers,
suites.

A plugin registers *classes*; the core instantiates them with parameters validated by the
class's own ``Params`` pydantic model, so a policy file's plugin parameters are checked at
``guardrail validate`` time with exact key paths.

Importing this module imports no torch (torch appears in annotations only), so plugins whose
classes need torch only inside their methods register without it; ``EnergyModel``, an
``nn.Module``, is defined in :mod:`guardrail.plugin.energy_model` (``guardrail.plugin`` hands it
out on first use).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ActivationSource",
    "Answer",
    "Component",
    "Energy",
    "NoParams",
    "OutputRail",
    "PackagedEncoder",
    "Phase",
    "RefusalClassifier",
    "SteerContext",
    "SteerOutcome",
    "Steerer",
    "Suite",
    "SuiteItem",
    "Verdict",
]

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
# ``EnergyModel`` is an ``nn.Module``, so it lives in :mod:`guardrail.plugin.energy_model`:
# importing the other interfaces costs no torch import. A steerer sees it as an ``Energy``.
class Energy(Protocol):
    """What a steerer may ask of an energy model: E(h) and its gradient, and the decision
    energy (:class:`~guardrail.plugin.energy_model.EnergyModel` is one)."""

    threshold: float

    def energy(self, states: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` states to ``[n]`` energies."""
        ...

    def energy_and_grad(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n]`` energies and their ``[n, hidden]`` gradients in ``states``."""
        ...


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
    #: The ``Params`` fields calibration and sweeps may tune (a step size, a step count): the
    #: names a ``calibration.grid`` and ``guardrail sweep --grid`` may set. A steerer that
    #: names none is one point of a sweep and calibrates only its gate thresholds.
    tunable: ClassVar[tuple[str, ...]] = ()
    #: The ``Params`` field a strength multiplies (a step size): what a per-request or
    #: per-``attach`` strength scales, and (one of :attr:`tunable`) the field whose calibrated
    #: curve says how far a strength may go. None: the steerer has no strength to turn.
    strength_param: ClassVar[str | None] = None

    @abstractmethod
    def steer(
        self, states: torch.Tensor, energy: Energy | None, ctx: SteerContext
    ) -> SteerOutcome:
        """Steer ``[n, hidden]`` states; must never return non-finite values.

        Runs inside the model's forward pass, under ``model.generate``'s
        ``torch.no_grad()``: a steerer that needs gradients of the energy takes them from
        ``EnergyModel.energy_and_grad`` (which enables grad itself), or wraps its own
        autograd in ``torch.enable_grad()``.
        """

    def with_strength(self, strength: float) -> Steerer:
        """This steerer steering ``strength`` times as hard: a copy with its
        :attr:`strength_param` multiplied (itself at strength 1)."""
        if strength == 1:
            return self
        if self.strength_param is None:
            from guardrail.errors import PluginError

            raise PluginError(f"steerer {self.name!r} has no strength to scale (its class "
                              "names no strength_param)")
        value = getattr(self.params, self.strength_param)
        params = type(self.params).model_validate(
            {**self.params.model_dump(), self.strength_param: value * strength})
        return type(self)(params)

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

    def resources(self) -> list[str]:
        """What the gate loads beyond its artifact to score (default: nothing): each a local
        directory, or the name of a package that ships a model (a packaged encoder that
        ``guardrail models fetch`` installs, say). ``Guardrail.from_policy`` checks that each
        is there before it loads anything, so a missing encoder fails at load with the command
        that installs it, not at the first request."""
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
        """Rebuild a fitted gate from its params and :meth:`config` / :meth:`tensors` output.

        Called when the artifact loads: check the config and tensors, and resolve any file
        the gate names, here (raise :class:`~guardrail.errors.PluginError` or ``ValueError``),
        so a broken gate fails at load rather than at the first request."""

    def fitted_mean(self) -> float | None:
        """The mean score of the prompts the gate was fitted on, if the fitted gate itself
        determines it (default None: it does not). The artifact stores that mean too; a
        header that disagrees is refused at load."""
        return None


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


# --- output rails ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """A finished answer an output rail reviews: the user's message, the answer, the policy's
    refusal classifier's verdict on it, the side the rails' gates chose for the prompt
    (``answer``, ``refuse``; ``shared`` when no rail is gated; None: the gate leaves it alone)
    and whether it was steered."""

    prompt: str
    text: str
    verdict: Verdict
    side: str | None
    steered: bool


class OutputRail(Component):
    """Reviews finished answers and may have some answered again, steered towards a side
    (NeMo's output rails, LLM Guard's output scanners, acting on the refusal verdict).

    ``first_pass`` says how :meth:`Guardrail.generate` answers before the review: ``base``
    (unsteered, so only the rows the rail sends back are steered) or ``steered`` (as the
    policy steers them).
    """

    first_pass: ClassVar[Literal["base", "steered"]] = "steered"

    @abstractmethod
    def review(self, answers: Sequence[Answer]) -> list[str | None]:
        """Per answer, the side to answer it again towards (``answer`` or ``refuse``; the
        rails steer it there whatever the gate said), or None to keep it."""


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


# --- packaged resources ------------------------------------------------------------------
@dataclass(frozen=True)
class PackagedEncoder:
    """A sentence encoder shipped as a PyPI package (a gate's external prompt encoder), named
    by the plugin that needs it through the ``guardrail_packaged_encoders`` hook.

    Installed without dependencies: it is loaded with transformers, not with the
    sentence-transformers library its package metadata asks for.
    """

    name: str
    description: str
    package: tuple[str, str]
    module: str

    @property
    def requirements(self) -> tuple[str, ...]:
        """The pinned pip requirement."""
        return (f"{self.package[0]}=={self.package[1]}",)
