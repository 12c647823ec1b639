"""A rail as the runtime steers with it: its source, steerer and energy models, per gate side
a :class:`Direction`, its gate and thresholds; the rows it steers when the gates are overruled
(:func:`forced_rows`), and its strength variants (:class:`RailsByStrength`). Building one from
a policy is :mod:`guardrail.steering.build`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from guardrail.artifact.gate import GateSet
from guardrail.errors import GuardrailError
from guardrail.plugin.components import ActivationSource, Steerer
from guardrail.plugin.energy_model import EnergyModel

#: The side of an ungated rail (every row, the shared energy models).
SHARED = "shared"


@dataclass
class Direction:
    """How a rail steers the rows on one side of its gate: energy models and a steerer."""

    energies: dict[int, EnergyModel]
    steerer: Steerer


@dataclass
class Rail:
    """A steering rail ready to run: its components and, per layer, its energy model.

    ``energies`` and ``steerer`` steer every row of an ungated rail (the shared side);
    ``directions`` override them per gate side (``answer``, ``refuse``).
    """

    name: str
    layers: list[int]
    source: ActivationSource
    steerer: Steerer
    energies: dict[int, EnergyModel] = field(default_factory=dict)
    plugins: dict[str, str] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    #: Which prompts the rail steers, and its thresholds (None: every row).
    gate: GateSet | None = None
    below: float | None = None
    above: float | None = None
    #: The safety budget the artifact was calibrated to (``guardrail calibrate``), if any.
    budget: dict[str, Any] = field(default_factory=dict)
    #: Layers the policy names that are not steered, and why (non-finite artifact weights).
    disabled: dict[int, str] = field(default_factory=dict)
    #: Per gate side, its own energy models and steerer (an artifact with one set per side,
    #: or steerer values calibrated per side).
    directions: dict[str, Direction] = field(default_factory=dict)
    #: The largest strength (a multiplier on the calibrated step size) the artifact's
    #: calibration found within the safety budget; 1 without that evidence.
    strength_limit: float = 1.0

    def with_strength(self, strength: float) -> Rail:
        """This rail with every steerer steering ``strength`` times as hard (itself at 1);
        energy models, source and gate are shared."""
        if strength == 1:
            return self
        scaled: dict[int, Steerer] = {}

        def scale(steerer: Steerer) -> Steerer:
            if id(steerer) not in scaled:
                scaled[id(steerer)] = steerer.with_strength(strength)
            return scaled[id(steerer)]

        return dataclasses.replace(
            self, steerer=scale(self.steerer),
            directions={side: Direction(d.energies, scale(d.steerer))
                        for side, d in self.directions.items()})

    def direction(self, side: str) -> Direction:
        """The energy models and steerer that steer rows on ``side``."""
        found = self.directions.get(side)
        return found if found is not None else Direction(self.energies, self.steerer)

    @property
    def moves_states(self) -> bool:
        """Whether the rail moves hidden states (a strength applies to it)."""
        return bool(self.energies or self.directions) or self.steerer.strength_param is not None

    @property
    def steerers(self) -> list[Steerer]:
        """Every steerer of the rail, the shared one first (each object once)."""
        out = [self.steerer]
        for d in self.directions.values():
            if all(d.steerer is not s for s in out):
                out.append(d.steerer)
        return out




















def forced_rows(rails: Sequence[Rail], gates: bool | str, batch: int, device: torch.device | str
                ) -> dict[str, dict[str, torch.Tensor]]:
    """Every row of every rail on one side, whatever the gates say: ``gates=False`` the
    rail's default side, ``"answer"`` / ``"refuse"`` that side."""
    if gates is True:
        raise GuardrailError("forced_rows: gates=True lets the gates decide")
    if gates is not False and gates not in ("answer", "refuse"):
        raise GuardrailError(f"gates: got {gates!r}; expected True, False, 'answer' or "
                             "'refuse'")
    every = torch.ones(batch, dtype=torch.bool, device=device)
    out = {}
    for rail in rails:
        side = gates if isinstance(gates, str) else (
            SHARED if rail.energies or not rail.directions else next(iter(rail.directions)))
        out[rail.name] = {side: every}
    return out


def check_strength(strength: Any, rails: Sequence[Rail]) -> None:
    """Raise :class:`GuardrailError` unless ``strength`` is a number in ``(0, limit]`` for
    every rail that moves states, and each such rail's steerers have a strength to scale."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
            strength > 0 and strength != float("inf")):
        raise GuardrailError(f"strength: got {strength!r}; expected a number > 0 (a "
                             "multiplier on the calibrated step size; 1 is as calibrated)")
    for rail in rails:
        if not rail.moves_states:
            continue
        fixed = [s.name for s in rail.steerers if s.strength_param is None]
        if fixed:
            raise GuardrailError(f"strength: got {strength!r}; rail {rail.name!r} steers with "
                                 f"{fixed}, which have no strength to scale")
        if strength > rail.strength_limit + 1e-9:
            raise GuardrailError(
                f"strength: got {strength!r}; rail {rail.name!r} allows at most "
                f"{rail.strength_limit:g} (the largest step size its artifact's calibration "
                "found within the safety budget, over the calibrated one; run `guardrail "
                "calibrate` with a wider grid to allow more)")






class RailsByStrength:
    """A guardrail's rails at each strength asked for (a few in use; never an unbounded cache)."""

    def __init__(self, rails: list[Rail], size: int = 32) -> None:
        self.rails = rails
        self.size = size
        self._found: dict[float, list[Rail]] = {}

    def at(self, strength: float | None) -> list[Rail]:
        """The rails steering ``strength`` times as hard as calibrated (None or 1: as they
        are), after :func:`check_strength`."""
        if strength is None:
            return self.rails
        if type(strength) is float and strength in self._found:
            return self._found[strength]
        check_strength(strength, self.rails)
        if strength == 1:
            return self.rails
        strength = float(strength)
        rails = [rail.with_strength(strength) if rail.moves_states else rail
                 for rail in self.rails]
        if len(self._found) >= self.size:
            self._found.pop(next(iter(self._found)))
        self._found[strength] = rails
        return rails




