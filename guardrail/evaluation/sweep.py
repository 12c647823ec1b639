"""Sweeping a steerer's step size and step count: the benign-compliance/harmful-refusal curve.

Every rail whose steerer declares ``eta``/``steps`` in its ``sweep_params`` gets the grid
value; a policy without such a steerer (a system prompt, an ablation) is one point. The base
model is one more point. A grid point reuses its policy's loaded model and energy models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from guardrail.evaluation.cache import GenerationCache, Scopes
from guardrail.evaluation.metrics import Rate
from guardrail.evaluation.runner import Contender, SuiteResult, evaluate
from guardrail.evaluation.suites import LoadedSuite
from guardrail.guard import Guardrail
from guardrail.plugins import Registry
from guardrail.policy import GenerationSection, Policy

AXES = ("eta", "steps")
"""The grid's axes: the step size and the step count, as steerers name them in ``sweep_params``."""
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"policy": self.policy, "label": self.label, "eta": self.eta, "steps": self.steps,
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
    progress: bool = False,
) -> tuple[list[SweepPoint], list[SuiteResult]]:
    """Evaluate the base and every grid point of every policy; pool benign and harmful items."""
    scopes = Scopes()
    contenders = [Contender("base", guards[0], steer=False, scope=scopes.of(guards[0]))]
    meta: dict[str, tuple[str, float | None, int | None]] = {"base": ("base", None, None)}
    for guard in guards:
        for label, eta, k, variant in variants(guard.policy, guard.registry, etas, steps):
            clone = guard if variant is guard.policy else guard.with_policy(variant)
            contenders.append(Contender(label, clone, steer=True, scope=scopes.of(clone)))
            meta[label] = (guard.policy.name, eta, k)
    results = evaluate(contenders, suites, settings, cache, progress=progress)
    points = []
    for contender in contenders:
        policy, eta, k = meta[contender.label]
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
        ))
    return points, results


def sweep_table(points: Sequence[SweepPoint]) -> str:
    """Markdown table of the sweep."""
    suites = list(points[0].per_suite) if points else []
    head = ["policy", "eta", "steps", "benign compliance ↑", "harmful refusal ↑",
            "clean compliance ↑", "empty/degenerate", *suites]
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
            + " | ".join(per) + " |"
        )
    return "\n".join(lines) + "\n"


def _fmt(rate: Rate) -> str:
    if rate.rate is None:
        return "–"
    return f"{rate.rate:.2f} [{rate.low:.2f}, {rate.high:.2f}] {rate.k}/{rate.n}"
