"""The baselines' steerers (``ablate``, ``system-prompt``) and the ``linear`` energy's params.

torch is imported inside the methods, and the ``linear`` energy model (an ``nn.Module``)
lives in :mod:`.linear`, registered by import path: registering this plugin imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from guardrail.plugin.components import Energy, SteerContext, Steerer, SteerOutcome

if TYPE_CHECKING:
    import torch

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


# --- steerers -------------------------------------------------------------------------------
class AblateParams(BaseModel):
    """How much of the component along the direction to remove, and measured from where."""

    model_config = ConfigDict(extra="forbid")
    # Not ``strength``: that is the core's per-request multiplier, which this steerer does not
    # take (it names no strength_param). Policies and sweeps written before the rename say
    # ``strength``, and still load.
    share: float = Field(1.0, ge=0.0, le=2.0, description="1 removes the component fully.",
                         validation_alias=AliasChoices("share", "strength"))
    reference: Literal["origin", "mean"] = Field(
        "origin", description="origin: h - (h.r)r (Arditi et al.); mean: set <h - mu, r> to 0."
    )


class AblateSteerer(Steerer):
    """h <- h - share * <h - ref, r_hat> r_hat: no state keeps a component along ``r_hat``.

    ``r_hat`` is the energy model's ``direction`` when it has one (``linear``); otherwise the
    unit energy gradient at ``h``, which is the same thing for a linear energy.
    """

    name = "ablate"
    Params = AblateParams
    params: AblateParams
    tunable = ("share",)

    def steer(self, states: torch.Tensor, energy: Energy | None, ctx: SteerContext
              ) -> SteerOutcome:
        import torch

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
        new = h - self.params.share * coeff * r_hat
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

    def steer(self, states: torch.Tensor, energy: Energy | None, ctx: SteerContext
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

