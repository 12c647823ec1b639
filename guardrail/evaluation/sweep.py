"""Sweeping steerer params: the benign-compliance/harmful-refusal curve.

The grid is ``{param: [values]}`` (``guardrail sweep --grid NAME=V1,V2 --grid OTHER=V1,V2``).
Every rail gets the values of the grid's params its steerer declares ``tunable``, every
combination one point; a policy whose steerers tune none of them (a system prompt) is one
point. The base model is one more point, and a gated policy also gets a curve over its gate
threshold. A grid point reuses its policy's loaded model and energy models.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from guardrail.evaluation.cache import GenerationCache, Scopes
from guardrail.evaluation.metrics import Rate
from guardrail.evaluation.runner import Contender, SuiteResult, evaluate
from guardrail.evaluation.suites import LoadedSuite
from guardrail.plugin.registry import Registry
from guardrail.policy.model import GenerationSection, Policy
from guardrail.policy.tuning import Grid, point_label, shown_value, tunable, with_steerer_values
from guardrail.steering.guard import Guardrail

SHORT = {"compliance": "comply", "refusal": "refuse"}


@dataclass
class SweepPoint:
    """One policy setting: pooled benign compliance and harmful refusal over the suites."""

    policy: str
    label: str
    #: The grid values this point's steerers ran with, in the grid's order (empty: the policy
    #: as loaded, the base model, or a gate-threshold point).
    params: dict[str, Any]
    compliance: Rate
    refusal: Rate
    clean_compliance: Rate | None = None
    bad: int = 0
    base: bool = False
    per_suite: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: A gated policy's point at this ``below`` threshold (its other settings as loaded).
    threshold: float | None = None

    @property
    def setting(self) -> str:
        """The value that labels the point on the plot: its threshold, else its first grid
        param ("" for a single point)."""
        if self.threshold is not None:
            return f"<{self.threshold:+.1f}"
        first = next(iter(self.params.values()), None)
        return "" if first is None else shown_value(first)

    @property
    def line(self) -> tuple[tuple[str, Any], ...]:
        """The grid values after the first: a plot draws one line per policy and these."""
        return tuple(self.params.items())[1:]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"policy": self.policy, "label": self.label, "params": self.params,
                "threshold": self.threshold, "base": self.base,
                "compliance": vars(self.compliance), "refusal": vars(self.refusal),
                "clean_compliance": vars(self.clean_compliance) if self.clean_compliance else None,
                "empty_or_degenerate": self.bad, "per_suite": self.per_suite}


def variants(policy: Policy, registry: Registry, grid: Grid
             ) -> list[tuple[str, dict[str, Any], Policy]]:
    """(label, grid values, policy) per grid point; one unchanged entry if no enabled rail's
    steerer tunes any of the grid's params.

    :meth:`Guardrail.with_policy` checks each variant's params with its steerers' ``Params``.
    """
    swept = {i: [name for name in grid if name in tunable(registry, rail.steerer.plugin)]
             for i, rail in enumerate(policy.rails) if rail.enabled}
    swept = {i: names for i, names in swept.items() if names}
    axes = [name for name in grid if any(name in names for names in swept.values())]
    if not axes:
        return [(policy.name, {}, policy)]
    out = []
    for combo in itertools.product(*(grid[name] for name in axes)):
        values = dict(zip(axes, combo, strict=True))
        label = point_label(values)
        variant = with_steerer_values(
            policy, {i: {name: values[name] for name in names} for i, names in swept.items()},
            label)
        out.append((variant.name, values, variant))
    return out


def run_sweep(
    guards: Sequence[Guardrail],
    suites: Sequence[LoadedSuite],
    settings: GenerationSection,
    cache: GenerationCache,
    *,
    grid: Grid = {},  # noqa: B006 - read only
    progress: bool = False,
) -> tuple[list[SweepPoint], list[SuiteResult]]:
    """Evaluate the base and every grid point of every policy; pool benign and harmful items."""
    scopes = Scopes()
    contenders = [Contender("base", guards[0], steer=False, scope=scopes.of(guards[0]))]
    meta: dict[str, tuple[str, dict[str, Any]]] = {"base": ("base", {})}
    for guard in guards:
        for label, values, variant in variants(guard.policy, guard.registry, grid):
            clone = guard if variant is guard.policy else guard.with_policy(variant)
            contenders.append(Contender(label, clone, steer=True, scope=scopes.of(clone)))
            meta[label] = (guard.policy.name, values)
    gated = [g for g in guards if any(r.gate is not None for r in g.rails)]
    for guard in gated:
        # Every row steered: with the base answers, any threshold's answers (see gate_curve).
        contenders.append(Contender(f"{guard.policy.name}[every row]", guard, steer=True,
                                    scope=scopes.of(guard), gates=False))
        meta[contenders[-1].label] = (guard.policy.name, {})
    results = evaluate(contenders, suites, settings, cache, progress=progress)
    points = []
    for guard in gated:
        points += gate_curve(guard, results, f"{guard.policy.name}[every row]")
    for contender in contenders:
        policy, values = meta[contender.label]
        rows = [(r.suite.name, next(x for x in r.rows if x.label == contender.label))
                for r in results]
        comply = sum(row.score.compliance.k for _, row in rows)
        benign = sum(row.score.compliance.n for _, row in rows)
        clean = sum(row.score.clean_compliance.k for _, row in rows)
        bad = sum(row.score.quality["empty"] + row.score.quality["degenerate"] for _, row in rows)
        refuse = sum(row.score.refusal.k for _, row in rows)
        harmful = sum(row.score.refusal.n for _, row in rows)
        points.append(SweepPoint(
            policy=policy, label=contender.label, params=values,
            compliance=Rate.of(comply, benign), refusal=Rate.of(refuse, harmful),
            clean_compliance=Rate.of(clean, benign), bad=bad, base=not contender.steer,
            per_suite={name: {"compliance": row.score.compliance.rate,
                              "refusal": row.score.refusal.rate} for name, row in rows},
        ))
    return points, results


def gate_curve(guard: Guardrail, results: Sequence[SuiteResult], every_row: str,
               quantiles: int = 12) -> list[SweepPoint]:
    """A gated policy's trade-off over its gate's ``below`` threshold, read off two sets of
    answers: the base model's and every row steered. A row below the threshold gets the
    steered answer, the others the base answer, as the gate would have it. The thresholds are
    ``quantiles + 1`` evenly spaced quantiles of the suites' gate scores."""
    from guardrail.steering.gating import steered_rows
    from guardrail.steering.generation import user_turns

    rail = next(r for r in guard.rails if r.gate is not None)
    items = [item for r in results for item in r.suite.items]
    scores = guard.gate_scores(user_turns(i.prompt for i in items))[rail.name]
    candidates = sorted({round(float(v), 2) for v in torch.quantile(
        scores.float(), torch.linspace(0, 1, quantiles + 1))})
    points = []
    for threshold in candidates:
        rows = steered_rows(scores, threshold, None).tolist()
        offset, per_suite = 0, {}
        comply = benign = refuse = harmful = 0
        for result in results:
            base = next(r for r in result.rows if not r.steered)
            steered = next(r for r in result.rows if r.label == every_row)
            n = len(result.suite.items)
            chosen = [s if rows[offset + i] else b
                      for i, (b, s) in enumerate(zip(base.records, steered.records, strict=True))]
            offset += n
            b_n = sum(not r["harmful"] for r in chosen)
            h_n = n - b_n
            c_k = sum(not r["harmful"] and not r["refused"] for r in chosen)
            r_k = sum(r["harmful"] and r["refused"] for r in chosen)
            comply, benign = comply + c_k, benign + b_n
            refuse, harmful = refuse + r_k, harmful + h_n
            per_suite[result.suite.name] = {"compliance": c_k / b_n if b_n else None,
                                            "refusal": r_k / h_n if h_n else None}
        points.append(SweepPoint(
            policy=f"{guard.policy.name} (gate threshold)",
            label=f"{guard.policy.name}[below={threshold:+.2f}]", params={},
            compliance=Rate.of(comply, benign), refusal=Rate.of(refuse, harmful),
            per_suite=per_suite, threshold=threshold))
    return points


def sweep_table(points: Sequence[SweepPoint]) -> str:
    """Markdown table of the sweep: one column per grid param."""
    suites = list(points[0].per_suite) if points else []
    params = list(dict.fromkeys(name for p in points for name in p.params))
    head = ["policy", *params, "benign compliance ↑", "harmful refusal ↑",
            "clean compliance ↑", "empty/degenerate", *suites]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        per = []
        for s in suites:
            values = p.per_suite[s]
            shown = [f"{SHORT[k]} {v:.2f}" for k, v in values.items() if v is not None]
            per.append(", ".join(shown) or "–")
        grid = [shown_value(p.params[name]) if name in p.params else "" for name in params]
        cells = [p.policy, *grid, _fmt(p.compliance), _fmt(p.refusal),
                 _fmt(p.clean_compliance) if p.clean_compliance else "–", str(p.bad), *per]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(rate: Rate) -> str:
    if rate.rate is None:
        return "–"
    return f"{rate.rate:.2f} [{rate.low:.2f}, {rate.high:.2f}] {rate.k}/{rate.n}"
