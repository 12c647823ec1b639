"""``guardrail train`` end to end: prompts -> labels and states -> per-layer models -> artifact.

Stages (each with a progress bar): load the prompt sets; generate, label and capture states
(cached per batch, so an interrupted run resumes); train an energy model per layer; rank
layers on validation and write the top k into the rail's artifact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch

from guardrail.artifact.gate import GateSet
from guardrail.console import progress_bar
from guardrail.errors import PolicyError
from guardrail.plugin.components import ActivationSource
from guardrail.plugin.energy_model import EnergyModel
from guardrail.policy.model import Policy, RailSpec
from guardrail.policy.training import TrainingSection
from guardrail.steering.rails import SHARED
from guardrail.training.cache import StateCache, weights_digest
from guardrail.training.labelling import (
    CaptureStats,
    LabelledSet,
    check_cells,
    generate_and_capture,
    label,
)
from guardrail.training.selection import select_layers, write_artifact
from guardrail.training.sources import PromptSets, load_prompt_sets
from guardrail.training.trainer import train_layers

log = structlog.get_logger("guardrail.training")

if TYPE_CHECKING:
    from guardrail.models.loading import LoadedModel
    from guardrail.plugin.registry import Registry



@dataclass
class TrainOptions:
    """Run-time choices that are not part of the policy."""

    output: str | Path | None = None
    cache_dir: str | Path | None = None
    device: str | None = None
    progress: bool = True
    train_total: int | None = None
    val_total: int | None = None
    top_k: int | None = None
    threads: int | None = 1


@dataclass
class TrainReport:
    """What a training run did: data, labels, per-layer metrics, selection, artifact."""

    policy: str
    rail: str
    model: str
    artifact: Path | None
    prompts: dict[str, dict[str, int]]
    cells: dict[str, dict[str, int]]
    capture: CaptureStats
    sides: dict[str, SideResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] | None = None

    @property
    def layers(self) -> list[Any]:
        """Per-layer metrics of the shared set (of every side's, side by side, otherwise)."""
        return [m for result in self.sides.values() for m in result.layers]

    @property
    def selected(self) -> list[int]:
        """The layers the artifact keeps (every side's, ascending)."""
        return sorted({layer for result in self.sides.values() for layer in result.selected})


@dataclass
class SideResult:
    """One energy-model set (shared, or a gate side's): per-layer metrics, the kept layers and
    their models."""

    layers: list[Any]
    selected: list[int]
    models: dict[int, EnergyModel] = field(default_factory=dict, repr=False)


def training_section(policy: Policy) -> TrainingSection:
    """The policy's ``training:`` section, or an error saying how to add one."""
    if policy.training is None:
        raise PolicyError(str(policy.path or policy.name), [
            "training: missing; `guardrail train` needs a training section naming prompt sources, "
            "e.g. training: {sources: [{path: benign.jsonl, context: benign}, "
            "{path: harmful.jsonl, context: harmful}]} (see docs/training.md)"
        ])
    return policy.training


def pick_rail(policy: Policy, name: str | None) -> tuple[int, RailSpec]:
    """The rail to train: ``name``, else the first rail with an energy model."""
    where = str(policy.path or policy.name)
    for index, rail in enumerate(policy.rails):
        if rail.energy_model is not None and (name is None or rail.name == name):
            if rail.energy_model.artifact is None:
                raise PolicyError(where, [f"rails[{index}].energy_model.artifact: missing; "
                                          "name the file `guardrail train` should write"])
            return index, rail
    names = [r.name for r in policy.rails if r.energy_model is not None]
    if name is None:
        raise PolicyError(where, ["rails: no rail has an energy_model to train"])
    raise PolicyError(where, [f"training.rail: got {name!r}; expected one of {names} "
                              "(rails with an energy_model)"])


def state_cache_root(section: TrainingSection, override: str | Path | None) -> Path:
    """``override``, else ``training.capture.cache_dir``, else ``<guardrail cache>/states``."""
    from guardrail.cache import cache_root

    if override is not None:
        return Path(override).expanduser()
    if section.capture.cache_dir is not None:
        return Path(section.capture.cache_dir).expanduser()
    return cache_root() / "states"


class Session:
    """A policy's model loaded for training, with its activation source and state cache."""

    def __init__(self, policy: Policy, rail: RailSpec, *, loaded: LoadedModel | None = None,
                 options: TrainOptions | None = None) -> None:
        from guardrail.steering.guard import Guardrail

        options = options or TrainOptions()
        section = training_section(policy)
        # The artifact does not exist yet: load the model and classifier without rails.
        bare = policy.model_copy(update={"rails": []})
        self.guard = Guardrail.from_policy(bare, loaded=loaded, device=options.device)
        source = self.guard.registry.create(
            "activation_source", rail.activation_source.plugin, rail.activation_source.params
        )
        assert isinstance(source, ActivationSource)
        self.source = source
        self.fingerprint = self.guard.fingerprint
        self.cache = StateCache(
            state_cache_root(section, options.cache_dir), self.fingerprint,
            weights_digest(self.guard.model), positions=section.capture.positions,
            max_new_tokens=section.labels.max_new_tokens, mean_states=rail.gate is not None,
        )
        self.section = section

    def capture(self, sets: PromptSets, progress: bool) -> CaptureStats:
        """Generate, label-ready responses and states for every prompt not yet cached."""
        prompts = [*sets.train, *sets.val]
        bar = progress_bar(len(prompts), progress, "1/3 label + capture", "prompt")
        try:
            return generate_and_capture(
                self.guard, self.source, prompts, self.cache, self.section.labels,
                positions=self.section.capture.positions, progress=bar,
            )
        finally:
            bar.close()

    def label(self, sets: PromptSets) -> tuple[LabelledSet, LabelledSet, list[str]]:
        """Classify cached responses into cells; raises when a side is empty."""
        train = label(self.guard, sets.train, self.cache)
        val = label(self.guard, sets.val, self.cache)
        warnings = check_cells(train, "training.sources") + check_cells(val, "training.validation")
        for warning in warnings:
            log.warning("train.cell_empty", detail=warning)
        return train, val, warnings


def load_sets(section: TrainingSection, options: TrainOptions) -> PromptSets:
    """The prompt sets of a run (demo runs pass smaller totals)."""
    started = time.perf_counter()
    sets = load_prompt_sets(section, train_total=options.train_total, val_total=options.val_total)
    log.info("train.prompts_loaded", train=len(sets.train), val=len(sets.val),
             seconds=round(time.perf_counter() - started, 2))
    return sets


def train_policy(
    policy: Policy, *, rail: str | None = None, loaded: LoadedModel | None = None,
    options: TrainOptions | None = None,
) -> TrainReport:
    """Run every stage for ``policy`` and write the artifact; returns what happened."""
    options = options or TrainOptions()
    section = training_section(policy)
    index, spec = pick_rail(policy, rail or section.rail)
    assert spec.energy_model is not None and spec.energy_model.artifact is not None
    where = str(policy.path or policy.name)
    clock = _Clock()
    sets = load_sets(section, options)
    clock.lap("prompts")
    session = Session(policy, spec, loaded=loaded, options=options)
    clock.lap("model")
    stats = session.capture(sets, options.progress)
    clock.lap("capture")
    train, val, warnings = session.label(sets)
    clock.lap("label")

    registry = session.guard.registry
    plugin = spec.energy_model.plugin
    model_cls = registry.get("energy_model", plugin).cls
    assert issubclass(model_cls, EnergyModel)
    params = registry.params("energy_model", plugin, spec.energy_model.params)
    num_layers, hidden = int(train.states.shape[1]), int(train.states.shape[2])
    candidates = _candidate_layers(section, num_layers, where)
    top_k = min(options.top_k or section.selection.top_k, len(candidates))
    sides: dict[str, SideResult] = {}
    for side, (train_part, val_part) in side_splits(section.trainer.sides, train, val).items():
        label = "" if side == SHARED else f" ({side} side)"
        bar = progress_bar(section.trainer.epochs, options.progress,
                           f"2/3 train all layers{label}", "epoch")
        try:
            trained = train_layers(
                train_part.states, train_part.cells, val_part.states, val_part.cells,
                candidates, lambda: model_cls.build(hidden, params), section.trainer,
                seed=section.seed, progress=bar, threads=options.threads,
            )
        finally:
            bar.close()
        selected = select_layers(trained.metrics, section.selection.metric, top_k)
        sides[side] = SideResult([trained.metrics[layer] for layer in candidates], selected,
                                 {layer: trained.models[layer] for layer in selected})
    clock.lap("train")
    gate = None
    gate_figures_: dict[str, Any] | None = None
    if spec.gate is not None:
        gate, gate_figures_ = fit_gate(policy, spec, registry, sets, train, val, num_layers,
                                       options)
    clock.lap("gate")
    output = Path(options.output or spec.energy_model.artifact)
    seconds = clock.laps
    report = TrainReport(
        policy=policy.name, rail=spec.name, model=session.guard.loaded.name, artifact=output,
        prompts=sets.summary(), cells={"train": train.counts(), "val": val.counts()},
        capture=stats, sides=sides, warnings=warnings, seconds=seconds, gate=gate_figures_,
    )
    bar = progress_bar(1, options.progress, "3/3 select + save", "artifact")
    write_artifact(output, plugin=plugin, fingerprint=session.fingerprint,
                   sets={side: result.models for side, result in sides.items()},
                   metadata=_metadata(section, report, top_k), gate=gate,
                   dtype=section.selection.dtype)
    bar.update(1)
    bar.close()
    clock.lap("save")
    seconds["total"] = round(sum(seconds.values()), 1)
    log.info("train.artifact_written", path=str(output), rail=spec.name,
             layers={side: r.selected for side, r in sides.items()}, seconds=seconds["total"])
    return report


def side_splits(mode: str, train: LabelledSet, val: LabelledSet
                ) -> dict[str, tuple[LabelledSet, LabelledSet]]:
    """What each energy-model set trains on: everything (``shared``), or per gate side the
    prompts of one context: ``answer`` the benign ones, ``refuse`` the harmful ones."""
    if mode == "shared":
        return {SHARED: (train, val)}
    out = {}
    for side, context in (("answer", "benign"), ("refuse", "harmful")):
        out[side] = tuple(part.subset(torch.tensor([p.context == context for p in part.prompts]))
                          for part in (train, val))
    return out  # type: ignore[return-value]


def _metadata(section: TrainingSection, report: TrainReport, top_k: int) -> dict[str, Any]:
    """What the artifact records about how it was made."""
    from guardrail import __version__

    return {
        "guardrail_version": __version__,
        "policy": report.policy,
        "rail": report.rail,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": {"prompts": report.prompts, "cells": report.cells,
                 "sources": [s.model_dump() for s in section.sources],
                 "validation": [s.model_dump() for s in section.validation]},
        "labels": section.labels.model_dump(),
        "capture": {"positions": section.capture.positions},
        "trainer": section.trainer.model_dump(),
        "seed": section.seed,
        "selection": {**section.selection.model_dump(), "top_k": top_k,
                      "selected": report.selected},
        "metrics": {str(m.layer): m.to_dict() for m in report.layers},
        **({"sides": {side: {"selected": r.selected,
                             "metrics": {str(m.layer): m.to_dict() for m in r.layers}}
                      for side, r in report.sides.items()}} if SHARED not in report.sides
           else {}),
        "seconds": report.seconds,
        **({"gate": report.gate} if report.gate is not None else {}),
    }


def fit_gate(policy: Policy, spec: RailSpec, registry: Registry, sets: PromptSets,
             train: LabelledSet, val: LabelledSet, num_layers: int,
             options: TrainOptions) -> tuple[GateSet, dict[str, Any]]:
    """Fit the rail's gate on the training prompts (harmful context = 1), gate-only sources
    included, and report how it separates the validation prompts per source: with its own
    scores and, when the policy's calibration checks across families, with the scores of the
    gate refitted without each family (or fold), which calibration then reuses."""
    from guardrail.policy.training import CalibrationSection
    from guardrail.training.gatefit import (
        blank_gate,
        fit_gate_set,
        gate_figures,
        held_out_scores,
        text_only,
    )

    assert spec.gate is not None
    members = [(m.plugin, m.params, m.weight) for m in spec.gate.members]
    started = time.perf_counter()
    prompts = sets.gate_train
    reads_states = not text_only(blank_gate(members, registry), num_layers)
    if sets.gate and reads_states:
        raise PolicyError(str(policy.path or policy.name), [
            f"training.sources: gate_only sources are read by text-only gates, but the gate of "
            f"rail {spec.name!r} has members reading the model's states "
            f"({[m.plugin for m in spec.gate.members]})"])
    states = _mean_states(train) if reads_states else None
    cache_dir = gate_cache_root(training_section(policy), options.cache_dir)
    gates = fit_gate_set(members, registry, prompts, states, num_layers, cache_dir)
    val_states = _mean_states(val) if reads_states else None
    scores = gates.score([p.text for p in val.prompts], val_states, num_layers)
    calibration = policy.calibration or CalibrationSection()
    held = None
    if calibration.cross_family:
        held = held_out_scores(gates, registry, prompts, states, val.prompts, val_states,
                               num_layers, scores, folds=calibration.cross_family_folds,
                               cache_dir=cache_dir)
    figures = gate_figures(scores, held, val.prompts, val.refused)
    figures["members"] = [m.plugin for m in gates.members]
    figures["fitted_on"] = len(prompts)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    gates.report = figures
    log.info("train.gate_fitted", members=figures["members"], auroc=figures["auroc"],
             cross_family_auroc=figures.get("cross_family_auroc"), seconds=figures["seconds"])
    return gates, figures


def gate_cache_root(section: TrainingSection, override: str | Path | None) -> Path:
    """Where fitted gates are cached: ``gates/`` in the state cache."""
    return state_cache_root(section, override) / "gates"


def _mean_states(labelled: LabelledSet) -> dict[int, torch.Tensor] | None:
    if labelled.mean_states is None:
        return None
    return {layer: labelled.mean_states[:, layer].float()
            for layer in range(labelled.mean_states.shape[1])}


class _Clock:
    """Seconds per stage, in order."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 1)
        self._last = now


def _candidate_layers(section: TrainingSection, num_layers: int, where: str) -> list[int]:
    layers = section.selection.layers
    if layers is None:
        return list(range(num_layers))
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad or not layers:
        raise PolicyError(where, [
            f"training.selection.layers: got {layers!r}; expected indices in 0..{num_layers - 1} "
            f"(the model has {num_layers} layers)"
        ])
    return sorted(set(layers))
