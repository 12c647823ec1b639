"""Label prompts by what the frozen model does, capturing their states in the same pass.

Each batch is generated greedily for a few tokens (refusals show at the start); the
prefill's states at every layer are captured by hooks and stored with the responses in the
:class:`~guardrail.training.cache.StateCache`. The policy's refusal classifier then sorts
every prompt into one of four cells: benign+comply and harmful+refuse are desirable (low
energy), benign+refuse and harmful+comply undesirable (high energy).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import torch

from guardrail.distributed.executor import ShardWork, current, shards_of
from guardrail.distributed.replicas import guardrail_for, policy_digest
from guardrail.errors import DataError
from guardrail.plugin.components import ActivationSource
from guardrail.policy.model import GenerationSection, Policy
from guardrail.policy.training import LabelSettings
from guardrail.steering.capture import capture_prefill
from guardrail.steering.generation import cut_at_eos, eos_ids, generate_kwargs, user_turns
from guardrail.training.cache import StateCache, prompt_key
from guardrail.training.sources import TrainingPrompt

log = structlog.get_logger("guardrail.training")

CELLS = ("benign+comply", "benign+refuse", "harmful+refuse", "harmful+comply")
"""Cell index -> name; cells 0 and 2 are desirable."""

if TYPE_CHECKING:
    from guardrail.steering.guard import Guardrail



def cell_of(context: str, refused: bool) -> int:
    """The cell index of a prompt's context and the model's behaviour."""
    if context == "benign":
        return 1 if refused else 0
    return 2 if refused else 3


@dataclass
class LabelledSet:
    """Prompts with the model's responses, refusal verdicts, cells and states ``[n, L, H]``."""

    prompts: list[TrainingPrompt]
    responses: list[str]
    refused: list[bool]
    cells: torch.Tensor
    states: torch.Tensor
    mean_states: torch.Tensor | None = None

    def counts(self) -> dict[str, int]:
        """Prompts per cell, by cell name."""
        found = Counter(self.cells.tolist())
        return {name: int(found.get(i, 0)) for i, name in enumerate(CELLS)}

    def subset(self, mask: torch.Tensor) -> LabelledSet:
        """The rows where ``mask`` is true."""
        rows = mask.nonzero().flatten().tolist()
        return LabelledSet(
            prompts=[self.prompts[i] for i in rows],
            responses=[self.responses[i] for i in rows],
            refused=[self.refused[i] for i in rows],
            cells=self.cells[rows],
            states=self.states[rows],
            mean_states=None if self.mean_states is None else self.mean_states[rows],
        )


@dataclass
class CaptureStats:
    """What the labelling stage did: prompts from cache, prompts generated, time taken."""

    cached: int = 0
    generated: int = 0
    batches: int = 0
    forward_passes: int = 0
    seconds: float = 0.0


#: What labelling one batch returns: responses, states ``[n, L, H]``, prompt-mean states
#: (or None), forward passes.
LabelResult = tuple[list[str], Any, Any, int]


@dataclass(frozen=True)
class LabelWork(ShardWork[list[str], LabelResult]):
    """Greedy labelling generation of rendered prompts, states captured in its prefill."""

    policy: Policy  # without rails: the model and classifier only
    source: ActivationSource  # a plugin object, picklable
    settings: LabelSettings
    positions: str
    mean_too: bool

    def replica_key(self) -> str:
        """The bare policy's digest (device decided by the worker)."""
        return "label:" + policy_digest(self.policy, None)

    def load(self, device: str | None) -> Any:
        """``(guardrail, activation source)``."""
        return guardrail_for(self.policy, device), self.source

    def run(self, replica: Any, shard: list[str]) -> LabelResult:
        """Label one batch of rendered prompts."""
        guard, source = replica
        return _label_batch(guard, source, shard, self.settings, self.positions,
                            mean_too=self.mean_too)


def generate_and_capture(
    guard: Guardrail,
    source: ActivationSource,
    prompts: Sequence[TrainingPrompt],
    cache: StateCache,
    settings: LabelSettings,
    *,
    positions: str = "last",
    progress: Any = None,
) -> CaptureStats:
    """Fill ``cache`` for every prompt it lacks; one prefill per batch serves every layer.

    ``guard`` is a :class:`~guardrail.steering.guard.Guardrail` (no rails needed) for rendering,
    tokenising and the model. Batches are sorted by length to waste little on padding.
    """
    texts = guard.render(user_turns(p.text for p in prompts), steer=False)
    keys = [prompt_key(t) for t in texts]
    wanted = dict.fromkeys(cache.missing(keys))  # ordered, unique
    stats = CaptureStats(cached=len(keys) - len([k for k in keys if k in wanted]))
    if progress is not None:
        progress.update(stats.cached)
    if not wanted:
        return stats
    by_key = {k: (t, p.text) for k, t, p in zip(keys, texts, prompts, strict=True)}
    todo = list(wanted)
    lengths = {k: len(guard.tokenizer(by_key[k][0], add_special_tokens=False)["input_ids"])
               for k in todo}
    todo.sort(key=lambda k: (-lengths[k], k))
    started = time.perf_counter()
    batches = shards_of(todo, settings.batch_size)

    def done(index: int, result: LabelResult) -> None:
        # In this process, whichever executor ran the batch: one cache entry per prompt key.
        batch = batches[index]
        responses, states, means, passes = result
        cache.write(batch, [by_key[k][1] for k in batch], responses, states, means)
        stats.generated += len(batch)
        stats.batches += 1
        stats.forward_passes += passes
        if progress is not None:
            progress.update(len(batch))

    work = LabelWork(guard.policy, source, settings, positions, cache.mean_states)
    current().map(work, [[by_key[k][0] for k in batch] for batch in batches], done,
                  replica=(guard, source))
    stats.seconds = time.perf_counter() - started
    log.info("train.capture_done", generated=stats.generated, cached=stats.cached,
             batches=stats.batches, seconds=round(stats.seconds, 1),
             prompts_per_s=round(stats.generated / max(stats.seconds, 1e-9), 2))
    return stats


def _label_batch(
    guard: Guardrail, source: ActivationSource, texts: list[str], settings: LabelSettings,
    positions: str,
    *, mean_too: bool = False,
) -> tuple[list[str], torch.Tensor, torch.Tensor | None, int]:
    enc = guard.encode(texts)
    prompt_len = enc["input_ids"].shape[1]
    tokenizer = guard.tokenizer
    greedy = generate_kwargs(GenerationSection(max_new_tokens=settings.max_new_tokens),
                             tokenizer.pad_token_id)
    with capture_prefill(guard.model, source, enc.get("attention_mask"), positions,
                         mean_too=mean_too) as captured, torch.no_grad():
        output = guard.model.generate(**enc, **greedy)  # type: ignore[operator]  # (as in batches.py)
    eos = eos_ids(guard.model, tokenizer)
    responses = [str(tokenizer.decode(cut_at_eos(row, eos)[0], skip_special_tokens=True))
                 for row in output[:, prompt_len:].tolist()]
    means = captured.stacked_means() if mean_too else None
    return responses, captured.stacked(), means, captured.forward_passes


def label(
    guard: Guardrail, prompts: Sequence[TrainingPrompt], cache: StateCache
) -> LabelledSet:
    """Read states and responses from ``cache`` and classify them with the policy's classifier."""
    texts = guard.render(user_turns(p.text for p in prompts), steer=False)
    rows = cache.load([prompt_key(t) for t in texts])
    verdicts = guard.classify([p.text for p in prompts], rows.responses)
    refused = [v.refused for v in verdicts]
    cells = torch.tensor([cell_of(p.context, r) for p, r in zip(prompts, refused, strict=True)],
                         dtype=torch.long)
    return LabelledSet(prompts=list(prompts), responses=rows.responses, refused=refused,
                       cells=cells, states=rows.states, mean_states=rows.mean_states)


def check_cells(labelled: LabelledSet, where: str) -> list[str]:
    """Raise :class:`DataError` when a side is empty; return warnings for empty single cells."""
    counts = labelled.counts()
    desirable = counts[CELLS[0]] + counts[CELLS[2]]
    undesirable = counts[CELLS[1]] + counts[CELLS[3]]
    if undesirable == 0 or desirable == 0:
        side = "undesirable (benign+refuse, harmful+comply)" if undesirable == 0 else \
            "desirable (benign+comply, harmful+refuse)"
        raise DataError(
            f"{where}: the {side} side is empty (cells: {counts}). The model "
            + ("never refuses a benign prompt nor complies with a harmful one, so there is "
               "nothing to steer away from" if undesirable == 0 else
               "never behaves as wanted on these prompts")
            + "; add prompts it gets wrong (e.g. OR-Bench-Hard for benign, OR-Bench-Toxic for "
            "harmful) or check the refusal classifier"
        )
    return [f"{where}: no {name} examples; the energy model learns nothing about them"
            for name, n in counts.items() if n == 0]
