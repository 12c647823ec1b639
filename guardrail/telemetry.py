"""Telemetry records of steered generation: per layer, gate, output rail, request and step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerTelemetry:
    """What steering did at one layer of one rail for one request.

    ``energy_before``/``energy_after`` are at the last prompt position; ``mean_*_generated``
    average over generated tokens that were steered. ``steps`` counts gradient steps in total.
    """

    rail: str
    layer: int
    #: The gate side the row was steered towards (``answer``, ``refuse``; ``shared`` for an
    #: ungated rail), None when the gate left it alone.
    side: str | None = None
    energy_before: float | None = None
    energy_after: float | None = None
    steps: int = 0
    steered_positions: int = 0
    gated_positions: int = 0
    nonfinite_positions: int = 0
    generated_positions: int = 0
    mean_energy_before_generated: float | None = None
    mean_energy_after_generated: float | None = None


@dataclass
class GateTelemetry:
    """A rail's gate decision for one request: the harm score, whether the rail steered and
    towards which side (``answer`` below ``below``, ``refuse`` above ``above``)."""

    rail: str
    score: float
    steered: bool
    below: float | None = None
    above: float | None = None
    side: str | None = None


@dataclass
class OutputRailTelemetry:
    """What an output rail did with one answer: ``kept`` it, or had it ``answered again``
    steered towards ``side``; ``first`` is the answer it replaced, with its verdict."""

    rail: str
    action: str
    side: str | None = None
    first: dict[str, Any] | None = None


@dataclass
class GenerationTelemetry:
    """Per-request telemetry: whether steering was on, and per rail and layer what it did."""

    steered: bool
    policy: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    layers: list[LayerTelemetry] = field(default_factory=list)
    gates: list[GateTelemetry] = field(default_factory=list)
    verdict: dict[str, Any] | None = None
    seconds: float | None = None
    #: The strength asked for: a multiplier on each rail's calibrated step size (None: 1, the
    #: calibrated strength).
    strength: float | None = None
    #: What the policy's output rails did with this answer, in order.
    output_rails: list[OutputRailTelemetry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary."""
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """A compact view for log events: mean energies before/after over steered layers."""
        before = [t.energy_before for t in self.layers if t.energy_before is not None]
        after = [t.energy_after for t in self.layers if t.energy_after is not None]
        return {
            "steered": self.steered,
            **({"strength": self.strength} if self.strength is not None else {}),
            **({"gates": [{"rail": g.rail, "score": g.score, "side": g.side}
                          for g in self.gates]} if self.gates else {}),
            **({"output_rails": [{"rail": o.rail, "action": o.action, "side": o.side}
                                 for o in self.output_rails]} if self.output_rails else {}),
            "layers": sorted({t.layer for t in self.layers}),
            "mean_energy_before": sum(before) / len(before) if before else None,
            "mean_energy_after": sum(after) / len(after) if after else None,
            "steps": sum(t.steps for t in self.layers),
            "nonfinite": sum(t.nonfinite_positions for t in self.layers),
        }


@dataclass
class StepEvent:
    """One generation step (prefill or a decoded token) at one steered layer, for a whole batch."""

    rail: str
    layer: int
    phase: str
    energy_before: list[float] | None
    energy_after: list[float] | None
    steps: list[int] | None
    steered: list[bool] | None
