"""Fitting a rail's gate, and refitting it without families of prompts (cross-family scores).

A gate is fitted on the training prompts' contexts (harmful = 1). The budget ``guardrail
calibrate`` holds must also hold for prompts by authors the gate never saw, so each
validation prompt is also scored by the gate refitted without the training prompts of its
family (or of its family's fold, for gates too slow to refit once per family).

Fitting a fine-tuned gate takes minutes, so fitted text-only gates are cached on disk, keyed
by their members' params and the exact prompts and labels: ``guardrail train`` fits the folds
once and reports their figures, and ``guardrail calibrate`` finds them there.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch
from safetensors.torch import load_file, save_file

from guardrail.artifact.gate import GateMember, GateSet
from guardrail.errors import ArtifactError, PluginError
from guardrail.evaluation.cache import digest
from guardrail.evaluation.metrics import auroc
from guardrail.plugin.components import Gate
from guardrail.training.sources import TrainingPrompt

log = structlog.get_logger("guardrail.training")

CACHE_FORMAT = "guardrail-gate-fit/2"

if TYPE_CHECKING:
    from guardrail.plugin.registry import Registry



def blank_gate(members: Sequence[tuple[str, dict[str, Any], float]], registry: Registry) -> GateSet:
    """An unfitted gate set of ``(plugin, params, weight)`` members."""
    out = []
    for plugin, params, weight in members:
        gate = registry.create("gate", plugin, params)
        assert isinstance(gate, Gate)  # the registry checked the kind
        out.append(GateMember(plugin, gate, weight))
    return GateSet(out)


def members_of(gate: GateSet) -> list[tuple[str, dict[str, Any], float]]:
    """The ``(plugin, params, weight)`` of each member (what :func:`blank_gate` takes)."""
    return [(m.plugin, m.gate.params.model_dump(mode="json"), m.weight) for m in gate.members]


def text_only(gate: GateSet, num_layers: int) -> bool:
    """Whether no member reads the model's prompt states."""
    return all(not m.gate.state_layers(num_layers) for m in gate.members)


def fit_gate_set(members: Sequence[tuple[str, dict[str, Any], float]], registry: Registry,
                 prompts: Sequence[TrainingPrompt],
                 states: dict[int, torch.Tensor] | None, num_layers: int,
                 cache_dir: Path | None) -> GateSet:
    """A gate set fitted on ``prompts`` (harmful context = 1). Each text-only member is taken
    from the cache when it was fitted on exactly these prompts before (alone or in another
    set), else fitted and cached."""
    gate = blank_gate(members, registry)
    harmful = torch.tensor([p.context == "harmful" for p in prompts])
    texts = [p.text for p in prompts]
    key = digest({"prompts": texts, "harmful": harmful.tolist()})

    def fit_member(member: GateMember, prompts: Sequence[str], own: torch.Tensor | None,
                   labels: torch.Tensor) -> torch.Tensor:
        path = None
        if cache_dir is not None and own is None:
            params = member.gate.params.model_dump(mode="json")
            name = digest({"plugin": member.plugin, "params": params, "data": key})
            path = Path(cache_dir) / f"{name[:40]}.safetensors"
            cached = _load(path, registry, member)
            if cached is not None:
                log.info("gate.fit_cached", member=member.plugin, prompts=len(prompts))
                return cached
        member.gate.fit(prompts, own, labels)
        raw = member.gate.score(prompts, own)
        if path is not None:
            _save(path, member, raw)
        return raw

    gate.fit(texts, states, harmful, num_layers, fit_member=fit_member)
    return gate


def family_folds(train: Sequence[TrainingPrompt], val: Sequence[TrainingPrompt],
                 folds: int | None) -> list[list[str]]:
    """Groups of families refitted without at once: one per validation family (``folds``
    None), or ``folds`` groups with benign and harmful families spread evenly by size."""
    families = list(dict.fromkeys(p.family for p in val))
    if folds is None:
        return [[f] for f in families]
    size = {f: sum(p.family == f for p in train) for f in families}
    context = {f: next(p.context for p in val if p.family == f) for f in families}
    groups: list[list[str]] = [[] for _ in range(min(folds, len(families)))]
    load = [0] * len(groups)
    for side in ("harmful", "benign"):
        for f in sorted((f for f in families if context[f] == side), key=lambda f: (-size[f], f)):
            i = min(range(len(groups)), key=lambda g: (load[g], g))
            groups[i].append(f)
            load[i] += size[f] or 1
    return [g for g in groups if g]


def held_out_scores(gate: GateSet, registry: Registry, train: Sequence[TrainingPrompt],
                    train_states: dict[int, torch.Tensor] | None,
                    val: Sequence[TrainingPrompt], val_states: dict[int, torch.Tensor] | None,
                    num_layers: int, scores: torch.Tensor, *, folds: int | None = None,
                    cache_dir: Path | None = None) -> torch.Tensor:
    """Per validation prompt, its score from the gate refitted without its family's (or fold's)
    training prompts; its shipped score when no training prompt shares its family."""
    held = scores.clone()
    members = members_of(gate)
    for group in family_folds(train, val, folds):
        keep = [i for i, p in enumerate(train) if p.family not in group]
        if len(keep) == len(train):
            continue
        if {train[i].context for i in keep} != {"benign", "harmful"}:
            log.warning("calibrate.family_not_refitted", families=group,
                        reason="its removal leaves one context")
            continue
        started = time.perf_counter()
        picked = torch.tensor(keep)
        refit = fit_gate_set(members, registry, [train[i] for i in keep],
                             None if train_states is None else
                             {k: v[picked] for k, v in train_states.items()},
                             num_layers, cache_dir)
        index = [i for i, p in enumerate(val) if p.family in group]
        if index:
            rows = torch.tensor(index)
            held[rows] = refit.score([val[i].text for i in index],
                                     None if val_states is None else
                                     {k: v[rows] for k, v in val_states.items()}, num_layers)
        log.info("calibrate.family_refitted", families=group, prompts=len(index),
                 training_prompts_left=len(keep),
                 seconds=round(time.perf_counter() - started, 1))
    return held


def gate_figures(scores: torch.Tensor, held: torch.Tensor | None,
                 val: Sequence[TrainingPrompt], refused: Sequence[bool] | None = None
                 ) -> dict[str, Any]:
    """AUROC of harmful vs benign validation prompts (shipped and cross-family scores), and
    per source the share scoring below / above a few thresholds, with the share of its
    refused prompts below them (what an ``answer`` side could steer)."""
    harmful = torch.tensor([p.context == "harmful" for p in val])

    def area(values: torch.Tensor) -> float:
        return round(auroc(values[harmful], values[~harmful]) or float("nan"), 4)

    sources: dict[str, Any] = {}
    for name in dict.fromkeys(p.source for p in val):
        rows = torch.tensor([p.source == name for p in val])
        entry: dict[str, Any] = {
            "context": next(p.context for p in val if p.source == name), "n": int(rows.sum()),
            "below": {str(t): round(float((scores[rows] < t).float().mean()), 3)
                      for t in (-2.0, -1.0, 0.0)},
            "above": {str(t): round(float((scores[rows] > t).float().mean()), 3)
                      for t in (0.0, 1.0, 2.0)}}
        if held is not None:
            entry["cross_family_below"] = {str(t): round(float((held[rows] < t).float().mean()),
                                                         3) for t in (-2.0, -1.0, 0.0)}
        if refused is not None:
            mask = rows & torch.tensor(list(refused))
            entry["refused"] = int(mask.sum())
            entry["refused_below"] = {str(t): round(float((scores[mask] < t).float().mean()), 3)
                                      if bool(mask.any()) else None for t in (-2.0, -1.0, 0.0)}
        sources[name] = entry
    out: dict[str, Any] = {"auroc": area(scores), "sources": sources}
    if held is not None:
        out["cross_family_auroc"] = area(held)
    return out


def _save(path: Path, member: GateMember, raw: torch.Tensor) -> None:
    """One fitted member and its raw scores of the prompts it was fitted on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {f"member.{k}": v.detach().cpu().contiguous()
               for k, v in member.gate.tensors().items()}
    tensors["train_scores"] = raw.detach().float().cpu().contiguous()
    save_file(tensors, str(tmp), metadata={
        "format": CACHE_FORMAT, "plugin": member.plugin,
        "params": json.dumps(member.gate.params.model_dump(mode="json")),
        "config": json.dumps(member.gate.config())})
    os.replace(tmp, path)


def _load(path: Path, registry: Registry, member: GateMember) -> torch.Tensor | None:
    """Fill ``member`` from a cached fit; returns its raw training scores (None: no usable
    cache entry)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != CACHE_FORMAT or meta.get("plugin") != member.plugin:
            return None
        tensors = load_file(str(path))
        entry = registry.get("gate", member.plugin)
        params = entry.cls.Params.model_validate(json.loads(meta["params"]))
        own = {k[len("member."):]: v for k, v in tensors.items() if k.startswith("member.")}
        cls = entry.cls
        assert issubclass(cls, Gate)  # the registry checked the kind
        member.gate = cls.from_artifact(params, json.loads(meta["config"]), own)
        return tensors["train_scores"]
    except (ArtifactError, PluginError, OSError, ValueError, KeyError) as exc:
        log.warning("gate.cache_unreadable", path=str(path), error=str(exc)[:200],
                    action="refitted")
        return None
