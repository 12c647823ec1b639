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
    """One row per layer: accuracies, AUROCs, energy gap, threshold, best epoch, selected."""

    def num(value: float | None) -> str:
        return "    -" if value is None or value != value else f"{value:5.3f}"

    header = (f"{'layer':>5}  {'train_acc':>9}  {'val_acc':>7}  {'auroc':>5}  {'benign':>6}  "
              f"{'harmful':>7}  {'balanced':>8}  {'gap':>6}  {'thresh':>6}  {'epoch':>5}  selected")
    lines = [header]
    for m in report.layers:
        mark = "yes" if m.layer in report.selected else ""
        lines.append(
            f"{m.layer:>5}  {num(m.train_accuracy):>9}  {num(m.val_accuracy):>7}  "
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
        f"selected layers: {report.selected}",
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
        "gate": report.gate, "warnings": report.warnings, "seconds": report.seconds,
    }


def plot_layers(report: TrainReport, path: str | Path) -> Path | None:
    """Per-layer validation AUROC (benign, harmful, balanced) with the selected layers marked.

    Returns ``None`` when matplotlib is not installed (it is the optional ``plot`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers = [m.layer for m in report.layers]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for attr, label in (("benign_auroc", "benign: comply vs refuse"),
                        ("harmful_auroc", "harmful: refuse vs comply"),
                        ("balanced_auroc", "balanced")):
        values = [getattr(m, attr) for m in report.layers]
        ax.plot(layers, [v if v is not None else float("nan") for v in values], marker="o",
                markersize=3, label=label)
    for layer in report.selected:
        ax.axvspan(layer - 0.4, layer + 0.4, color="tab:green", alpha=0.12, lw=0)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("layer (shaded: selected)")
    ax.set_ylabel("validation AUROC")
    ax.set_title(f"{report.policy}: energy model per layer")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _gate_line(gate: dict[str, Any]) -> str:
    shares = ", ".join(f"{name} {info['below'].get('-0.5')}" for name, info in
                       gate["sources"].items())
    return (f"gate: validation AUROC harmful vs benign {gate['auroc']}; share of each source's "
            f"refused prompts scoring below -0.5: {shares}")


def _by_source(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())
