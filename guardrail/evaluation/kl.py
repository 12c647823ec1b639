"""Capability guard: how far steering moves the next-token distribution on benign answers.

The base model's answer to each benign prompt is teacher-forced twice, exactly as generation
runs it (a prefill over the prompt, then one decoding step per answer token), once without
and once with the steering hooks, each row steered as generation would steer it (a gated
rail's gate decides the row's side, or leaves it alone). KL(base || steered) is averaged over
answer tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from guardrail.evaluation.cache import Answer, GenerationCache, Scope, digest
from guardrail.evaluation.runner import Answerer, Contender
from guardrail.policy.model import GenerationSection
from guardrail.steering.generation import user_turns
from guardrail.steering.guard import Guardrail


@dataclass
class KLResult:
    """Per-prompt mean KL (nats/token), per-position mean KL, and the token-weighted mean."""

    per_prompt: list[float]
    per_position: list[float]
    tokens: int
    mean: float
    max_prompt: float
    position_counts: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"mean_kl_per_token": self.mean, "max_prompt_kl": self.max_prompt,
                "tokens": self.tokens, "prompts": len(self.per_prompt),
                "per_prompt": self.per_prompt, "per_position": self.per_position,
                "position_counts": self.position_counts}


def answer_kl(guard: Guardrail, prompts: Sequence[str], answers: Sequence[Answer], *,
              batch_size: int = 8, cache: GenerationCache | None = None,
              scope: Scope | None = None) -> KLResult:
    """Mean KL(base || steered) over the tokens of ``answers`` (the base model's answers).

    With a ``cache``, per-token KL values are stored per (model, rails, prompts, answer), so
    regenerating a report does not teacher-force again; ``scope`` is ``guard``'s, if known.
    """
    scope = scope or Scope.of(guard)
    pairs = [(c, a.token_ids, p) for c, a, p in zip(user_turns(prompts), answers, prompts,
                                                       strict=True) if a.token_ids]
    base_texts = guard.render([c for c, _, _ in pairs], steer=False)
    steered_texts = guard.render([c for c, _, _ in pairs], steer=True)
    kl_scope = digest({"model": scope.fingerprint, "rails": scope.rails_key})
    keys = [digest({"kl": kl_scope, "base": b, "steered": s, "answer": ids})
            for b, s, (_, ids, _) in zip(base_texts, steered_texts, pairs, strict=True)]
    known = cache.get_values(keys) if cache is not None else {}
    todo = [i for i, key in enumerate(keys) if key not in known]
    fresh: dict[str, Any] = {}
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        ids = [pairs[i][1] for i in batch]
        users = [pairs[i][2] for i in batch]
        base = _logprobs(guard, [base_texts[i] for i in batch], ids, users, steer=False)
        steered = _logprobs(guard, [steered_texts[i] for i in batch], ids, users, steer=True)
        # [batch, positions]: KL per answer token; padding positions are masked out.
        kl = (base.exp() * (base - steered)).sum(dim=-1).clamp_min(0.0)
        for row, i in enumerate(batch):
            fresh[keys[i]] = kl[row, : len(pairs[i][1])].tolist()
    if cache is not None:
        cache.put_values(fresh)
    return _summarise([{**known, **fresh}[key] for key in keys])


def _summarise(per_token: list[list[float]]) -> KLResult:
    position_sum: list[float] = []
    position_n: list[int] = []
    for values in per_token:
        for pos, value in enumerate(values):
            if pos == len(position_sum):
                position_sum.append(0.0)
                position_n.append(0)
            position_sum[pos] += value
            position_n[pos] += 1
    per_prompt = [sum(v) / len(v) for v in per_token]
    tokens = sum(len(v) for v in per_token)
    return KLResult(
        per_prompt=per_prompt,
        per_position=[s / n for s, n in zip(position_sum, position_n, strict=True)],
        tokens=tokens, mean=sum(sum(v) for v in per_token) / tokens if tokens else 0.0,
        max_prompt=max(per_prompt, default=0.0), position_counts=position_n,
    )


def _logprobs(guard: Guardrail, texts: list[str], answers: list[list[int]],
              prompts: list[str], *, steer: bool) -> torch.Tensor:
    """Log-probabilities ``[batch, max_answer_len, vocab]`` predicting each answer token;
    steered, each row on the side its gates choose for its user message (``prompts``)."""
    enc = guard.encode(texts)
    rows = ({name: sides for name, (_, sides) in guard.gate(prompts, enc).items()}
            if steer else {})
    mask = enc["attention_mask"]
    width = max(len(a) for a in answers)
    pad = guard.tokenizer.pad_token_id
    forced = torch.tensor([a + [pad] * (width - len(a)) for a in answers], device=mask.device)
    # Left padding: positions count real tokens only, as model.generate computes them.
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    next_position = mask.long().sum(-1, keepdim=True)
    steps = []
    with guard.session(steer=steer, rows=rows), torch.no_grad():
        out = guard.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions,
                          use_cache=True)
        steps.append(out.logits[:, -1].float().log_softmax(-1))
        past = out.past_key_values
        for k in range(width - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = guard.model(input_ids=forced[:, k : k + 1], attention_mask=mask,
                              position_ids=next_position + k, past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[:, -1].float().log_softmax(-1))
    return torch.stack(steps, dim=1).cpu()


def capability_guard(
    contenders: Sequence[Contender],
    prompts: Sequence[str],
    settings: GenerationSection,
    cache: GenerationCache,
    *,
    progress: bool = False,
) -> dict[str, KLResult]:
    """KL per steered contender, on its own model's unsteered (cached) answers to ``prompts``."""
    out = {}
    for contender in contenders:
        if not contender.steer:
            continue
        answerer = Answerer(contender.guard, settings, cache, contender.scope)
        answers = answerer.answer(prompts, steer=False, progress=progress)
        out[contender.label] = answer_kl(contender.guard, prompts, answers,
                                         batch_size=settings.batch_size, cache=cache,
                                         scope=contender.scope)
    return out
