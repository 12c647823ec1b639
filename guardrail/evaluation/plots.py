"""Figures for reports: the compliance/refusal trade-off and the KL capability guard (Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardrail.errors import GuardrailError
from guardrail.policy.tuning import point_label

if TYPE_CHECKING:
    from guardrail.evaluation.kl import KLResult
    from guardrail.evaluation.sweep import SweepPoint


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise GuardrailError(
            "plots need matplotlib; install it with `pip install 'guardrail-eds[plot]'`"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(points: Sequence[SweepPoint], path: str | Path, *, title: str = "") -> Path:
    """Benign compliance (y) against harmful refusal (x): one line per policy and values of
    the grid params after the first; points labelled by the first param's value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    groups: dict[tuple[str, tuple[tuple[str, Any], ...]], list[SweepPoint]] = {}
    for point in points:
        groups.setdefault((point.policy, point.line), []).append(point)
    for index, ((policy, line), group) in enumerate(groups.items()):
        xs = [p.refusal.rate or 0.0 for p in group]
        ys = [p.compliance.rate or 0.0 for p in group]
        if group[0].base:
            ax.scatter(xs, ys, marker="*", s=220, color="black", zorder=5, label="base")
            continue
        label = f"{policy} ({point_label(line)})" if line else policy
        marker = "o" if len(group) > 1 else "s"
        ax.plot(xs, ys, marker=marker, linewidth=1.2, label=label)
        # Points that land on the same spot share one label: "0.2,0.5,1".
        labels: dict[tuple[float, float], list[str]] = {}
        for p, x, y in zip(group, xs, ys, strict=True):
            if p.setting:
                labels.setdefault((x, y), []).append(p.setting + (f" ({p.bad} bad)"
                                                                  if p.bad else ""))
        for (x, y), names in labels.items():
            # Each line labels at its own height, so coinciding points of two lines stay legible.
            ax.annotate(",".join(names), (x, y), textcoords="offset points",
                        xytext=(4, 4 - 9 * (index % 4)), fontsize=7)
    ax.set_xlabel("harmful refusal rate (higher is safer)")
    ax.set_ylabel("benign compliance rate (higher is more helpful)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or "Trade-off: labels are the first grid value (and empty/degenerate "
                 "answers)")
    return _save(fig, path, plt)


def plot_kl(kl: dict[str, KLResult], path: str | Path) -> Path:
    """Left: mean KL per answer position; right: distribution of per-prompt mean KL."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, result in kl.items():
        left.plot(range(len(result.per_position)), result.per_position, label=label)
    left.set_xlabel("answer token position")
    left.set_ylabel("mean KL(base ‖ steered), nats")
    left.set_yscale("symlog", linthresh=1e-3)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    labels = list(kl)
    right.boxplot([kl[label].per_prompt or [0.0] for label in labels])
    right.set_xticks(range(1, len(labels) + 1), labels, rotation=20, fontsize=8)
    right.set_ylabel("per-prompt mean KL, nats/token")
    right.set_yscale("symlog", linthresh=1e-3)
    right.set_ylim(bottom=0)
    right.axhline(0.1, color="red", linestyle="--", linewidth=1, label="0.1 target")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle("Capability guard on benign prompts (teacher-forced base answers)")
    return _save(fig, path, plt)


def _save(fig: Any, path: str | Path, plt: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_gate_roc(report: dict[str, Any], path: str | Path) -> Path | None:
    """ROC of each gated policy's harm score on each suite with benign and harmful items
    (None when no row has gate scores and both contexts)."""
    curves = []
    for suite in report["suites"]:
        for row in suite["rows"]:
            records = row.get("records") or []
            if not row.get("gate") or not records or "gate_score" not in records[0]:
                continue
            scores = [(r["gate_score"], r["harmful"]) for r in records]
            if len({h for _, h in scores}) < 2:
                continue
            curves.append((f"{row['label']} on {suite['name']} (AUROC {row['gate']['auroc']})",
                           scores))
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, scores in curves:
        ordered = sorted(scores, key=lambda item: -item[0])
        positives = sum(h for _, h in ordered)
        negatives = len(ordered) - positives
        tpr, fpr, tp, fp = [0.0], [0.0], 0, 0
        for _, harmful in ordered:
            tp, fp = tp + harmful, fp + (not harmful)
            tpr.append(tp / positives)
            fpr.append(fp / negatives)
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("benign prompts scored above the threshold")
    ax.set_ylabel("harmful prompts scored above the threshold")
    ax.set_title("harm gate ROC")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path, plt)
