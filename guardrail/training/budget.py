"""The safety budget: what a calibration setting's outcome is on each validation source,
whether it holds the budget, and the choice among the settings that do.

A setting is a steering strength per side of the gate and the two thresholds: rows scoring
below ``below`` get the answer steered towards answering (the ``answer`` side), rows above
``above`` the answer steered towards refusing (the ``refuse`` side), the rest the base
model's. :mod:`guardrail.training.calibrate` gathers the evidence (answers base and steered
per side, gate scores); everything here is arithmetic on it (the report's text, curves and
plot are :mod:`guardrail.training.calibration_report`).

Every per-source count a setting produces is the base model's plus what each side changes
on the rows it takes, so the two sides are tabulated separately, per strength and threshold,
and every combination is scored at once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from guardrail.policy.training import CalibrationSection
from guardrail.policy.tuning import Point
from guardrail.steering.gating import gate_sides
from guardrail.training.sources import TrainingPrompt

#: Thresholds tried per side: quantiles of the validation scores, plus "never".
THRESHOLD_STEPS = 60
#: Gate sides; a side's steering strength is a grid point of the steerer's tunable params
#: (:data:`guardrail.policy.tuning.Point`).
SIDES = ("answer", "refuse")


@dataclass
class Outcome:
    """One validation source under one setting: counts of refusals, flips and steered rows."""

    source: str
    context: str
    n: int
    base_refused: int
    refused: int
    right_way: int
    wrong_way: int
    steered: int
    #: Rows steered towards answering (harmful sources) / refusing (benign sources).
    against: int = 0
    #: What the wrong-way budget charges: the wrong-way flips, and on a benign source every row
    #: the base model answers that is steered towards refusing (flipped on validation or not:
    #: on prompts like it elsewhere it may flip). A benign row the base model already refuses
    #: cannot be flipped the wrong way by steering towards refusal, so it is not charged.
    charged: int = 0

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
    """One candidate: a strength per side, the two thresholds, and what they do per source."""

    answer: Point | None
    refuse: Point | None
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
        """Mean right-answer rate of the benign sources plus that of the harmful ones."""
        return objective(self.outcomes)

    @property
    def benign_compliance(self) -> float:
        """Mean compliance over the benign sources."""
        return _mean(o.good for o in self.outcomes.values() if o.context == "benign")

    @property
    def harmful_refusal(self) -> float:
        """Mean refusal over the harmful sources."""
        return _mean(o.good for o in self.outcomes.values() if o.context == "harmful")

    def steerer(self, side: str) -> dict[str, Any] | None:
        """The steerer values chosen for ``side`` (None: the side steers nothing)."""
        point = self.answer if side == "answer" else self.refuse
        return None if point is None else dict(point)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"sides": {side: {"steerer": self.steerer(side)} for side in SIDES},
                "gate": {"below": self.below, "above": self.above},
                "benign_compliance": round(self.benign_compliance, 4),
                "harmful_refusal": round(self.harmful_refusal, 4),
                "outcomes": {k: o.to_dict() for k, o in self.outcomes.items()},
                "cross_family": {k: o.to_dict() for k, o in self.held_out.items()},
                "violations": self.violations}


def objective(found: dict[str, Outcome]) -> float:
    """What calibration maximises: mean benign compliance + mean harmful refusal."""
    benign = [o.good for o in found.values() if o.context == "benign"]
    harmful = [o.good for o in found.values() if o.context == "harmful"]
    return (_mean(benign) if benign else 0.0) + (_mean(harmful) if harmful else 0.0)


def _mean(values: Any) -> float:
    items = list(values)
    return sum(items) / len(items) if items else math.nan


@dataclass
class Evidence:
    """Per validation prompt: its source, context and base verdict; per side and strength the
    steered verdicts of the rows answered that way (``covered``); the two gate scores
    (shipped, cross-family)."""

    prompts: list[TrainingPrompt]
    base_refused: torch.Tensor
    steered_refused: dict[tuple[str, Point], torch.Tensor]
    scores: torch.Tensor
    held_out_scores: torch.Tensor
    covered: dict[tuple[str, Point], torch.Tensor] = field(default_factory=dict)

    @functools.cached_property
    def sources(self) -> dict[str, tuple[str, torch.Tensor]]:
        """Source name -> (its context, the mask of its prompts), in order of appearance."""
        out: dict[str, tuple[str, torch.Tensor]] = {}
        for name in dict.fromkeys(p.source for p in self.prompts):
            mask = torch.tensor([p.source == name for p in self.prompts])
            out[name] = (next(p.context for p in self.prompts if p.source == name), mask)
        return out

    @functools.cached_property
    def harmful(self) -> torch.Tensor:
        """``[n]``: True for prompts of the harmful context."""
        return torch.tensor([p.context == "harmful" for p in self.prompts])

    def points(self, side: str) -> list[Point]:
        """The strengths tried on ``side``, in order."""
        return sorted(point for s, point in self.steered_refused if s == side)

    def covers(self, side: str, point: Point) -> torch.Tensor:
        """``[n]``: rows with a steered answer on ``side`` at ``point``."""
        found = self.covered.get((side, point))
        return found if found is not None else torch.ones(len(self.prompts), dtype=torch.bool)


def outcomes(evidence: Evidence, sides: dict[str, torch.Tensor],
             points: dict[str, Point | None]) -> dict[str, Outcome]:
    """Per source: what the user gets when the rows of each side (``sides[side]``: a mask)
    get the answer steered towards it at ``points[side]``."""
    refused = evidence.base_refused.clone()
    steered = torch.zeros_like(refused)
    against = torch.zeros_like(refused)
    towards_refusal = torch.zeros_like(refused)
    for side, rows in sides.items():
        point = points.get(side)
        if point is None or not bool(rows.any()):
            continue
        refused = torch.where(rows, evidence.steered_refused[(side, point)], refused)
        steered |= rows
        against |= rows & (evidence.harmful if side == "answer" else ~evidence.harmful)
        if side == "refuse":
            towards_refusal |= rows
    base = evidence.base_refused
    out = {}
    for name, (context, mask) in evidence.sources.items():
        b, r = base[mask], refused[mask]
        harmful = context == "harmful"
        right = (~b & r) if harmful else (b & ~r)
        wrong = (b & ~r) if harmful else (~b & r)
        charged = wrong if harmful else wrong | (towards_refusal[mask] & ~b)
        out[name] = Outcome(name, context, int(mask.sum()), int(b.sum()), int(r.sum()),
                            int(right.sum()), int(wrong.sum()), int(steered[mask].sum()),
                            int(against[mask].sum()), int(charged.sum()))
    return out


def violations(found: dict[str, Outcome], budget: CalibrationSection, label: str) -> list[str]:
    """What breaks the budget, one line per source and rule."""
    problems = []
    for o in found.values():
        if o.context == "harmful" and o.refused < o.base_refused - budget.max_refusal_drop * o.n:
            problems.append(f"{label} {o.source}: refusal {o.refused}/{o.n} < base "
                            f"{o.base_refused}/{o.n} - {budget.max_refusal_drop}")
        if o.charged > budget.max_wrong_way * o.n:
            problems.append(f"{label} {o.source}: {o.charged}/{o.n} flipped the wrong way"
                            + (" or steered towards refusing" if o.context == "benign" else "")
                            + f" (> {budget.max_wrong_way})")
        if o.context == "harmful" and o.against > budget.max_harmful_steered * o.n:
            problems.append(f"{label} {o.source}: {o.against}/{o.n} harmful prompts steered "
                            f"towards answering (> {budget.max_harmful_steered})")
    return problems


def thresholds(scores: torch.Tensor, near: list[float] | None = None) -> list[float | None]:
    """Candidate thresholds: evenly spaced quantiles of ``scores`` and the values ``near``
    (where the budget's edge lies, every score counts), then ``None`` (never)."""
    qs = torch.linspace(0, 1, THRESHOLD_STEPS + 1)
    values = {round(float(v), 4) for v in torch.quantile(scores.float(), qs)}
    if near:
        step = max(1, len(near) // MAX_NEAR)
        values |= {round(v, 4) for v in sorted(near)[::step]}
    return [*sorted(values), None]


#: At most this many extra candidate thresholds near the budget's edge, per side.
MAX_NEAR = 400


def side_bound(evidence: Evidence, budget: CalibrationSection, side: str) -> float:
    """The furthest a threshold of ``side`` can go within the per-side rules, on both score
    sets: below the answer side's threshold at most ``max_harmful_steered`` of each harmful
    source may lie, above the refuse side's every benign row the base model answers counts
    against ``max_wrong_way``. (+inf / -inf: no limit.)"""
    limit = budget.max_harmful_steered if side == "answer" else budget.max_wrong_way
    context = "harmful" if side == "answer" else "benign"
    bound = math.inf if side == "answer" else -math.inf
    for found, mask in evidence.sources.values():
        if found != context:
            continue
        allowed = int(limit * int(mask.sum()) + 1e-9)
        counted = mask if side == "answer" else mask & ~evidence.base_refused
        for scores in (evidence.scores, evidence.held_out_scores):
            values = scores[counted].sort(descending=side == "refuse").values
            if allowed < len(values):
                edge = float(values[allowed])
                bound = min(bound, edge) if side == "answer" else max(bound, edge)
    return bound


def side_rows(evidence: Evidence, side: str, bound: float) -> torch.Tensor:
    """Rows some threshold within ``bound`` can give ``side`` (on either score set)."""
    if side == "answer":
        return (evidence.scores < bound) | (evidence.held_out_scores < bound)
    return (evidence.scores > bound) | (evidence.held_out_scores > bound)


def _near(evidence: Evidence, budget: CalibrationSection, side: str) -> list[float]:
    """Every score on the usable side of ``side``'s bound, and the bound itself."""
    bound = side_bound(evidence, budget, side)
    pool = torch.cat([evidence.scores, evidence.held_out_scores])
    inside = pool[pool < bound] if side == "answer" else pool[pool > bound]
    return [float(v) for v in inside.unique()] + ([bound] if math.isfinite(bound) else [])


# --- the search ------------------------------------------------------------------------------
@dataclass
class _Table:
    """One side's effect per (strength, threshold) and source, on the shipped and on the
    cross-family scores: ``[P, T, S, 6]`` holding the change to the refused count, right and
    wrong flips, rows steered, rows steered against their context, and what the wrong-way
    budget charges; and whether every row a threshold takes has a steered answer (``[P, T]``).
    """

    points: list[Point | None]
    values: list[float | None]
    shipped: torch.Tensor
    held: torch.Tensor
    usable: torch.Tensor


REFUSED, RIGHT, WRONG, STEERED, AGAINST, CHARGED = range(6)


def _side_table(evidence: Evidence, side: str, values: list[float | None],
                search: bool) -> _Table:
    points: list[Point | None] = list(evidence.points(side)) if search else []
    if not points:
        points, values = [None], [None]
    membership = torch.stack([mask for _, mask in evidence.sources.values()], dim=1).float()
    base = evidence.base_refused
    harmful = evidence.harmful
    shape = (len(points), len(values), membership.shape[1], 6)
    tables = {"shipped": torch.zeros(shape), "held": torch.zeros(shape)}
    usable = torch.ones(len(points), len(values), dtype=torch.bool)
    for pi, point in enumerate(points):
        if point is None:
            continue
        steered = evidence.steered_refused[(side, point)]
        covered = evidence.covers(side, point)
        right = torch.where(harmful, ~base & steered, base & ~steered)
        wrong = torch.where(harmful, base & ~steered, ~base & steered)
        against = harmful if side == "answer" else ~harmful
        charged = wrong if side == "answer" else (wrong | (~harmful & ~base))
        per_row = torch.stack([steered.float() - base.float(), right.float(), wrong.float(),
                               torch.ones(len(base)), against.float(), charged.float()], dim=1)
        for key, scores in (("shipped", evidence.scores), ("held", evidence.held_out_scores)):
            for ti, value in enumerate(values):
                below, above = (value, None) if side == "answer" else (None, value)
                rows = gate_sides(scores, below, above)[side]
                if bool((rows & ~covered).any()):
                    usable[pi, ti] = False
                tables[key][pi, ti] = membership.T @ (rows.float()[:, None] * per_row)
    return _Table(points, values, tables["shipped"], tables["held"], usable)


def choose(evidence: Evidence, budget: CalibrationSection, *, search_below: bool,
           search_above: bool, fixed: tuple[float | None, float | None] = (None, None)
           ) -> tuple[Setting | None, list[Setting]]:
    """Every combination of strengths and thresholds scored; returns the best feasible
    setting (None if none is) and, for the report, the best setting per strength pair and
    threshold of each side (the trade-off curves).

    Ties go to the setting that steers fewer rows, then to the smaller steerer values (in the
    order the steerer declares them tunable).
    """
    pool = torch.cat([evidence.scores, evidence.held_out_scores])
    answer = _side_table(evidence, "answer",
                         thresholds(pool, _near(evidence, budget, "answer")) if search_below
                         else [fixed[0]], search_below or fixed[0] is not None)
    refuse = _side_table(evidence, "refuse",
                         thresholds(pool, _near(evidence, budget, "refuse")) if search_above
                         else [fixed[1]], search_above or fixed[1] is not None)
    contexts = [context for context, _ in evidence.sources.values()]
    n = torch.tensor([float(mask.sum()) for _, mask in evidence.sources.values()])
    base_refused = torch.tensor([float(evidence.base_refused[mask].sum())
                                 for _, mask in evidence.sources.values()])
    is_harmful = torch.tensor([c == "harmful" for c in contexts])

    def combine(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        # [Pa, Tb, S, 5] + [Pr, Ta, S, 5] -> [Pa, Tb, Pr, Ta, S, 5]
        return a[:, :, None, None] + r[None, None]

    totals = {key: combine(getattr(answer, key), getattr(refuse, key))
              for key in ("shipped", "held")}
    ok = torch.ones(totals["shipped"].shape[:4], dtype=torch.bool)
    for key in ("shipped", "held"):
        t = totals[key]
        refused = base_refused + t[..., REFUSED]
        against_answer = getattr(answer, key)[..., AGAINST][:, :, None, None]
        drop_ok = ~is_harmful | (refused >= base_refused - budget.max_refusal_drop * n - 1e-9)
        wrong_ok = t[..., CHARGED] <= budget.max_wrong_way * n + 1e-9
        steer_ok = ~is_harmful | (against_answer <= budget.max_harmful_steered * n + 1e-9)
        ok &= (drop_ok & wrong_ok & steer_ok).all(dim=-1)
    ok &= answer.usable[:, :, None, None] & refuse.usable[None, None]
    no_below = torch.tensor([v is None for v in answer.values])
    no_above = torch.tensor([v is None for v in refuse.values])
    below_v = torch.tensor([math.inf if v is None else v for v in answer.values])
    above_v = torch.tensor([-math.inf if v is None else v for v in refuse.values])
    ordered = ((below_v[:, None] < above_v[None, :]) | no_below[:, None] | no_above[None, :])
    ok &= ordered[None, :, None, :]
    refused = base_refused + totals["shipped"][..., REFUSED]
    good = torch.where(is_harmful, refused, n - refused) / n
    zero = torch.zeros(good.shape[:-1])
    benign_mean = good[..., ~is_harmful].mean(-1) if bool((~is_harmful).any()) else zero
    harmful_mean = good[..., is_harmful].mean(-1) if bool(is_harmful.any()) else zero
    score = benign_mean + harmful_mean
    steered = totals["shipped"][..., STEERED].sum(-1)

    def setting_at(index: tuple[int, int, int, int]) -> Setting:
        pa, tb, pr, ta = index
        points = {"answer": answer.points[pa], "refuse": refuse.points[pr]}
        below, above = answer.values[tb], refuse.values[ta]
        shipped = outcomes(evidence, gate_sides(evidence.scores, below, above), points)
        held = outcomes(evidence, gate_sides(evidence.held_out_scores, below, above), points)
        setting = Setting(points["answer"], points["refuse"], below, above, shipped, held)
        setting.violations = (violations(shipped, budget, "shipped gate") +
                              violations(held, budget, "cross-family gate"))
        if not bool(ok[index]) and not setting.violations:
            setting.violations = ["a threshold takes rows calibration did not answer steered"]
        return setting

    # Best objective; ties: fewer rows steered, then smaller steerer values and lower thresholds
    # (argmax takes the first of equals, and both are listed in ascending order).
    rank = score - 1e-6 * steered / max(float(n.sum()), 1.0)

    def best(mask: torch.Tensor, key: torch.Tensor) -> tuple[int, ...] | None:
        if not bool(mask.any()):
            return None
        masked = torch.where(mask, key, torch.full_like(key, -math.inf))
        flat = int(torch.argmax(masked.reshape(-1)))
        return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), key.shape))

    chosen_index = best(ok, rank)
    report: list[Setting] = []
    # The trade-off curves: per side's strength and threshold, the best feasible setting of
    # the other side; where none is feasible, the setting with the other side off.
    for pa in range(len(answer.points)):
        for tb in range(len(answer.values)):
            other = best(ok[pa, tb], rank[pa, tb])
            full = (pa, tb, *other) if other is not None else (pa, tb, 0, len(refuse.values) - 1)
            report.append(setting_at(full))  # type: ignore[arg-type]
    for pr in range(len(refuse.points)):
        for ta in range(len(refuse.values)):
            other = best(ok[:, :, pr, ta], rank[:, :, pr, ta])
            full = (*other, pr, ta) if other is not None else (0, len(answer.values) - 1, pr, ta)
            report.append(setting_at(full))  # type: ignore[arg-type]
    if chosen_index is None:
        return None, report
    return setting_at(chosen_index), report  # type: ignore[arg-type]
