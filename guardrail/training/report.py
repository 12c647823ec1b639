"""How a training run is shown: cell counts, the per-layer table, JSON, a plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from guardrail.training.labelling import CELLS
from guardrail.training.pipeline import TrainReport


def cells_table(report: TrainReport) -> str:
    """Prompts per label cell, for training and validation."""
    lines = [f"{'cell':<16}{'train':>7}{'val':>7}"]
    for name in CELLS:
        lines.append(f"{name:<16}{report.cells['train'][name]:>7}{report.cells['val'][name]:>7}")
    return "\n".join(lines)


def layers_table(report: TrainReport) -> str:
    """One row per layer (per side with one energy-model set per gate side): accuracies,
    AUROCs, energy gap, threshold, best epoch, selected."""

    def num(value: float | None) -> str:
        return "    -" if value is None or value != value else f"{value:5.3f}"

    header = (f"{'side':<7}{'layer':>5}  {'train_acc':>9}  {'val_acc':>7}  {'auroc':>5}  "
              f"{'benign':>6}  {'harmful':>7}  {'balanced':>8}  {'gap':>6}  {'thresh':>6}  "
              f"{'epoch':>5}  selected")
    lines = [header]
    for side, result in report.sides.items():
        for m in result.layers:
            mark = "yes" if m.layer in result.selected else ""
            lines.append(
                f"{side:<7}{m.layer:>5}  {num(m.train_accuracy):>9}  {num(m.val_accuracy):>7}  "
                f"{num(m.val_auroc):>5}  {num(m.benign_auroc):>6}  {num(m.harmful_auroc):>7}  "
                f"{num(m.balanced_auroc):>8}  {m.energy_gap:>6.2f}  {m.threshold:>6.2f}  "
                f"{m.best_epoch:>5}  {mark}"
            )
    return "\n".join(lines)


def summary_text(report: TrainReport) -> str:
    """The whole human-readable summary printed after ``guardrail train``."""
    capture = report.capture
    parts = [
        f"policy {report.policy!r}, rail {report.rail!r}, model {report.model}",
        f"prompts: train {sum(report.prompts['train'].values())} "
        f"({_by_source(report.prompts['train'])}); val {sum(report.prompts['val'].values())}",
        f"capture: {capture.generated} generated in {capture.batches} batches "
        f"({capture.forward_passes} prefill passes, {capture.seconds:.0f}s), "
        f"{capture.cached} from cache",
        "",
        cells_table(report),
        "",
        layers_table(report),
        "",
        "selected layers: " + "; ".join(f"{side} {r.selected}" for side, r in report.sides.items()),
        *([_gate_line(report.gate)] if report.gate else []),
        f"time (s): {report.seconds}",
        f"artifact: {report.artifact}",
    ]
    parts += [f"warning: {w}" for w in report.warnings]
    return "\n".join(parts)


def report_dict(report: TrainReport, *, command: str | None = None,
                seed: int | None = None) -> dict[str, Any]:
    """JSON-ready report (``command``: how to make the artifact again)."""
    return {
        "policy": report.policy, "rail": report.rail, "model": report.model,
        "artifact": report.artifact.name if report.artifact else None,
        **({"command": command} if command else {}),
        **({"seed": seed} if seed is not None else {}),
        "prompts": report.prompts, "cells": report.cells, "capture": asdict(report.capture),
        "layers": [m.to_dict() for m in report.layers], "selected": report.selected,
        **({"sides": {side: {"layers": [m.to_dict() for m in r.layers], "selected": r.selected}
                      for side, r in report.sides.items()}} if "shared" not in report.sides
           else {}),
        "gate": report.gate, "warnings": report.warnings, "seconds": report.seconds,
    }


def plot_layers(report: TrainReport, path: str | Path) -> Path | None:
    """Per-layer validation AUROC (benign, harmful, balanced) with the selected layers marked,
    one panel per energy-model set.

    Returns ``None`` when matplotlib is not installed (it is the optional ``plot`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(report.sides), figsize=(8 * len(report.sides), 3.5),
                             squeeze=False)
    for ax, (side, result) in zip(axes[0], report.sides.items(), strict=True):
        layers = [m.layer for m in result.layers]
        for attr, label in (("benign_auroc", "benign: comply vs refuse"),
                            ("harmful_auroc", "harmful: refuse vs comply"),
                            ("balanced_auroc", "balanced")):
            values = [getattr(m, attr) for m in result.layers]
            if all(v is None for v in values):
                continue
            ax.plot(layers, [v if v is not None else float("nan") for v in values],
                    marker="o", markersize=3, label=label)
        for layer in result.selected:
            ax.axvspan(layer - 0.4, layer + 0.4, color="tab:green", alpha=0.12, lw=0)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("layer (shaded: selected)")
        ax.set_ylabel("validation AUROC")
        title = "energy model per layer" if side == "shared" else f"{side} side"
        ax.set_title(f"{report.policy}: {title}", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _gate_line(gate: dict[str, Any]) -> str:
    held = gate.get("cross_family_auroc")
    return (f"gate {gate.get('members')}: validation AUROC harmful vs benign {gate['auroc']}"
            + (f", cross-family {held}" if held is not None else "")
            + f"; fitted on {gate.get('fitted_on')} prompts in {gate.get('seconds')}s")


def _by_source(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())
