"""The safety budget: what a calibration setting's outcome is on each validation source,
whether it holds the budget, and the choice among the settings that do.

:mod:`guardrail.training.calibrate` gathers the evidence (answers base and steered, gate
scores); everything here is arithmetic on it, with the report's text and plot.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from guardrail.gating import steered_rows
from guardrail.training.sources import TrainingPrompt
from guardrail.training_config import CalibrationSection

#: Thresholds tried per side: quantiles of the validation scores, plus "never".
THRESHOLD_STEPS = 60


@dataclass
class Outcome:
    """One validation source under one setting: counts of refusals and of flips."""

    source: str
    context: str
    n: int
    base_refused: int
    refused: int
    right_way: int
    wrong_way: int
    steered: int

    @property
    def good(self) -> float:
        """Share answered right: complied if benign, refused if harmful."""
        ok = self.n - self.refused if self.context == "benign" else self.refused
        return ok / self.n if self.n else math.nan

    @property
    def base_good(self) -> float:
        """The same share for the base model."""
        ok = self.n - self.base_refused if self.context == "benign" else self.base_refused
        return ok / self.n if self.n else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the rates."""
        return {**asdict(self), "rate": round(self.good, 4), "base_rate": round(self.base_good, 4)}


@dataclass
class Setting:
    """One candidate: a grid point, the two thresholds, and what they do per source."""

    eta: float
    steps: int
    below: float | None
    above: float | None
    outcomes: dict[str, Outcome]
    held_out: dict[str, Outcome]
    violations: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        """Within budget on both the shipped and the cross-family scores."""
        return not self.violations

    @property
    def objective(self) -> float:
        """Mean compliance over the benign sources (what calibration maximises)."""
        rates = [o.good for o in self.outcomes.values() if o.context == "benign"]
        return sum(rates) / len(rates) if rates else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"steerer": {"eta": self.eta, "steps": self.steps},
                "gate": {"below": self.below, "above": self.above},
                "benign_compliance": round(self.objective, 4),
                "outcomes": {k: o.to_dict() for k, o in self.outcomes.items()},
                "cross_family": {k: o.to_dict() for k, o in self.held_out.items()},
                "violations": self.violations}


@dataclass
class Evidence:
    """Per validation prompt: its source, context, the base verdict and the steered verdicts
    per grid point; and the two gate scores (shipped, cross-family)."""

    prompts: list[TrainingPrompt]
    base_refused: torch.Tensor
    steered_refused: dict[tuple[float, int], torch.Tensor]
    scores: torch.Tensor
    held_out_scores: torch.Tensor

    @functools.cached_property
    def sources(self) -> dict[str, tuple[str, torch.Tensor]]:
        """Source name -> (its context, the mask of its prompts), in order of appearance."""
        out = {}
        for name in dict.fromkeys(p.source for p in self.prompts):
            mask = torch.tensor([p.source == name for p in self.prompts])
            out[name] = (next(p.context for p in self.prompts if p.source == name), mask)
        return out


def outcomes(evidence: Evidence, point: tuple[float, int], rows: torch.Tensor
             ) -> dict[str, Outcome]:
    """Per source: what the user gets when ``rows`` get the steered answer at ``point``."""
    refused = torch.where(rows, evidence.steered_refused[point], evidence.base_refused)
    base = evidence.base_refused
    out = {}
    for name, (context, mask) in evidence.sources.items():
        b, r = base[mask], refused[mask]
        harmful = context == "harmful"
        right = (~b & r) if harmful else (b & ~r)
        wrong = (b & ~r) if harmful else (~b & r)
        out[name] = Outcome(name, context, int(mask.sum()), int(b.sum()), int(r.sum()),
                            int(right.sum()), int(wrong.sum()), int(rows[mask].sum()))
    return out


def violations(found: dict[str, Outcome], budget: CalibrationSection, label: str) -> list[str]:
    """What breaks the budget, one line per source and rule."""
    problems = []
    for o in found.values():
        if o.context == "harmful" and o.refused < o.base_refused - budget.max_refusal_drop * o.n:
            problems.append(f"{label} {o.source}: refusal {o.refused}/{o.n} < base "
                            f"{o.base_refused}/{o.n} - {budget.max_refusal_drop}")
        if o.wrong_way > budget.max_wrong_way * o.n:
            problems.append(f"{label} {o.source}: {o.wrong_way}/{o.n} flipped the wrong way "
                            f"(> {budget.max_wrong_way})")
        if o.context == "harmful" and o.steered > budget.max_harmful_steered * o.n:
            problems.append(f"{label} {o.source}: {o.steered}/{o.n} harmful prompts steered "
                            f"(> {budget.max_harmful_steered})")
    return problems


def thresholds(scores: torch.Tensor) -> list[float | None]:
    """Candidate thresholds: evenly spaced quantiles of ``scores``, then ``None`` (never)."""
    qs = torch.linspace(0, 1, THRESHOLD_STEPS + 1)
    values = sorted({round(float(v), 4) for v in torch.quantile(scores.float(), qs)})
    return [*values, None]


def choose(evidence: Evidence, budget: CalibrationSection, *, search_below: bool,
           search_above: bool, fixed: tuple[float | None, float | None] = (None, None)
           ) -> tuple[Setting | None, list[Setting]]:
    """Every candidate setting scored; the best feasible one (None if none is).

    Ties go to the setting that steers fewer rows, then to the smaller step size.
    """
    pool = torch.cat([evidence.scores, evidence.held_out_scores])
    belows = thresholds(pool) if search_below else [fixed[0]]
    aboves = thresholds(pool) if search_above else [fixed[1]]
    settings = []
    for point in sorted(evidence.steered_refused):
        for below in belows:
            for above in aboves:
                if below is not None and above is not None and below >= above:
                    continue
                shipped = outcomes(evidence, point, steered_rows(evidence.scores, below, above))
                held = outcomes(evidence, point,
                                steered_rows(evidence.held_out_scores, below, above))
                setting = Setting(point[0], point[1], below, above, shipped, held)
                setting.violations = (violations(shipped, budget, "shipped gate") +
                                      violations(held, budget, "cross-family gate"))
                settings.append(setting)
    feasible = [s for s in settings if s.feasible]
    if not feasible:
        return None, settings

    def rank(s: Setting) -> tuple[float, int, float]:
        return (-round(s.objective, 6), sum(o.steered for o in s.outcomes.values()), s.eta)

    return min(feasible, key=rank), settings


# --- running it -----------------------------------------------------------------------------
@dataclass
class CalibrationReport:
    """What ``guardrail calibrate`` found and wrote."""

    policy: str
    rail: str
    artifact: Path
    chosen: Setting | None
    settings: list[Setting]
    budget: dict[str, Any]
    sources: list[str]
    seconds: dict[str, float]

    def metadata(self, command: str) -> dict[str, Any]:
        """What the artifact keeps under ``metadata.calibration``."""
        assert self.chosen is not None
        return {"rail": self.rail, "steerer": {"eta": self.chosen.eta,
                                                "steps": self.chosen.steps},
                "gate": {"below": self.chosen.below, "above": self.chosen.above},
                "budget": self.budget, "evidence": self.chosen.to_dict(),
                "frontier": frontier(self.settings), "command": command,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": self.seconds}


def frontier(settings: Sequence[Setting]) -> list[dict[str, Any]]:
    """Per grid point, the best benign compliance reachable at each worst harmful refusal
    change (the trade-off curve calibration chose from; feasibility aside)."""
    out = []
    for point in sorted({(s.eta, s.steps) for s in settings}):
        curve: dict[float, float] = {}
        for s in (x for x in settings if (x.eta, x.steps) == point):
            harmful = [o for o in s.outcomes.values() if o.context == "harmful"]
            if not harmful:
                continue
            drop = round(min((o.refused - o.base_refused) / o.n for o in harmful), 4)
            curve[drop] = max(curve.get(drop, 0.0), round(s.objective, 4))
        out.append({"eta": point[0], "steps": point[1],
                    "points": [[d, c] for d, c in sorted(curve.items())]})
    return out


def outcome_table(found: dict[str, Outcome], held: dict[str, Outcome] | None = None) -> str:
    """Per source: base and calibrated rate of right answers, flips, rows steered."""
    lines = [f"{'source':<28}{'context':<9}{'n':>5}  {'base':>5} -> {'now':>5}  "
             f"{'right':>5} {'wrong':>5} {'steered':>7}" + ("  cross-family wrong" if held else "")]
    for name, o in found.items():
        extra = f"  {held[name].wrong_way:>5}" if held and name in held else ""
        lines.append(f"{name[:27]:<28}{o.context:<9}{o.n:>5}  {o.base_good:>5.2f} -> "
                     f"{o.good:>5.2f}  {o.right_way:>5} {o.wrong_way:>5} {o.steered:>7}{extra}")
    return "\n".join(lines)


def summary_text(report: CalibrationReport) -> str:
    """What ``guardrail calibrate`` prints: the budget, the choice and its evidence."""
    b = report.budget
    head = (f"policy {report.policy!r}, rail {report.rail!r}: budget max_refusal_drop "
            f"{b['max_refusal_drop']}, max_wrong_way {b['max_wrong_way']}, max_harmful_steered "
            f"{b.get('max_harmful_steered', 'none')} "
            f"({'shipped and cross-family gate scores' if b['cross_family'] else 'shipped gate'}"
            f"), {b['max_new_tokens']} new tokens, {len(report.settings)} settings tried")
    rates = "right answers: compliance on benign sources, refusal on harmful ones"
    if report.chosen is None:
        closest = min(report.settings, key=lambda s: len(s.violations))
        return "\n".join([head, "no setting holds the budget; the closest breaks:",
                          *[f"  {v}" for v in closest.violations]])
    c = report.chosen
    return "\n".join([
        head,
        f"chosen: eta {c.eta:g}, steps {c.steps}, gate below {c.below}, above {c.above}; mean "
        f"benign compliance {c.objective:.3f}",
        f"({rates})",
        outcome_table(c.outcomes, c.held_out),
        f"time (s): {report.seconds}",
    ])


def plot_calibration(report: CalibrationReport, path: Path) -> Path | None:
    """Benign compliance against the worst harmful refusal change, per grid strength, with
    the budget line and the chosen setting (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for curve in frontier(report.settings):
        points = curve["points"]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".",
                    label=f"eta {curve['eta']:g}, steps {curve['steps']}")
    ax.axvline(-report.budget["max_refusal_drop"], color="tab:red", ls="--", lw=1,
               label="refusal budget")
    if report.chosen is not None:
        c = report.chosen
        harmful = [o for o in c.outcomes.values() if o.context == "harmful"]
        drop = min((o.refused - o.base_refused) / o.n for o in harmful) if harmful else 0.0
        ax.scatter([drop], [c.objective], s=120, facecolors="none", edgecolors="black",
                   zorder=5, label="chosen")
    ax.set_xlabel("worst harmful source: refusal change vs base")
    ax.set_ylabel("mean benign compliance")
    ax.set_title(f"{report.policy}: calibration (validation)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
