"""The training and validation prompt sets a policy's ``training:`` section declares."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from guardrail.errors import DataError
from guardrail.policy.training import Context, PromptSource, TrainingSection
from guardrail.prompts import load_prompts

log = structlog.get_logger("guardrail.training")


@dataclass(frozen=True)
class TrainingPrompt:
    """A prompt with its context (benign: complying is right; harmful: refusing is)."""

    text: str
    context: Context
    source: str
    family: str = ""


@dataclass
class PromptSets:
    """Training and validation prompts, disjoint; ``gate`` holds the prompts of gate-only
    sources (read by the gate besides ``train``, never answered by the model)."""

    train: list[TrainingPrompt]
    val: list[TrainingPrompt]
    gate: list[TrainingPrompt] = field(default_factory=list)

    @property
    def gate_train(self) -> list[TrainingPrompt]:
        """What the gate is fitted on: the training prompts, then the gate-only ones."""
        return [*self.train, *self.gate]

    def summary(self) -> dict[str, dict[str, int]]:
        """Prompt counts per split and source (for reports and the artifact header)."""
        splits = [("train", self.train), ("val", self.val)]
        if self.gate:
            splits.append(("gate_only", self.gate))
        return {split: dict(Counter(p.source for p in prompts)) for split, prompts in splits}


def load_source_list(
    sources: Sequence[PromptSource], *, seed: int, where: str
) -> list[list[TrainingPrompt]]:
    """Load each source (one list per source); errors name the policy key and the file."""
    loaded = []
    for i, source in enumerate(sources):
        try:
            records = load_prompts(source.path, field=source.field, filter=source.filter,
                                   sample=source.sample, seed=seed)
        except DataError as exc:
            raise DataError(f"{where}[{i}] ({source.context}): {exc}") from None
        loaded.append([TrainingPrompt(r.text, source.context, source.label, source.family_name)
                       for r in records])
    return loaded


def load_prompt_sets(
    section: TrainingSection,
    *,
    train_total: int | None = None,
    val_total: int | None = None,
) -> PromptSets:
    """Load ``sources`` and ``validation``; ``*_total`` shrink each set pro rata (demo subsets).

    Without validation sources, ``trainer.val_fraction`` of each source is held out. A prompt
    in both a benign and a harmful source is an error (the labels would contradict each other).
    """
    labelled = [s for s in section.sources if not s.gate_only]
    _require_contexts_in(labelled, "training.sources (those without gate_only)")
    train_lists = load_source_list(labelled, seed=section.seed, where="training.sources")
    gate_sources = [s for s in section.sources if s.gate_only]
    gate_lists = load_source_list(gate_sources, seed=section.seed, where="training.sources")
    if train_total is not None:
        total = sum(len(g) for g in train_lists)
        train_lists = _shrink(train_lists, train_total, section.seed)
        shrunk = sum(len(g) for g in gate_lists) * train_total // max(total, 1)
        gate_lists = _shrink(gate_lists, max(shrunk, 1), section.seed)
    if section.validation:
        val_lists = load_source_list(section.validation, seed=section.seed,
                                     where="training.validation")
        if val_total is not None:
            val_lists = _shrink(val_lists, val_total, section.seed)
        train = _dedupe([p for group in train_lists for p in group], "training.sources")
        val = _dedupe([p for group in val_lists for p in group], "training.validation")
    else:
        train, val = _split(train_lists, section.trainer.val_fraction, section.seed)
        train = _dedupe(train, "training.sources")
        val = _dedupe(val, "training.sources")
    seen = {p.text for p in train}
    overlap = [p for p in val if p.text in seen]
    if overlap:
        log.warning("train.val_overlap_dropped", prompts=len(overlap))
        val = [p for p in val if p.text not in seen]
    _require_contexts(val, "training.validation" if section.validation else "the held-out split")
    taken = {p.text: p for p in (*train, *val)}
    gate = []
    for prompt in _dedupe([p for group in gate_lists for p in group], "training.sources"):
        other = taken.get(prompt.text)
        if other is None:
            gate.append(prompt)
        elif other.context != prompt.context:
            raise DataError(
                f"training.sources: prompt {prompt.text[:80]!r} is in {other.source} as "
                f"{other.context!r} and in {prompt.source} as {prompt.context!r}; "
                "a prompt needs one context (drop it from one file or add a filter)")
    return PromptSets(train=train, val=val, gate=gate)


def _require_contexts_in(sources: Sequence[PromptSource], where: str) -> None:
    contexts = {s.context for s in sources}
    missing = sorted({"benign", "harmful"} - contexts)
    if missing:
        raise DataError(f"{where}: no {missing[0]!r} source; the energy models need benign and "
                        "harmful prompts the model answers (gate_only sources are not answered)")


def _dedupe(prompts: list[TrainingPrompt], where: str) -> list[TrainingPrompt]:
    first: dict[str, TrainingPrompt] = {}
    for prompt in prompts:
        other = first.get(prompt.text)
        if other is None:
            first[prompt.text] = prompt
        elif other.context != prompt.context:
            raise DataError(
                f"{where}: prompt {prompt.text[:80]!r} is in {other.source} as "
                f"{other.context!r} and in {prompt.source} as {prompt.context!r}; "
                "a prompt needs one context (drop it from one file or add a filter)"
            )
    dropped = len(prompts) - len(first)
    if dropped:
        log.info("train.duplicates_dropped", where=where, prompts=dropped)
    return list(first.values())


def _shrink(lists: list[list[TrainingPrompt]], total: int, seed: int) -> list[list[TrainingPrompt]]:
    size = sum(len(group) for group in lists)
    if size <= total:
        return lists
    rng = random.Random(seed)
    out = []
    for group in lists:
        keep = max(1, round(total * len(group) / size))
        out.append([group[i] for i in sorted(rng.sample(range(len(group)), min(keep, len(group))))])
    return out


def _split(
    lists: list[list[TrainingPrompt]], fraction: float, seed: int
) -> tuple[list[TrainingPrompt], list[TrainingPrompt]]:
    rng = random.Random(seed)
    train: list[TrainingPrompt] = []
    val: list[TrainingPrompt] = []
    for group in lists:
        order = list(range(len(group)))
        rng.shuffle(order)
        held = set(order[: round(len(group) * fraction)])
        train += [p for i, p in enumerate(group) if i not in held]
        val += [p for i, p in enumerate(group) if i in held]
    return train, val


def _require_contexts(prompts: list[TrainingPrompt], where: str) -> None:
    contexts = {p.context for p in prompts}
    for context in ("benign", "harmful"):
        if context not in contexts:
            raise DataError(
                f"{where}: no {context!r} validation prompts ({len(prompts)} in all); "
                "add a validation source with that context or more prompts per source"
            )
