"""A rail's fitted gate, as its artifact stores it: members, weights and standardisation.

A rail's ``gate:`` names one or more gate components (the members). Each member scores every
prompt for harm; the scores are standardised on the training prompts (z-scores), weighted,
summed and standardised again, so thresholds read in standard deviations of the training
scores whatever the members are. ``guardrail train`` fits the members and stores them in the
rail's artifact beside the energy models (:class:`GateSet`); which rows a score lets a rail
steer is :mod:`guardrail.steering.gating`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from guardrail.artifact.file import header_problems
from guardrail.artifact.header import GATE_TENSOR_PREFIX, GateHeader
from guardrail.errors import ArtifactError, PluginError
from guardrail.plugin.components import Gate

TENSOR_PREFIX = GATE_TENSOR_PREFIX

if TYPE_CHECKING:
    from guardrail.plugin.registry import Registry



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
    def from_header(cls, header: GateHeader | dict[str, Any], tensors: dict[str, torch.Tensor],
                    registry: Registry, where: str, num_layers: int | None = None) -> GateSet:
        """Rebuild a fitted gate set from an artifact's header and tensors.

        The header is checked first (:class:`~guardrail.artifact.header.GateHeader`), each
        member's params against its plugin's ``Params``; each member is rebuilt (a plugin
        resolves and checks the files it names now), and with ``num_layers`` (the model's
        depth) the layers a member reads are checked to exist. A member that knows the mean
        score of its training prompts (:meth:`Gate.fitted_mean`) must agree with the header.
        """
        if not isinstance(header, GateHeader):
            try:
                header = GateHeader.model_validate(header)
            except ValidationError as exc:
                problems = [p.replace("header field '", "header field 'gate.", 1)
                            for p in header_problems(exc)]
                raise ArtifactError(f"{where}: " + "; ".join(problems)) from None
        members: list[GateMember] = []
        for i, item in enumerate(header.members):
            key = f"{where}: header field 'gate.members[{i}]"
            try:
                entry = registry.get("gate", item.plugin)
            except PluginError as exc:
                raise ArtifactError(f"{key}.plugin': {exc}") from None
            try:
                params = entry.Params.model_validate(item.params)
            except ValidationError as exc:
                raise ArtifactError("; ".join(
                    f"{where}: header field 'gate.members[{i}].params.{p}'"
                    for p in _param_problems(exc))) from None
            prefix = f"{TENSOR_PREFIX}{i}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                gate_cls = entry.cls
                assert issubclass(gate_cls, Gate)  # the registry checked the kind
                gate = gate_cls.from_artifact(params, dict(item.config), own)
                layers = gate.state_layers(num_layers) if num_layers is not None else []
                fitted = gate.fitted_mean()
            except (KeyError, TypeError, ValueError, IndexError, PluginError) as exc:
                raise ArtifactError(f"{key}' ({item.plugin}): {type(exc).__name__}: "
                                    f"{_first_line(exc)}") from exc
            if num_layers is not None and any(not 0 <= layer < num_layers for layer in layers):
                raise ArtifactError(f"{key}' ({item.plugin}): reads layers {layers}, which a "
                                    f"{num_layers}-layer model does not all have")
            if fitted is not None and not _close(fitted, item.mean, item.std):
                raise ArtifactError(f"{key}.mean': got {item.mean!r}; the fitted "
                                    f"{item.plugin} gate's own training mean is {fitted:.6g} "
                                    "(a mean that differs shifts every prompt's score)")
            members.append(GateMember(item.plugin, gate, item.weight, item.mean, item.std))
        return cls(members, header.mean, header.std, dict(header.report))


def _close(fitted: float, stored: float, std: float) -> bool:
    """Whether a stored mean matches a member's own, up to float16 storage and rounding."""
    return math.isfinite(fitted) and abs(fitted - stored) <= 1e-2 * std + 1e-3 * abs(fitted)


def _param_problems(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            out.append(f"{loc}': unknown key")
        else:
            value = repr(err.get("input"))
            out.append(f"{loc}': got {value[:80]}; expected "
                       f"{err['msg'].removeprefix('Input should be ').lower()}")
    return out


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return text if len(text) <= 300 else text[:300] + "..."
