"""What ``guardrail calibrate`` reports and stores: the chosen setting with its evidence, the
trade-off curves per gate side (in the artifact, where the rail reads the strength limit from
them), the printed summary and the plot.

A curve point names the steerer values it was steered with under ``steerer`` (a
``{param: value}`` mapping, the names the steerer declares tunable).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardrail.policy.tuning import Point, point_label
from guardrail.training.budget import SIDES, Outcome, Setting


@dataclass
class CalibrationReport:
    """What ``guardrail calibrate`` found and wrote."""

    policy: str
    rail: str
    #: The steerer plugin the chosen values are for (another steerer ignores them).
    steerer_plugin: str
    artifact: Path
    chosen: Setting | None
    settings: list[Setting]
    budget: dict[str, Any]
    sources: list[str]
    seconds: dict[str, float]

    def metadata(self, command: str) -> dict[str, Any]:
        """What the artifact keeps under ``metadata.calibration``."""
        assert self.chosen is not None
        c = self.chosen
        sides = {side: {"steerer": c.steerer(side)} for side in SIDES
                 if c.steerer(side) is not None}
        shared = c.steerer("answer") or c.steerer("refuse")
        return {"rail": self.rail, "steerer_plugin": self.steerer_plugin,
                **({"steerer": shared} if shared else {}),
                "sides": sides, "gate": {"below": c.below, "above": c.above},
                "budget": self.budget, "evidence": c.to_dict(),
                "curves": curves(self.settings), "command": command,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": self.seconds}


def curves(settings: Sequence[Setting]) -> dict[str, list[dict[str, Any]]]:
    """Per side: at each threshold (and strength), the benign compliance, harmful refusal and
    worst per-source wrong-way share of the best setting with that threshold."""
    found: dict[str, dict[tuple[Point, float], dict[str, Any]]] = {"answer": {}, "refuse": {}}
    for s in settings:
        for side, point, value in (("answer", s.answer, s.below), ("refuse", s.refuse, s.above)):
            if point is None or value is None or (point, value) in found[side]:
                continue
            worst = max(o.charged / o.n for o in s.outcomes.values())
            found[side][(point, value)] = {
                "steerer": dict(point), "threshold": value,
                "benign_compliance": round(s.benign_compliance, 4),
                "harmful_refusal": round(s.harmful_refusal, 4),
                "worst_wrong_way": round(worst, 4), "feasible": s.feasible}
    return {side: [rows[key] for key in sorted(rows)] for side, rows in found.items()}


def outcome_table(found: dict[str, Outcome], held: dict[str, Outcome] | None = None) -> str:
    """Per source: base and calibrated rate of right answers, flips, rows steered."""
    lines = [f"{'source':<34}{'context':<9}{'n':>5}  {'base':>5} -> {'now':>5}  "
             f"{'right':>5} {'wrong':>5} {'steered':>7}" + ("  cross-family wrong" if held else "")]
    for name, o in found.items():
        extra = f"  {held[name].wrong_way:>5}" if held and name in held else ""
        lines.append(f"{name[:33]:<34}{o.context:<9}{o.n:>5}  {o.base_good:>5.2f} -> "
                     f"{o.good:>5.2f}  {o.right_way:>5} {o.wrong_way:>5} {o.steered:>7}{extra}")
    return "\n".join(lines)


def summary_text(report: CalibrationReport) -> str:
    """What ``guardrail calibrate`` prints: the budget, the choice and its evidence."""
    b = report.budget
    head = (f"policy {report.policy!r}, rail {report.rail!r}: budget max_refusal_drop "
            f"{b['max_refusal_drop']}, max_wrong_way {b['max_wrong_way']}, max_harmful_steered "
            f"{b.get('max_harmful_steered', 'none')} "
            f"({'shipped and cross-family gate scores' if b['cross_family'] else 'shipped gate'}"
            f"), {b['max_new_tokens']} new tokens, {len(report.settings)} settings reported")
    rates = "right answers: compliance on benign sources, refusal on harmful ones"
    if report.chosen is None:
        closest = min(report.settings, key=lambda s: len(s.violations))
        return "\n".join([head, "no setting holds the budget; the closest breaks:",
                          *[f"  {v}" for v in closest.violations]])
    c = report.chosen
    return "\n".join([
        head,
        f"chosen: answer side {c.steerer('answer')} below {c.below}; refuse side "
        f"{c.steerer('refuse')} above {c.above}; mean benign compliance "
        f"{c.benign_compliance:.3f}, mean harmful refusal {c.harmful_refusal:.3f}",
        f"({rates})",
        outcome_table(c.outcomes, c.held_out),
        f"time (s): {report.seconds}",
    ])


def plot_calibration(report: CalibrationReport, path: Path) -> Path | None:
    """The trade-off curve of each side's threshold: benign compliance, harmful refusal and
    the worst source's wrong-way share as the threshold moves (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    found = curves(report.settings)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, side, title in ((axes[0], "answer", "answer side: steer rows below the threshold"),
                            (axes[1], "refuse", "refuse side: steer rows above the threshold")):
        points = list(dict.fromkeys(tuple(c["steerer"].items()) for c in found[side]))
        for point in points:
            rows = [c for c in found[side] if tuple(c["steerer"].items()) == point]
            x = [c["threshold"] for c in rows]
            label = point_label(point) or "as set"
            ax.plot(x, [c["benign_compliance"] for c in rows], marker=".",
                    label=f"benign compliance ({label})")
            ax.plot(x, [c["harmful_refusal"] for c in rows], marker=".", ls="--",
                    label=f"harmful refusal ({label})")
            ax.plot(x, [c["worst_wrong_way"] for c in rows], ls=":",
                    label=f"worst wrong-way share ({label})")
        chosen = report.chosen
        value = None if chosen is None else (chosen.below if side == "answer" else chosen.above)
        if value is not None:
            ax.axvline(value, color="black", lw=1, label="chosen")
        ax.axhline(report.budget["max_wrong_way"], color="tab:red", lw=0.8, ls=":")
        ax.set_xlabel("gate threshold (standard deviations of training scores)")
        ax.set_title(title, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
    axes[0].set_ylabel("share (validation)")
    fig.suptitle(f"{report.policy}: calibration trade-off per gate side")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
