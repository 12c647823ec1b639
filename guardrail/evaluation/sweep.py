"""Sweeping a steerer's step size and step count: the benign-compliance/harmful-refusal curve.

Every rail whose steerer declares ``eta``/``steps`` in its ``sweep_params`` gets the grid
value; a policy without such a steerer (a system prompt, an ablation) is one point. The base
model is one more point. A grid point reuses its policy's loaded model and energy models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from guardrail.evaluation.cache import GenerationCache, Scopes
from guardrail.evaluation.metrics import Rate
from guardrail.evaluation.runner import Contender, SuiteResult, evaluate
from guardrail.evaluation.suites import LoadedSuite
from guardrail.plugin.manager import Registry
from guardrail.policy.model import GenerationSection, Policy
from guardrail.steering.guard import Guardrail

AXES = ("eta", "steps", "strength")
"""The grid's axes, as steerers name them in ``sweep_params``: the step size and the step
count (gradient steering), or one strength (an ablation's share of the component removed)."""
SHORT = {"compliance": "comply", "refusal": "refuse"}


@dataclass
class SweepPoint:
    """One policy setting: pooled benign compliance and harmful refusal over the suites."""

    policy: str
    label: str
    eta: float | None
    steps: int | None
    compliance: Rate
    refusal: Rate
    clean_compliance: Rate | None = None
    bad: int = 0
    base: bool = False
    per_suite: dict[str, dict[str, Any]] = field(default_factory=dict)
    strength: float | None = None
    #: A gated policy's point at this ``below`` threshold (its other settings as loaded).
    threshold: float | None = None

    @property
    def setting(self) -> str:
        """The grid value that labels the point on the plot ("" for a single point)."""
        if self.threshold is not None:
            return f"<{self.threshold:+.1f}"
        if self.strength is not None:
            return f"{self.strength:g}"
        return "" if self.eta is None else f"{self.eta:g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"policy": self.policy, "label": self.label, "eta": self.eta, "steps": self.steps,
                "strength": self.strength, "threshold": self.threshold,
                "base": self.base, "compliance": vars(self.compliance),
                "refusal": vars(self.refusal),
                "clean_compliance": vars(self.clean_compliance) if self.clean_compliance else None,
                "empty_or_degenerate": self.bad, "per_suite": self.per_suite}


def variants(policy: Policy, registry: Registry, etas: Sequence[float], steps: Sequence[int]
             ) -> list[tuple[str, float | None, int | None, Policy]]:
    """(label, eta, steps, policy) per grid point; one unchanged entry if nothing is tunable.

    The variants are schema-checked; :meth:`Guardrail.with_policy` checks their params.
    """
    swept = {i: _axes(registry, rail.steerer.plugin)
             for i, rail in enumerate(policy.rails) if rail.enabled}
    tunable = {i: axes for i, axes in swept.items() if axes}
    if not tunable:
        return [(policy.name, None, None, policy)]
    out: list[tuple[str, float | None, int | None, Policy]] = []
    for eta in etas:
        for k in steps:
            data = policy.model_dump()
            for i, axes in tunable.items():
                params = data["rails"][i]["steerer"]["params"]
                params.update({axis: value for axis, value in (("eta", eta), ("steps", k))
                               if axis in axes})
            label = f"{policy.name}[eta={eta:g},steps={k}]"
            data["name"] = label
            variant = Policy.model_validate(data)
            variant._path = policy.path
            out.append((label, eta, k, variant))
    return out


def strength_variants(policy: Policy, registry: Registry, strengths: Sequence[float]
                      ) -> list[tuple[str, float, Policy]]:
    """(label, strength, policy) per strength, for a policy whose steerers take a
    ``strength`` (an ablation); empty when none does."""
    tunable = [i for i, rail in enumerate(policy.rails)
               if rail.enabled and "strength" in _axes(registry, rail.steerer.plugin)]
    out = []
    for value in strengths if tunable else ():
        data = policy.model_dump()
        for i in tunable:
            data["rails"][i]["steerer"]["params"]["strength"] = value
        data["name"] = f"{policy.name}[strength={value:g}]"
        variant = Policy.model_validate(data)
        variant._path = policy.path
        out.append((data["name"], value, variant))
    return out


def _axes(registry: Registry, steerer: str) -> set[str]:
    """The grid axes a steerer lets the sweep set."""
    return set(AXES) & set(registry.get("steerer", steerer).attribute("sweep_params"))


def run_sweep(
    guards: Sequence[Guardrail],
    suites: Sequence[LoadedSuite],
    settings: GenerationSection,
    cache: GenerationCache,
    *,
    etas: Sequence[float],
    steps: Sequence[int],
    strengths: Sequence[float] = (),
    progress: bool = False,
) -> tuple[list[SweepPoint], list[SuiteResult]]:
    """Evaluate the base and every grid point of every policy; pool benign and harmful items.

    A policy whose steerer takes a ``strength`` is swept over ``strengths`` (when given)
    instead of being one point.
    """
    scopes = Scopes()
    contenders = [Contender("base", guards[0], steer=False, scope=scopes.of(guards[0]))]
    meta: dict[str, tuple[str, float | None, int | None, float | None]] = {
        "base": ("base", None, None, None)}
    for guard in guards:
        by_strength = strength_variants(guard.policy, guard.registry, strengths)
        for label, value, variant in by_strength:
            clone = guard.with_policy(variant)
            contenders.append(Contender(label, clone, steer=True, scope=scopes.of(clone)))
            meta[label] = (guard.policy.name, None, None, value)
        if by_strength:
            continue
        for label, eta, k, variant in variants(guard.policy, guard.registry, etas, steps):
            clone = guard if variant is guard.policy else guard.with_policy(variant)
            contenders.append(Contender(label, clone, steer=True, scope=scopes.of(clone)))
            meta[label] = (guard.policy.name, eta, k, None)
    gated = [g for g in guards if any(r.gate is not None for r in g.rails)]
    for guard in gated:
        # Every row steered: with the base answers, any threshold's answers (see gate_curve).
        contenders.append(Contender(f"{guard.policy.name}[every row]", guard, steer=True,
                                    scope=scopes.of(guard), gates=False))
        meta[contenders[-1].label] = (guard.policy.name, None, None, None)
    results = evaluate(contenders, suites, settings, cache, progress=progress)
    points = []
    for guard in gated:
        points += gate_curve(guard, results, f"{guard.policy.name}[every row]")
    for contender in contenders:
        policy, eta, k, strength = meta[contender.label]
        rows = [(r.suite.name, next(x for x in r.rows if x.label == contender.label))
                for r in results]
        comply = sum(row.score.compliance.k for _, row in rows)
        benign = sum(row.score.compliance.n for _, row in rows)
        clean = sum(row.score.clean_compliance.k for _, row in rows)
        bad = sum(row.score.quality["empty"] + row.score.quality["degenerate"] for _, row in rows)
        refuse = sum(row.score.refusal.k for _, row in rows)
        harmful = sum(row.score.refusal.n for _, row in rows)
        points.append(SweepPoint(
            policy=policy, label=contender.label, eta=eta, steps=k,
            compliance=Rate.of(comply, benign), refusal=Rate.of(refuse, harmful),
            clean_compliance=Rate.of(clean, benign), bad=bad, base=not contender.steer,
            per_suite={name: {"compliance": row.score.compliance.rate,
                              "refusal": row.score.refusal.rate} for name, row in rows},
            strength=strength,
        ))
    return points, results


def gate_curve(guard: Guardrail, results: Sequence[SuiteResult], every_row: str,
               steps: int = 12) -> list[SweepPoint]:
    """A gated policy's trade-off over its gate's ``below`` threshold, read off two sets of
    answers: the base model's and every row steered. A row below the threshold gets the
    steered answer, the others the base answer, as the gate would have it."""
    from guardrail.steering.gating import steered_rows
    from guardrail.steering.generation import user_turns

    rail = next(r for r in guard.rails if r.gate is not None)
    items = [item for r in results for item in r.suite.items]
    scores = guard.gate_scores(user_turns(i.prompt for i in items))[rail.name]
    candidates = sorted({round(float(v), 2) for v in torch.quantile(
        scores.float(), torch.linspace(0, 1, steps + 1))})
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
            label=f"{guard.policy.name}[below={threshold:+.2f}]", eta=None, steps=None,
            compliance=Rate.of(comply, benign), refusal=Rate.of(refuse, harmful),
            per_suite=per_suite, threshold=threshold))
    return points


def sweep_table(points: Sequence[SweepPoint]) -> str:
    """Markdown table of the sweep."""
    suites = list(points[0].per_suite) if points else []
    head = ["policy", "eta", "steps", "benign compliance ↑", "harmful refusal ↑",
            "clean compliance ↑", "empty/degenerate", "strength", *suites]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        per = []
        for s in suites:
            values = p.per_suite[s]
            shown = [f"{SHORT[k]} {v:.2f}" for k, v in values.items() if v is not None]
            per.append(", ".join(shown) or "–")
        lines.append(
            f"| {p.policy} | {'' if p.eta is None else f'{p.eta:g}'} | "
            f"{'' if p.steps is None else p.steps} | {_fmt(p.compliance)} | {_fmt(p.refusal)} | "
            f"{_fmt(p.clean_compliance) if p.clean_compliance else '–'} | {p.bad} | "
            f"{'' if p.strength is None else f'{p.strength:g}'} | "
            + " | ".join(per) + " |"
        )
    return "\n".join(lines) + "\n"


def _fmt(rate: Rate) -> str:
    if rate.rate is None:
        return "–"
    return f"{rate.rate:.2f} [{rate.low:.2f}, {rate.high:.2f}] {rate.k}/{rate.n}"
