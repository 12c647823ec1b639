"""Linear baselines EDS is compared with, built from the same plugin interfaces.

* ``linear`` energy model: E(h) = <h - mu, r_hat>, where ``r_hat`` is the unit difference of
  mean states on harmful and benign prompts and ``mu`` their midpoint (E > 0 looks harmful).
  ``guardrail baseline directions`` computes it. With the ``gradient-descent`` steerer and
  ``normalize: true`` the gradient is ``r_hat`` itself, so EDS's update *is* contrastive
  activation addition along ``-r_hat`` (Rimsky et al. 2024).
* ``ablate`` steerer: projects ``r_hat`` out of the states (Arditi et al. 2024, "Refusal in
  language models is mediated by a single direction").
* ``system-prompt`` steerer: prompt-only; rewrites the system message, touches no state.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from guardrail import hookimpl
from guardrail.components import EnergyModel, SteerContext, Steerer, SteerOutcome

# Safety first, then the over-refusal cases: a 0.5B model follows the last thing it reads, and
# an "answer everything that sounds scary" prompt alone made it answer arson requests too.
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful and harmless assistant. Refuse requests for help with violence, crime, "
    "weapons, hate or self-harm. Many safe requests only sound dangerous, such as killing a "
    "Python process, shooting a photo, the history of a war or a poison in a crime novel: "
    "answer those fully. Judge the intent, not the words."
)


# --- energy model ---------------------------------------------------------------------------
class LinearEnergyParams(BaseModel):
    """A linear energy model has no build-time parameters: its direction comes from data."""

    model_config = ConfigDict(extra="forbid")


class LinearEnergyModel(EnergyModel):
    """E(h) = <h - mean, direction> with a unit ``direction``; ``threshold`` 0 is the midpoint."""

    name = "linear"
    Params = LinearEnergyParams
    artifact_command = "guardrail baseline directions --policy {policy}"
    direction: torch.Tensor
    mean: torch.Tensor

    def __init__(self, hidden_size: int, *, separation: float = 0.0, threshold: float = 0.0
                 ) -> None:
        super().__init__(LinearEnergyParams())
        self.hidden_size = hidden_size
        self.separation = separation
        self.threshold = threshold
        # An untrained model has a zero direction: zero energy and zero gradient everywhere.
        self.register_buffer("direction", torch.zeros(hidden_size))
        self.register_buffer("mean", torch.zeros(hidden_size))

    @classmethod
    def build(cls, hidden_size: int, params: BaseModel) -> LinearEnergyModel:
        return cls(hidden_size)

    @classmethod
    def from_means(cls, harmful: torch.Tensor, benign: torch.Tensor) -> LinearEnergyModel:
        """Difference of means: ``direction`` points from the benign mean to the harmful one."""
        diff = harmful.float() - benign.float()
        separation = float(diff.norm())
        model = cls(int(diff.shape[-1]), separation=separation)
        model.direction.copy_(diff / max(separation, 1e-12))
        model.mean.copy_((harmful.float() + benign.float()) / 2)
        return model

    def energy(self, states: torch.Tensor) -> torch.Tensor:
        return (states.to(self.mean.dtype) - self.mean) @ self.direction

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.energy(states)

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "separation": self.separation,
                "threshold": self.threshold}

    @classmethod
    def from_artifact(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
                      ) -> LinearEnergyModel:
        model: LinearEnergyModel = cls.from_tensors(
            tensors, int(config["hidden_size"]), separation=float(config.get("separation", 0.0)),
            threshold=float(config.get("threshold", 0.0)))
        return model.eval()


# --- steerers -------------------------------------------------------------------------------
class AblateParams(BaseModel):
    """How much of the component along the direction to remove, and measured from where."""

    model_config = ConfigDict(extra="forbid")
    strength: float = Field(1.0, ge=0.0, le=2.0, description="1 removes the component fully.")
    reference: Literal["origin", "mean"] = Field(
        "origin", description="origin: h - (h.r)r (Arditi et al.); mean: set <h - mu, r> to 0."
    )


class AblateSteerer(Steerer):
    """h <- h - strength * <h - ref, r_hat> r_hat: no state keeps a component along ``r_hat``.

    ``r_hat`` is the energy model's ``direction`` when it has one (``linear``); otherwise the
    unit energy gradient at ``h``, which is the same thing for a linear energy.
    """

    name = "ablate"
    Params = AblateParams
    params: AblateParams

    def steer(self, states: torch.Tensor, energy: EnergyModel | None, ctx: SteerContext
              ) -> SteerOutcome:
        if energy is None:
            raise ValueError(f"rail {ctx.rail!r}: the ablate steerer needs an energy model")
        h = states.detach().float()
        direction = getattr(energy, "direction", None)
        if isinstance(direction, torch.Tensor):
            r_hat = (direction / direction.norm().clamp_min(1e-12)).expand_as(h)
        else:
            with torch.enable_grad():
                x = h.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(energy.energy(x).sum(), x)
            r_hat = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ref = getattr(energy, "mean", None) if self.params.reference == "mean" else None
        offset = h - ref if isinstance(ref, torch.Tensor) else h
        coeff = (offset * r_hat).sum(dim=-1, keepdim=True)
        new = h - self.params.strength * coeff * r_hat
        with torch.no_grad():
            before, after = energy.energy(h), energy.energy(new)
        finite = torch.isfinite(new).all(dim=-1)
        new = torch.where(finite[:, None], new, h)
        return SteerOutcome(
            states=new.to(states.dtype), energy_before=before, energy_after=after,
            steps=finite.long(), steered=finite, nonfinite=~finite,
        )


class SystemPromptParams(BaseModel):
    """The system message to use, and what to do when the conversation already has one."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(DEFAULT_SYSTEM_PROMPT, min_length=1)
    mode: Literal["replace", "prepend", "append"] = Field(
        "prepend", description="With an existing system message: replace it, or join both."
    )


class SystemPromptSteerer(Steerer):
    """Prompt-only baseline: asks the model not to over-refuse; hidden states are untouched.

    Give its rail ``layers: []`` so no hooks are installed at all.
    """

    name = "system-prompt"
    Params = SystemPromptParams
    params: SystemPromptParams
    requires_energy_model: ClassVar[bool] = False

    def steer(self, states: torch.Tensor, energy: EnergyModel | None, ctx: SteerContext
              ) -> SteerOutcome:
        return SteerOutcome(states=states)

    def prepare_conversation(self, conversation: list[dict[str, str]]) -> list[dict[str, str]]:
        out = [dict(m) for m in conversation]
        text = self.params.text
        existing = next((m for m in out if m.get("role") == "system"), None)
        if existing is None:
            return [{"role": "system", "content": text}, *out]
        if self.params.mode == "replace":
            existing["content"] = text
        elif self.params.mode == "prepend":
            existing["content"] = f"{text}\n\n{existing.get('content', '')}"
        else:
            existing["content"] = f"{existing.get('content', '')}\n\n{text}"
        return out


@hookimpl
def guardrail_register_energy_models(register: Any) -> None:
    register(LinearEnergyModel, aliases=("difference-of-means",))


@hookimpl
def guardrail_register_steerers(register: Any) -> None:
    register(AblateSteerer, aliases=("directional-ablation", "refusal-ablation"))
    register(SystemPromptSteerer, aliases=("system_prompt", "prompt"))
