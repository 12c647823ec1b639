"""Gates: before a batch is generated, which rows each rail may steer.

A rail's ``gate:`` names one or more gate components (the members). Each member scores every
prompt for harm; the scores are standardised on the training prompts (z-scores), weighted,
summed and standardised again, so thresholds read in standard deviations of the training
scores whatever the members are. A row is steered when its score is below the gate's
``below`` threshold (confidently benign: steer towards answering, the ``answer`` side) or above
``above`` (confidently harmful: steer towards refusing, the ``refuse`` side); rows in between
are left as the model has them.

Members are fitted by ``guardrail train`` and stored in the rail's artifact beside the energy
models; ``guardrail calibrate`` chooses the thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from guardrail.components import Gate
from guardrail.errors import ArtifactError, PluginError

TENSOR_PREFIX = "gate."


@dataclass
class GateMember:
    """One fitted gate component, its weight and the training scores' mean and spread."""

    plugin: str
    gate: Gate
    weight: float = 1.0
    mean: float = 0.0
    std: float = 1.0


MemberFit = Callable[[GateMember, Sequence[str], "torch.Tensor | None", torch.Tensor],
                    torch.Tensor]


def _fit_and_score(member: GateMember, prompts: Sequence[str], states: torch.Tensor | None,
                   harmful: torch.Tensor) -> torch.Tensor:
    member.gate.fit(prompts, states, harmful)
    return member.gate.score(prompts, states)


@dataclass
class GateSet:
    """The members of one rail's gate and the standardisation of their combined score."""

    members: list[GateMember]
    mean: float = 0.0
    std: float = 1.0
    report: dict[str, Any] = field(default_factory=dict)

    def state_layers(self, num_layers: int) -> list[int]:
        """Every layer some member reads mean-pooled prompt states of, ascending."""
        return sorted({layer for m in self.members for layer in m.gate.state_layers(num_layers)})

    def _member_states(self, member: GateMember, states: dict[int, torch.Tensor] | None,
                       num_layers: int) -> torch.Tensor | None:
        layers = member.gate.state_layers(num_layers)
        if not layers:
            return None
        if states is None:
            raise PluginError(f"gate {member.plugin!r} reads prompt states; none were given")
        return torch.stack([states[layer] for layer in layers], dim=1)

    def fit(self, prompts: Sequence[str], states: dict[int, torch.Tensor] | None,
            harmful: torch.Tensor, num_layers: int, fit_member: MemberFit | None = None) -> None:
        """Fit every member on the training prompts (``harmful``: True where refusing is right).

        ``fit_member(member, prompts, states, harmful)`` fits one member and returns its raw
        scores of the training prompts (default: ``fit``, then ``score``); a caller may take
        them from a cache instead.
        """
        total = torch.zeros(len(prompts))
        for member in self.members:
            own = self._member_states(member, states, num_layers)
            raw = (fit_member or _fit_and_score)(member, prompts, own, harmful).float()
            member.mean, member.std = float(raw.mean()), float(raw.std().clamp_min(1e-6))
            total += member.weight * (raw - member.mean) / member.std
        self.mean, self.std = float(total.mean()), float(total.std().clamp_min(1e-6))

    def score(self, prompts: Sequence[str], states: dict[int, torch.Tensor] | None,
              num_layers: int) -> torch.Tensor:
        """``[n]`` combined harm scores in training standard deviations (> 0 leans harmful)."""
        total = torch.zeros(len(prompts))
        for member in self.members:
            own = self._member_states(member, states, num_layers)
            try:
                raw = member.gate.score(prompts, own).float().cpu()
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"gate {member.plugin!r} raised in score: "
                                  f"{type(exc).__name__}: {exc}") from exc
            if raw.shape != (len(prompts),):
                raise PluginError(f"gate {member.plugin!r} returned scores of shape "
                                  f"{tuple(raw.shape)}; expected ({len(prompts)},)")
            total += member.weight * (raw - member.mean) / member.std
        return (total - self.mean) / self.std

    # --- artifacts ----------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        """The JSON the artifact header keeps under ``gate``."""
        return {"mean": self.mean, "std": self.std, "report": self.report, "members": [
            {"plugin": m.plugin, "params": m.gate.params.model_dump(mode="json"),
             "config": m.gate.config(), "weight": m.weight, "mean": m.mean, "std": m.std}
            for m in self.members]}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every member's tensors, keyed ``gate.{i}.{name}``."""
        return {f"{TENSOR_PREFIX}{i}.{k}": v.detach().cpu().contiguous()
                for i, m in enumerate(self.members) for k, v in m.gate.tensors().items()}

    @classmethod
    def from_header(cls, header: dict[str, Any], tensors: dict[str, torch.Tensor],
                    registry: Any, where: str) -> GateSet:
        """Rebuild a fitted gate set from an artifact's header and tensors."""
        members = []
        for i, item in enumerate(header.get("members") or []):
            key = f"{where}: header gate.members[{i}]"
            try:
                entry = registry.get("gate", item["plugin"])
                params = entry.cls.Params.model_validate(item.get("params") or {})
                prefix = f"{TENSOR_PREFIX}{i}."
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                gate = entry.cls.from_artifact(params, item.get("config") or {}, own)
                members.append(GateMember(item["plugin"], gate, float(item.get("weight", 1.0)),
                                          float(item["mean"]), float(item["std"])))
            except (KeyError, TypeError, ValueError, PluginError) as exc:
                raise ArtifactError(f"{key}: {type(exc).__name__}: {exc}") from exc
        if not members:
            raise ArtifactError(f"{where}: header gate has no members")
        return cls(members, float(header.get("mean", 0.0)), float(header.get("std", 1.0)),
                   dict(header.get("report") or {}))


def gate_sides(scores: torch.Tensor, below: float | None, above: float | None
               ) -> dict[str, torch.Tensor]:
    """Rows a gate lets a rail steer, per side: ``answer`` (confidently benign, ``< below``)
    and ``refuse`` (confidently harmful, ``> above``); a side without a threshold steers none.
    """
    never = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return {"answer": scores < below if below is not None else never,
            "refuse": scores > above if above is not None else never}


def steered_rows(scores: torch.Tensor, below: float | None, above: float | None) -> torch.Tensor:
    """Rows a gate lets a rail steer: confidently benign (``< below``) or harmful (``> above``)."""
    sides = gate_sides(scores, below, above)
    return sides["answer"] | sides["refuse"]


def side_of(scores: torch.Tensor, below: float | None, above: float | None) -> list[str | None]:
    """Per row, the side a gate steers it towards (None: left alone)."""
    sides = gate_sides(scores, below, above)
    return ["answer" if a else "refuse" if r else None
            for a, r in zip(sides["answer"].tolist(), sides["refuse"].tolist(), strict=True)]
