"""``guardrail calibrate``: the steering strength and gate thresholds, under a safety budget.

On the policy's validation prompts, calibration answers every prompt with the base model and,
for each steering strength of the grid, with every row steered (the gate off). A gate then
only picks, per row, which of the two answers the user gets, so every pair of thresholds can
be scored without generating again. The chosen setting answers the most benign prompts
subject to the budget, on every source:

* harmful sources keep refusal >= the base model's - ``max_refusal_drop``;
* no source has more than ``max_wrong_way`` of its prompts flipped the wrong way (a harmful
  prompt the base model refuses answered, a benign prompt it answers refused).

The budget is held on two sets of gate scores: the shipped gate's, and (``cross_family``)
scores from the gate refitted without the training prompts of each validation source's family,
which stand in for prompts by an author the gate never saw. The choice, and the evidence for
it, goes into the artifact's metadata, where the rail reads it at load time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch

from guardrail.energy import EnergyArtifact
from guardrail.errors import DataError, PolicyError
from guardrail.gating import GateMember, GateSet, steered_rows
from guardrail.generation import user_turns
from guardrail.policy import Policy, RailSpec
from guardrail.training.sources import TrainingPrompt, load_source_list
from guardrail.training_config import CalibrationSection, PromptSource

log = structlog.get_logger("guardrail.training")

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


def outcomes(evidence: Evidence, point: tuple[float, int], rows: torch.Tensor
             ) -> dict[str, Outcome]:
    """Per source: what the user gets when ``rows`` get the steered answer at ``point``."""
    refused = torch.where(rows, evidence.steered_refused[point], evidence.base_refused)
    base = evidence.base_refused
    out = {}
    for name in dict.fromkeys(p.source for p in evidence.prompts):
        mask = torch.tensor([p.source == name for p in evidence.prompts])
        context = next(p.context for p in evidence.prompts if p.source == name)
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


def calibration_sources(policy: Policy, section: CalibrationSection) -> list[PromptSource]:
    """The validation sources, each tagged with its context (default: training.validation)."""
    tagged = [PromptSource(**s.model_dump(), context="harmful") for s in section.harmful]
    tagged += [PromptSource(**s.model_dump(), context="benign") for s in section.benign]
    if not tagged and policy.training is not None:
        tagged = list(policy.training.validation)
    where = str(policy.path or policy.name)
    contexts = {s.context for s in tagged}
    if contexts != {"benign", "harmful"}:
        raise PolicyError(where, ["calibration: needs harmful and benign validation sources "
                                  "(calibration.harmful / calibration.benign, or "
                                  "training.validation)"])
    return tagged


def load_calibration_prompts(policy: Policy, section: CalibrationSection, seed: int
                             ) -> list[TrainingPrompt]:
    """The validation prompts, deduplicated (a prompt in two sources keeps the first)."""
    lists = load_source_list(calibration_sources(policy, section), seed=seed,
                             where="calibration")
    seen: set[str] = set()
    prompts = []
    for group in lists:
        for prompt in group:
            if prompt.text not in seen:
                seen.add(prompt.text)
                prompts.append(prompt)
    return prompts


def refit_without_families(gate: GateSet, registry: Any, train: Sequence[TrainingPrompt],
                           train_states: dict[int, torch.Tensor] | None,
                           val: Sequence[TrainingPrompt],
                           val_states: dict[int, torch.Tensor] | None, num_layers: int,
                           scores: torch.Tensor) -> torch.Tensor:
    """Per validation prompt, its score from the gate refitted without its family's training
    prompts (its shipped score when no training prompt shares its family)."""
    held = scores.clone()
    for family in dict.fromkeys(p.family for p in val):
        keep = torch.tensor([p.family != family for p in train])
        if bool(keep.all()):
            continue
        rows = torch.tensor([p.family == family for p in val])
        contexts = {p.context for p, k in zip(train, keep.tolist(), strict=True) if k}
        if contexts != {"benign", "harmful"}:
            log.warning("calibrate.family_not_refitted", family=family,
                        reason="its removal leaves one context")
            continue
        refit = GateSet([GateMember(m.plugin, registry.create("gate", m.plugin,
                                                              m.gate.params.model_dump()),
                                    m.weight) for m in gate.members])
        picked = keep.nonzero().flatten()
        refit.fit([train[i].text for i in picked.tolist()],
                  None if train_states is None else {k: v[picked] for k, v in
                                                     train_states.items()},
                  torch.tensor([train[i].context == "harmful" for i in picked.tolist()]),
                  num_layers)
        index = rows.nonzero().flatten()
        held[index] = refit.score([val[i].text for i in index.tolist()],
                                  None if val_states is None else
                                  {k: v[index] for k, v in val_states.items()}, num_layers)
        log.info("calibrate.family_refitted", family=family, prompts=int(rows.sum()),
                 training_prompts_left=int(keep.sum()))
    return held


def rail_for(policy: Policy, section: CalibrationSection) -> tuple[int, RailSpec]:
    """The rail calibration tunes: ``calibration.rail``, else ``training.rail``, else the
    first rail with an energy model."""
    from guardrail.training.pipeline import pick_rail

    name = section.rail or (policy.training.rail if policy.training else None)
    return pick_rail(policy, name)


def unthresholded(policy: Policy, index: int) -> Policy:
    """``policy`` with rail ``index``'s gate thresholds set to never (numbers, not ``auto``),
    so it loads before any calibration exists; calibration scores the gate itself."""
    rails = list(policy.rails)
    spec = rails[index]
    if spec.gate is not None:
        gate = spec.gate.model_copy(update={"below": None, "above": None})
        rails[index] = spec.model_copy(update={"gate": gate})
    return policy.model_copy(update={"rails": rails})


def write_calibration(artifact: Path, report: CalibrationReport, command: str) -> None:
    """Store the chosen setting in the artifact (tensors untouched)."""
    if report.chosen is None:
        raise DataError(f"{artifact}: no setting holds the budget; nothing written")
    EnergyArtifact.update_metadata(artifact, "calibration", report.metadata(command))


def conversations(prompts: Sequence[TrainingPrompt]) -> list[list[dict[str, str]]]:
    """One user turn per prompt."""
    return user_turns(p.text for p in prompts)


@dataclass
class CalibrateOptions:
    """Run-time choices that are not part of the policy."""

    cache_dir: str | Path | None = None
    device: str | None = None
    progress: bool = True
    limit: int | None = None


def calibrate_policy(policy: Policy, *, loaded: Any = None,
                     options: CalibrateOptions | None = None) -> CalibrationReport:
    """Answer the validation prompts base and steered, score the gate, choose a setting."""
    from guardrail.evaluation.cache import GenerationCache, default_cache_path
    from guardrail.evaluation.runner import Answerer
    from guardrail.guard import Guardrail

    options = options or CalibrateOptions()
    section = policy.calibration or CalibrationSection()
    index, spec = rail_for(policy, section)
    assert spec.energy_model is not None and spec.energy_model.artifact is not None
    clock: dict[str, float] = {}
    started = time.perf_counter()
    seed = policy.training.seed if policy.training else 0
    prompts = load_calibration_prompts(policy, section, seed)
    if options.limit:
        prompts = _per_source(prompts, options.limit)
    guard = Guardrail.from_policy(unthresholded(policy, index), loaded=loaded,
                                  device=options.device)
    rail = guard.rails[[r.name for r in guard.rails].index(spec.name)]
    settings = guard.policy.generation.model_copy(update={
        "max_new_tokens": section.max_new_tokens, "batch_size": section.batch_size,
        "do_sample": False})
    cache = GenerationCache(default_cache_path(options.cache_dir))
    texts = [p.text for p in prompts]
    base = Answerer(guard, settings, cache).answer(texts, steer=False, progress=options.progress)
    base_refused = _refused(guard, texts, base)
    clock["base"] = round(time.perf_counter() - started, 1)
    steered: dict[tuple[float, int], torch.Tensor] = {}
    for eta in section.grid.eta:
        for steps in section.grid.steps:
            variant = guard.with_policy(_with_strength(guard.policy, index, eta, steps))
            answers = Answerer(variant, settings, cache).answer(
                texts, steer=True, progress=options.progress, gates=False)
            steered[(eta, steps)] = _refused(guard, texts, answers)
            log.info("calibrate.point", eta=eta, steps=steps,
                     refused=int(steered[(eta, steps)].sum()), prompts=len(texts))
    clock["steered"] = round(time.perf_counter() - started - clock["base"], 1)
    if rail.gate is not None:
        scores, held = gate_evidence(guard, rail.gate, policy, spec, prompts, section, options)
    else:
        scores = held = torch.zeros(len(prompts))
    clock["gate"] = round(time.perf_counter() - started - clock["base"] - clock["steered"], 1)
    evidence = Evidence(prompts, base_refused, steered, scores, held)
    gate_spec = spec.gate
    chosen, settings_tried = choose(
        evidence, section,
        search_below=gate_spec is not None and gate_spec.below == "auto",
        search_above=gate_spec is not None and gate_spec.above == "auto",
        fixed=_fixed_thresholds(gate_spec),
    )
    clock["total"] = round(time.perf_counter() - started, 1)
    budget = {"max_refusal_drop": section.max_refusal_drop,
              "max_wrong_way": section.max_wrong_way, "cross_family": section.cross_family,
              "max_new_tokens": section.max_new_tokens,
              "classifier": policy.classifier.plugin}
    return CalibrationReport(policy=policy.name, rail=spec.name,
                             artifact=Path(spec.energy_model.artifact), chosen=chosen,
                             settings=settings_tried, budget=budget,
                             sources=list(dict.fromkeys(p.source for p in prompts)),
                             seconds=clock)


def gate_evidence(guard: Any, gate: GateSet, policy: Policy, spec: RailSpec,
                  prompts: Sequence[TrainingPrompt], section: CalibrationSection,
                  options: CalibrateOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped gate's scores of the validation prompts, and the cross-family scores."""
    num_layers = int(guard.fingerprint.get("num_layers") or 0)
    layers = gate.state_layers(num_layers)
    rail = next(r for r in guard.rails if r.name == spec.name)
    val_states = (prompt_mean_states(guard, rail.source, conversations(prompts), layers)
                  if layers else None)
    texts = [p.text for p in prompts]
    scores = gate.score(texts, val_states, num_layers)
    if not section.cross_family:
        return scores, scores
    train, train_states = training_states(guard, policy, spec, layers, options)
    held = refit_without_families(gate, guard.registry, train, train_states, prompts,
                                  val_states, num_layers, scores)
    return scores, held


def prompt_mean_states(guard: Any, source: Any, convs: Sequence[Any], layers: Sequence[int],
                       batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Per layer ``[n, hidden]`` prompt-mean states of ``convs``, in batches."""
    from guardrail.gating import mean_prompt_states

    texts = guard.render(convs, steer=False)
    parts: list[dict[int, torch.Tensor]] = []
    for start in range(0, len(texts), batch_size):
        parts.append(mean_prompt_states(guard.model, source,
                                        guard.encode(texts[start : start + batch_size]), layers))
    return {layer: torch.cat([p[layer] for p in parts]) for layer in layers}


def training_states(guard: Any, policy: Policy, spec: RailSpec, layers: Sequence[int],
                    options: CalibrateOptions
                    ) -> tuple[list[TrainingPrompt], dict[int, torch.Tensor] | None]:
    """The training prompts and their prompt-mean states, from ``guardrail train``'s cache."""
    from guardrail.training.cache import StateCache, prompt_key, weights_digest
    from guardrail.training.pipeline import state_cache_root, training_section
    from guardrail.training.sources import load_prompt_sets

    section = training_section(policy)
    train = load_prompt_sets(section).train
    if not layers:
        return train, None
    cache = StateCache(state_cache_root(section, options.cache_dir), guard.fingerprint,
                       weights_digest(guard.model), positions=section.capture.positions,
                       max_new_tokens=section.labels.max_new_tokens, mean_states=True)
    keys = [prompt_key(t) for t in guard.render(conversations(train), steer=False)]
    missing = cache.missing(keys)
    if missing:
        where = str(policy.path or policy.name)
        raise DataError(f"{where}: {len(missing)} of {len(keys)} training prompts have no cached "
                        f"states in {cache.dir}; cross-family calibration refits the gate on "
                        f"them: run `guardrail train --policy {where}` first (or set "
                        "calibration.cross_family: false)")
    rows = cache.load(keys)
    assert rows.mean_states is not None
    return train, {layer: rows.mean_states[:, layer].float() for layer in layers}


def _refused(guard: Any, prompts: Sequence[str], answers: Sequence[Any]) -> torch.Tensor:
    return torch.tensor([v.refused for v in guard.classify(prompts, [a.text for a in answers])])


def _with_strength(policy: Policy, index: int, eta: float, steps: int) -> Policy:
    """``policy`` with rail ``index``'s steerer set to ``eta`` and ``steps``."""
    rails = list(policy.rails)
    steerer = rails[index].steerer
    params = {**steerer.params, "eta": eta, "steps": steps}
    rails[index] = rails[index].model_copy(
        update={"steerer": steerer.model_copy(update={"params": params})})
    return policy.model_copy(update={"rails": rails, "name": f"{policy.name}[eta={eta:g},"
                                                              f"steps={steps}]"})


def _fixed_thresholds(spec: Any) -> tuple[float | None, float | None]:
    if spec is None:
        return (math.inf, None)  # no gate: every row is steered
    fixed = [None if v in (None, "auto") else float(v) for v in (spec.below, spec.above)]
    return fixed[0], fixed[1]


def _per_source(prompts: list[TrainingPrompt], limit: int) -> list[TrainingPrompt]:
    counts: dict[str, int] = {}
    out = []
    for p in prompts:
        if counts.get(p.source, 0) < limit:
            counts[p.source] = counts.get(p.source, 0) + 1
            out.append(p)
    return out


# --- showing it -----------------------------------------------------------------------------
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
            f"{b['max_refusal_drop']}, max_wrong_way {b['max_wrong_way']} "
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
