"""Steerer: gradient descent on the energy, h <- h - eta * g, for K steps (EDS).

torch is imported inside :meth:`GradientSteerer.steer`: registering this plugin must not
pay for importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from guardrail import Register, hookimpl
from guardrail.plugin.components import Energy, SteerContext, Steerer, SteerOutcome

if TYPE_CHECKING:
    import torch


class GradientSteererParams(BaseModel):
    """Step size, step count, gradient normalisation, energy gate and displacement cap."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    eta: float = Field(1.0, gt=0, description="Step size (in units of ||h|| when scale=relative).")
    steps: int = Field(3, ge=1, le=100)
    normalize: bool = Field(True, description="Use g / ||g|| (default) or the raw gradient.")
    scale: Literal["absolute", "relative"] = "absolute"
    gate: float | Literal["auto"] | None = Field(
        None, description="Steer only where E(h) > gate; 'auto' uses the artifact's threshold."
    )
    max_displacement: float | None = Field(
        None, gt=0, description="Cap on ||h_final - h|| (same units as eta)."
    )


class GradientSteerer(Steerer):
    """Moves states down the energy landscape; rows with non-finite energy are left alone."""

    name = "gradient-descent"
    Params = GradientSteererParams
    params: GradientSteererParams
    tunable = ("eta", "steps")
    strength_param = "eta"

    def steer(
        self, states: torch.Tensor, energy: Energy | None, ctx: SteerContext
    ) -> SteerOutcome:
        import torch

        if energy is None:
            raise ValueError(f"rail {ctx.rail!r}: the gradient steerer needs an energy model")
        p = self.params
        h0 = states.detach().float()
        unit = (
            h0.norm(dim=-1, keepdim=True) if p.scale == "relative" else torch.ones_like(h0[:, :1])
        )
        # Gradients come from energy_and_grad (closed form for the MLP); nothing here waits
        # on the device: rows drop out of the update through masks, never through a branch.
        e0, grad = energy.energy_and_grad(h0)
        nonfinite = ~torch.isfinite(e0) | ~torch.isfinite(grad).all(dim=-1)
        threshold = getattr(energy, "threshold", 0.0) if p.gate == "auto" else p.gate
        active = ~nonfinite
        if threshold is not None:
            active &= e0 > threshold
        h = h0
        steps = torch.zeros(h0.shape[0], dtype=torch.long, device=h0.device)
        for step in range(p.steps):
            if step > 0:
                e_step, grad = energy.energy_and_grad(h)
                bad = ~torch.isfinite(e_step) | ~torch.isfinite(grad).all(dim=-1)
                nonfinite |= bad & active
                active &= ~bad
            direction = (
                grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12) if p.normalize else grad
            )
            update = p.eta * unit * direction
            h = torch.where(active[:, None], h - update, h)
            steps += active.long()
        if p.max_displacement is not None:
            delta = h - h0
            limit = p.max_displacement * unit
            norm = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            h = h0 + delta * torch.clamp(limit / norm, max=1.0)
        h = torch.where(torch.isfinite(h).all(dim=-1, keepdim=True), h, h0)
        with torch.no_grad():
            e = energy.energy(h)
        return SteerOutcome(
            states=h.to(states.dtype),
            energy_before=e0,
            energy_after=torch.where(torch.isfinite(e), e, e0),
            steps=steps,
            steered=steps > 0,
            nonfinite=nonfinite,
        )


@hookimpl
def guardrail_register_steerers(register: Register) -> None:
    register(GradientSteerer, aliases=("gradient_descent", "eds"))
