"""Project targets on the results page: each steered policy checked against each goal."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Target(BaseModel):
    """A goal a policy should meet: a rate's floor, its gain over the base, or a KL ceiling."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal["compliance", "clean_compliance", "refusal", "kl"]
    suite: str | None = None
    min: float | None = None
    min_delta: float | None = None
    max: float | None = None


def target_table(targets: list[Target], report: dict[str, Any]) -> list[str]:
    """Markdown rows: each steered policy against each target (value, and met or not)."""
    labels = [c["label"] for c in report["contenders"] if c["steered"]]
    suites = {s["name"]: s for s in report["suites"]}
    lines = ["| target | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for target in targets:
        cells = []
        for label in labels:
            value, base = _target_value(target, label, suites, report.get("kl") or {})
            if value is None:
                cells.append("–")
                continue
            delta = value - base if base is not None else None
            ok = ((target.min is None or value >= target.min)
                  and (target.max is None or value <= target.max)
                  and (target.min_delta is None or (delta is not None
                                                    and delta >= target.min_delta)))
            shown = f"{value:.3f}" + (f" ({delta:+.2f})" if target.min_delta is not None
                                      and delta is not None else "")
            cells.append(f"{'✅' if ok else '❌'} {shown}")
        lines.append(f"| {_describe(target)} | " + " | ".join(cells) + " |")
    return lines


def _target_value(target: Target, label: str, suites: dict[str, Any], kl: dict[str, Any]
                  ) -> tuple[float | None, float | None]:
    if target.metric == "kl":
        entry = kl.get(label)
        return (entry["mean_kl_per_token"] if entry else None), None
    suite = suites.get(target.suite or "")
    if suite is None:
        return None, None
    rows = {r["label"]: r for r in suite["rows"]}
    base = next((r for r in suite["rows"] if not r["steered"]), None)
    row = rows.get(label)
    value = row[target.metric]["rate"] if row else None
    return value, (base[target.metric]["rate"] if base else None)


def _describe(target: Target) -> str:
    what = "mean KL (nats/token)" if target.metric == "kl" else f"{target.suite} {target.metric}"
    parts = []
    if target.min is not None:
        parts.append(f"≥ {target.min:g}")
    if target.min_delta is not None:
        parts.append(f"≥ base {target.min_delta:+g}")
    if target.max is not None:
        parts.append(f"< {target.max:g}")
    return f"{what} {' and '.join(parts)}"
