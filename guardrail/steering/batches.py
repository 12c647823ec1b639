"""One batching path: conversations rendered, split into batches, encoded with left padding,
and (:func:`answer_in_batches`) gated and generated.

``Guardrail.generate``, ``generate_batch``, ``energies``, ``gate_scores`` and ``prompt_states``
all walk their conversations through :func:`batches`, so every entry point renders, gates and
encodes a prompt the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from guardrail.console import progress_bar
from guardrail.plugin.components import ActivationSource
from guardrail.steering.capture import read_states
from guardrail.steering.gating import gate_telemetry, rows_of
from guardrail.steering.generation import (
    Conversation,
    GenerationResult,
    cut_at_eos,
    eos_ids,
    generate_kwargs,
    last_user,
)
from guardrail.steering.hooks import log_nonfinite
from guardrail.steering.rails import forced_rows
from guardrail.telemetry import GenerationTelemetry

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from guardrail.models.loading import LoadedModel
    from guardrail.policy.model import GenerationSection, Policy
    from guardrail.steering.gating import Decisions
    from guardrail.steering.hooks import SteeringSession
    from guardrail.steering.rails import Rail


class Runtime(Protocol):
    """What the batching path and ``attach()`` use of a loaded guardrail
    (:class:`~guardrail.steering.guard.Guardrail` is one)."""

    policy: Policy
    loaded: LoadedModel
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    rails: list[Rail]

    def render(self, conversations: Sequence[Conversation], *, steer: bool = True
               ) -> list[str]: ...

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def gate(self, prompts: Sequence[str], enc: dict[str, torch.Tensor], *,
             model: PreTrainedModel | None = None) -> Decisions: ...

    def session(self, *, steer: bool = True, measure_only: bool = False,
                rows: dict[str, dict[str, torch.Tensor]] | None = None,
                model: PreTrainedModel | None = None, strength: float | None = None
                ) -> SteeringSession: ...


@dataclass
class Batch:
    """Some of the caller's conversations, ready for the model."""

    #: Their positions in the caller's sequence.
    rows: list[int]
    #: Their last user messages (what text gates read).
    prompts: list[str]
    #: The rendered prompts, tokenised with left padding on the model's device.
    enc: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.rows)


def longest_first_order(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    """Indices of ``texts``, the most tokens first (a stable sort: ties keep their order), so
    consecutive batches pad little. Sharded runs cut their shards from this same order."""
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return sorted(range(len(texts)), key=lambda i: -lengths[i])


def batches(guard: Runtime, conversations: Sequence[Conversation], *, steer: bool = True,
            size: int | None = None, longest_first: bool = False) -> Iterator[Batch]:
    """``conversations`` rendered as ``guard``'s policy has them (with prompt-level steerers
    when ``steer``), in batches of ``size`` (default: all in one), in the order given or,
    with ``longest_first``, longest prompt first so each batch pads little."""
    texts = guard.render(conversations, steer=steer)
    prompts = [last_user(c) for c in conversations]
    order = longest_first_order(guard.tokenizer, texts) if longest_first else list(
        range(len(texts)))
    size = size or max(len(order), 1)
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        yield Batch(rows, [prompts[i] for i in rows], guard.encode([texts[i] for i in rows]))


def answer_in_batches(guard: Runtime, conversations: Sequence[Conversation], *, steer: bool,
           settings: GenerationSection, streamer: Any = None, gates: bool | str = True,
           strength: float | None = None, progress: bool = False,
           stopping_criteria: Any = None, one_batch: bool = False) -> list[GenerationResult]:
    """One answer per conversation from ``guard``: batched longest first (what
    :meth:`Guardrail.generate` runs before its output rails, classifier and hooks), or as one
    batch in the order given (:meth:`Guardrail.generate_batch`). Each batch is gated, then
    generated with the rails steering the rows their gates let through."""
    results: list[GenerationResult | None] = [None] * len(conversations)
    bar = progress_bar(len(conversations), progress,
                       "generate (steered)" if steer else "generate (base)")
    started = time.perf_counter()
    for batch in batches(guard, conversations, steer=steer,
                         size=None if one_batch else settings.batch_size,
                         longest_first=not one_batch):
        outs = _generate(guard, batch, steer, settings, streamer, stopping_criteria,
                         gates=gates, strength=strength)
        seconds = time.perf_counter() - started
        for i, out in zip(batch.rows, outs, strict=True):
            out.telemetry.seconds = seconds / len(batch)
            results[i] = out
        bar.update(len(batch))
        started = time.perf_counter()
    bar.close()
    return [r for r in results if r is not None]


def _generate(guard: Runtime, batch: Batch, steer: bool, settings: GenerationSection,
              streamer: Any, stopping_criteria: Any = None, *, gates: bool | str = True,
              strength: float | None = None) -> list[GenerationResult]:
    enc = batch.enc
    decisions = guard.gate(batch.prompts, enc) if steer and gates is True else {}
    rows = forced_rows(guard.rails, gates, len(batch), guard.loaded.device) \
        if steer and gates is not True else rows_of(decisions)
    prompt_len = enc["input_ids"].shape[1]
    kwargs = generate_kwargs(settings, guard.tokenizer.pad_token_id)
    if settings.do_sample and settings.seed is not None:
        torch.manual_seed(settings.seed)
    if streamer is not None:
        kwargs["streamer"] = streamer
    if stopping_criteria is not None:
        kwargs["stopping_criteria"] = stopping_criteria
    with guard.session(steer=steer, rows=rows, strength=strength) as session, \
            torch.no_grad():
        # (transformers types PreTrainedModel without its causal LMs' GenerationMixin)
        output = guard.model.generate(**enc, **kwargs)  # type: ignore[operator]
    eos = eos_ids(guard.model, guard.tokenizer)
    answers = [cut_at_eos(row, eos) for row in output[:, prompt_len:].tolist()]
    # A row that stopped fed its end-of-sequence token back like any other.
    per_row = session.telemetry([len(ids) + (finish == "stop") for ids, finish in answers])
    log_nonfinite(per_row, policy=guard.policy.name)
    prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
    sides = {rail.name: session.sides_of(rail.name, len(answers)) for rail in session.rails}
    return [
        GenerationResult(
            text=str(guard.tokenizer.decode(ids, skip_special_tokens=True)),
            token_ids=ids,
            finish_reason=finish,
            telemetry=GenerationTelemetry(
                steered=any(per_rail[row] is not None for per_rail in sides.values()),
                policy=guard.policy.name,
                prompt_tokens=int(prompt_tokens[row]),
                completion_tokens=len(ids),
                layers=per_row[row],
                gates=gate_telemetry(guard.rails, decisions, row),
                strength=strength if steer and strength is not None else None,
            ),
        )
        for row, (ids, finish) in enumerate(answers)
    ]


def energies(guard: Runtime, conversations: Sequence[Conversation], *, batch_size: int
             ) -> list[GenerationTelemetry]:
    """Energies at the last prompt token per rail and layer, without generating or steering:
    :meth:`Guardrail.energies`."""
    out: list[GenerationTelemetry] = []
    for batch in batches(guard, conversations, size=batch_size):
        # Each row is measured with the energy models of the side its gate puts it on.
        decisions = guard.gate(batch.prompts, batch.enc)
        with guard.session(measure_only=True, rows=rows_of(decisions)) as session, \
                torch.no_grad():
            guard.model(**batch.enc, use_cache=False)
        per_row = session.telemetry([0] * len(batch))
        log_nonfinite(per_row, policy=guard.policy.name)
        for row, layers in enumerate(per_row):
            out.append(
                GenerationTelemetry(steered=False, policy=guard.policy.name, layers=layers,
                                    gates=gate_telemetry(guard.rails, decisions, row))
            )
    return out


def prompt_states(guard: Runtime, conversations: Sequence[Conversation],
                  source: ActivationSource, layers: Sequence[int], *, positions: str,
                  batch_size: int, progress: bool = False) -> dict[int, torch.Tensor]:
    """Per layer, ``[n, hidden]`` unsteered prompt states in the order given, batched
    longest first: :meth:`Guardrail.prompt_states`."""
    parts: list[tuple[list[int], dict[int, torch.Tensor]]] = []
    bar = progress_bar(len(conversations), progress, "capture states")
    for batch in batches(guard, conversations, steer=False, size=batch_size,
                         longest_first=True):
        parts.append((batch.rows, read_states(guard.model, source, batch.enc, layers,
                                              positions)))
        bar.update(len(batch))
    bar.close()
    order = torch.tensor([i for rows, _ in parts for i in rows], dtype=torch.long)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return {layer: torch.cat([found[layer] for _, found in parts])[inverse] for layer in layers}
