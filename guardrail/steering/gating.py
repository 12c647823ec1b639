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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from guardrail.artifact.header import GATE_TENSOR_PREFIX, GateHeader, header_problems
from guardrail.errors import ArtifactError, PluginError
from guardrail.plugin.components import Gate
from guardrail.steering.capture import mean_prompt_states
from guardrail.telemetry import GateTelemetry

if TYPE_CHECKING:
    from torch import nn

    from guardrail.steering.rails import Rail

#: Per gated rail: the batch's harm scores ``[n]`` and, per side, the rows it steers towards it.
Decisions = dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]

TENSOR_PREFIX = GATE_TENSOR_PREFIX


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
                    registry: Any, where: str, num_layers: int | None = None) -> GateSet:
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
        members = []
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
                gate = entry.cls.from_artifact(params, dict(item.config), own)
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


def decide(rails: Sequence[Rail], model: nn.Module, num_layers: int, prompts: Sequence[str],
           enc: dict[str, torch.Tensor]) -> Decisions:
    """Per gated rail: the batch's harm scores ``[n]`` and, per side, the rows the rail
    steers towards it (``answer``: below the rail's ``below``; ``refuse``: above ``above``).

    ``prompts`` are the user messages (what text gates read), ``enc`` the encoded batch
    (what state gates read: mean-pooled in one forward pass of ``model`` that stops after the
    deepest layer any gate needs). A gate shared by several rails is scored once.
    """
    gated = [rail for rail in rails if rail.gate is not None]
    if not gated:
        return {}
    layers = sorted({layer for rail in gated
                     for layer in rail.gate.state_layers(num_layers)})  # type: ignore[union-attr]
    states = mean_prompt_states(model, gated[0].source, enc, layers) if layers else None
    scores: dict[int, torch.Tensor] = {}
    out = {}
    device = enc["input_ids"].device
    for rail in gated:
        assert rail.gate is not None
        if id(rail.gate) not in scores:
            scores[id(rail.gate)] = rail.gate.score(prompts, states, num_layers)
        score = scores[id(rail.gate)]
        sides = gate_sides(score, rail.below, rail.above)
        out[rail.name] = (score, {side: mask.to(device) for side, mask in sides.items()})
    return out


def rows_of(decisions: Decisions) -> dict[str, dict[str, torch.Tensor]]:
    """Per rail and side, the rows its gate lets it steer (what a steering session takes)."""
    return {name: sides for name, (_, sides) in decisions.items()}


def gate_telemetry(rails: Sequence[Rail], decisions: Decisions, row: int) -> list[GateTelemetry]:
    """What each rail's gate decided for ``row``: its score, thresholds and side."""
    by_name = {rail.name: rail for rail in rails}
    out = []
    for name, (score, sides) in decisions.items():
        side = next((s for s, mask in sides.items() if bool(mask[row])), None)
        out.append(GateTelemetry(rail=name, score=round(float(score[row]), 4),
                                 steered=side is not None, below=by_name[name].below,
                                 above=by_name[name].above, side=side))
    return out
