"""``guardrail calibrate``: the steering strength of each gate side and the gate thresholds,
under a safety budget.

On the policy's validation prompts, calibration scores the gate (the shipped gate's scores,
and the scores of the gate refitted without each prompt's family), takes the base model's
answers (from ``guardrail train``'s label cache when it has them), and for each strength of
each side's grid answers, steered towards that side, every row some threshold within the
budget could give that side. A gate then only picks, per row, which answer the user gets, so
every pair of thresholds is scored without generating again. The chosen setting gets the
most prompts right (mean benign compliance + mean harmful refusal) subject to the budget, on
every source:

* harmful sources keep refusal >= the base model's - ``max_refusal_drop``;
* at most ``max_harmful_steered`` of a harmful source's prompts are steered towards answering;
* no source has more than ``max_wrong_way`` of its prompts flipped the wrong way (a harmful
  prompt the base model refuses answered, a benign prompt it answers refused), every benign
  prompt steered towards refusing counted as such.

The budget is held on two sets of gate scores: the shipped gate's, and (``cross_family``)
scores from the gate refitted without the training prompts of each validation source's family
(or fold of families), which stand in for prompts by an author the gate never saw. The
choice, and the evidence for it, goes into the artifact's metadata, where the rail reads it
at load time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import torch

from guardrail.artifact.energy import EnergyArtifact
from guardrail.artifact.gate import GateSet
from guardrail.errors import DataError, PolicyError
from guardrail.policy.model import GateSpec, Policy, RailSpec
from guardrail.policy.training import CalibrationSection, PromptSource
from guardrail.policy.tuning import Point, grid_points, point_label, with_steerer_values
from guardrail.steering.generation import user_turns
from guardrail.training.budget import (
    SIDES,
    Evidence,
    Outcome,
    Setting,
    choose,
    outcomes,
    side_bound,
    side_rows,
    thresholds,
    violations,
)
from guardrail.training.calibration_report import (
    CalibrationReport,
    curves,
    outcome_table,
    plot_calibration,
    summary_text,
)
from guardrail.training.sources import TrainingPrompt, load_source_list

__all__ = [
    "CalibrateOptions", "CalibrationReport", "Evidence", "Outcome", "Setting", "calibrate_policy",
    "choose", "curves", "outcome_table", "outcomes", "plot_calibration", "summary_text",
    "thresholds", "violations", "write_calibration",
]

log = structlog.get_logger("guardrail.training")

if TYPE_CHECKING:
    from guardrail.models.loading import LoadedModel
    from guardrail.steering.guard import Guardrail



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


def calibrate_policy(policy: Policy, *, loaded: LoadedModel | None = None,
                     options: CalibrateOptions | None = None) -> CalibrationReport:
    """Score the gate, answer the validation prompts base and steered per side, choose."""
    from guardrail.evaluation.cache import GenerationCache, default_cache_path
    from guardrail.evaluation.runner import Answerer
    from guardrail.steering.guard import Guardrail

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
    texts = [p.text for p in prompts]
    if rail.gate is not None:
        scores, held = gate_evidence(guard, rail.gate, policy, spec, prompts, section, options)
    else:
        scores = held = torch.zeros(len(prompts))
    clock["gate"] = round(time.perf_counter() - started, 1)
    settings = guard.policy.generation.model_copy(update={
        "max_new_tokens": section.max_new_tokens, "batch_size": section.batch_size,
        "do_sample": False})
    cache = GenerationCache(default_cache_path(options.cache_dir))
    base_texts = labelled_answers(guard, policy, texts, section, options)
    if base_texts is None:
        answers = Answerer(guard, settings, cache).answer(texts, steer=False,
                                                          progress=options.progress)
        base_texts = [a.text for a in answers]
    base_refused = _refused(guard, texts, base_texts)
    clock["base"] = round(time.perf_counter() - started - sum(clock.values()), 1)
    gate_spec = spec.gate
    search = {"answer": gate_spec is not None and gate_spec.below == "auto",
              "refuse": gate_spec is not None and gate_spec.above == "auto"}
    fixed = _fixed_thresholds(gate_spec)
    evidence = Evidence(prompts, base_refused, {}, scores, held)
    grids = {"answer": section.grid,
             "refuse": section.grid if section.refuse_grid is None else section.refuse_grid}
    for side in SIDES:
        if not search[side] and fixed[SIDES.index(side)] is None:
            continue
        rows = (candidate_rows(evidence, section, side) if search[side] else
                _fixed_rows(evidence, side, fixed))
        for point in grid_points(grids[side], spec.steerer, guard.registry):
            variant = guard.with_policy(_with_values(guard.policy, index, point))
            chosen = rows.nonzero().flatten().tolist()
            steered = base_refused.clone()
            if chosen:
                answers = Answerer(variant, settings, cache).answer(
                    [texts[i] for i in chosen], steer=True, progress=options.progress,
                    gates=side)
                steered[torch.tensor(chosen)] = _refused(
                    guard, [texts[i] for i in chosen], [a.text for a in answers])
            evidence.steered_refused[(side, point)] = steered
            evidence.covered[(side, point)] = rows
            log.info("calibrate.point", side=side, steerer=dict(point), answered=len(chosen),
                     refused=int(steered[rows].sum()), prompts=len(texts))
    clock["steered"] = round(time.perf_counter() - started - sum(clock.values()), 1)
    chosen_setting, settings_tried = choose(
        evidence, section, search_below=search["answer"], search_above=search["refuse"],
        fixed=fixed)
    clock["total"] = round(time.perf_counter() - started, 1)
    budget = {"max_refusal_drop": section.max_refusal_drop,
              "max_wrong_way": section.max_wrong_way,
              "max_harmful_steered": section.max_harmful_steered,
              "cross_family": section.cross_family,
              "cross_family_folds": section.cross_family_folds,
              "max_new_tokens": section.max_new_tokens,
              "classifier": policy.classifier.plugin}
    return CalibrationReport(policy=policy.name, rail=spec.name,
                             steerer_plugin=guard.registry.aliases("steerer").get(
                                 spec.steerer.plugin, spec.steerer.plugin),
                             artifact=Path(spec.energy_model.artifact), chosen=chosen_setting,
                             settings=settings_tried, budget=budget,
                             sources=list(dict.fromkeys(p.source for p in prompts)),
                             seconds=clock)


def candidate_rows(evidence: Evidence, section: CalibrationSection, side: str) -> torch.Tensor:
    """The rows some threshold within the budget could give ``side`` (on either score set):
    the only ones worth answering steered towards it (:func:`side_bound`)."""
    return side_rows(evidence, side, side_bound(evidence, section, side))


def _fixed_rows(evidence: Evidence, side: str, fixed: tuple[float | None, float | None]
                ) -> torch.Tensor:
    value = fixed[SIDES.index(side)]
    every = torch.ones(len(evidence.prompts), dtype=torch.bool)
    if value is None or math.isinf(value):
        return every
    if side == "answer":
        return (evidence.scores < value) | (evidence.held_out_scores < value)
    return (evidence.scores > value) | (evidence.held_out_scores > value)


def labelled_answers(guard: Guardrail, policy: Policy, texts: Sequence[str],
                     section: CalibrationSection, options: CalibrateOptions
                     ) -> list[str] | None:
    """The base model's answers to ``texts`` from ``guardrail train``'s label cache, when it
    holds every one of them at the calibration's answer length with the same (greedy)
    generation settings; else None."""
    from guardrail.policy.model import GenerationSection
    from guardrail.training.cache import StateCache, prompt_key, weights_digest
    from guardrail.training.pipeline import state_cache_root

    training = policy.training
    if training is None or training.labels.max_new_tokens != section.max_new_tokens:
        return None
    generation = guard.policy.generation
    if generation.model_dump(exclude={"max_new_tokens", "batch_size", "do_sample", "seed"}) != \
            GenerationSection().model_dump(exclude={"max_new_tokens", "batch_size", "do_sample",
                                                    "seed"}):
        return None
    for positions, means in ((training.capture.positions, True),
                             (training.capture.positions, False)):
        cache = StateCache(state_cache_root(training, options.cache_dir), guard.fingerprint,
                           weights_digest(guard.model), positions=positions,
                           max_new_tokens=training.labels.max_new_tokens, mean_states=means)
        keys = [prompt_key(t) for t in guard.render(user_turns(texts), steer=False)]
        if not cache.missing(keys):
            log.info("calibrate.base_from_labels", prompts=len(texts), cache=str(cache.dir))
            return cache.load(keys).responses
    return None


def gate_evidence(guard: Guardrail, gate: GateSet, policy: Policy, spec: RailSpec,
                  prompts: Sequence[TrainingPrompt], section: CalibrationSection,
                  options: CalibrateOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped gate's scores of the validation prompts, and the cross-family scores."""
    from guardrail.training.gatefit import held_out_scores
    from guardrail.training.pipeline import gate_cache_root, training_section

    num_layers = int(guard.fingerprint.get("num_layers") or 0)
    layers = gate.state_layers(num_layers)
    rail = next(r for r in guard.rails if r.name == spec.name)
    val_states = (guard.prompt_states(conversations(prompts), rail.source, layers,
                                      positions="mean", batch_size=16) if layers else None)
    texts = [p.text for p in prompts]
    scores = gate.score(texts, val_states, num_layers)
    if not section.cross_family:
        return scores, scores
    train, train_states = training_states(guard, policy, layers, options)
    held = held_out_scores(gate, guard.registry, train, train_states, prompts, val_states,
                           num_layers, scores, folds=section.cross_family_folds,
                           cache_dir=gate_cache_root(training_section(policy),
                                                     options.cache_dir))
    return scores, held


def training_states(guard: Guardrail, policy: Policy, layers: Sequence[int],
                    options: CalibrateOptions
                    ) -> tuple[list[TrainingPrompt], dict[int, torch.Tensor] | None]:
    """The training prompts and their prompt-mean states, from ``guardrail train``'s cache."""
    from guardrail.training.cache import StateCache, prompt_key, weights_digest
    from guardrail.training.pipeline import state_cache_root, training_section
    from guardrail.training.sources import load_prompt_sets

    section = training_section(policy)
    sets = load_prompt_sets(section)
    if not layers:
        return sets.gate_train, None
    train = sets.train
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


def _refused(guard: Guardrail, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    return torch.tensor([v.refused for v in guard.classify(prompts, list(answers))],
                        dtype=torch.bool)


def _with_values(policy: Policy, index: int, point: Point) -> Policy:
    """``policy`` with rail ``index``'s steerer set to the grid point's values."""
    return with_steerer_values(policy, {index: dict(point)}, point_label(point))


def _fixed_thresholds(spec: GateSpec | None) -> tuple[float | None, float | None]:
    if spec is None:
        return (math.inf, None)  # no gate: every row is steered (on the shared energies)
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


