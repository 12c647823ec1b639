"""Conversations, generation settings and end of sequence: what every caller of ``generate`` shares.

:class:`~guardrail.guard.Guardrail`, the training labeller and the server's stop criteria
all read answers the same way: the policy's generation defaults with the caller's overrides,
the same ``model.generate`` arguments, and an answer that ends at the first end-of-sequence
token of the generation config or the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guardrail.policy import GenerationSection

Conversation = list[dict[str, str]]


def user_turn(prompt: str) -> Conversation:
    """A conversation of one user message."""
    return [{"role": "user", "content": prompt}]


def user_turns(prompts: Iterable[str]) -> list[Conversation]:
    """One single-message conversation per prompt."""
    return [user_turn(prompt) for prompt in prompts]


def last_user(conversation: Conversation) -> str:
    """The text of the conversation's last user message ("" if it has none)."""
    users = [m.get("content", "") for m in conversation if m.get("role") == "user"]
    return users[-1] if users else ""


def merge_settings(defaults: GenerationSection, overrides: Mapping[str, Any]) -> GenerationSection:
    """The policy's generation defaults with every override that is not ``None``, validated.

    An unknown setting (``num_beams=4``, say) or a bad value raises :class:`GuardrailError`
    naming it, rather than being dropped or passed on unchecked.
    """
    from pydantic import ValidationError

    from guardrail.errors import GuardrailError

    updates = {k: v for k, v in overrides.items() if v is not None}
    known = type(defaults).model_fields
    unknown = sorted(set(updates) - set(known))
    if unknown:
        raise GuardrailError(
            f"generation settings {unknown} are not supported; expected any of "
            f"{', '.join(known)}"
        )
    try:
        return type(defaults).model_validate({**defaults.model_dump(), **updates})
    except ValidationError as exc:
        from guardrail.policy import format_validation_error

        raise GuardrailError(
            "generation settings: " + "; ".join(format_validation_error(exc))
        ) from None


def generate_kwargs(settings: GenerationSection, pad_token_id: int | None) -> dict[str, Any]:
    """The ``model.generate`` keyword arguments of ``settings`` (the seed is the caller's)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "pad_token_id": pad_token_id,
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        if settings.top_k is not None:
            kwargs["top_k"] = settings.top_k
    else:
        # Silence sampling defaults from the model's generation_config under greedy decoding.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if settings.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = settings.repetition_penalty
    return kwargs


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end an answer (the generation config's and the tokenizer's)."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids


def cut_at_eos(tokens: Sequence[int], eos: set[int]) -> tuple[list[int], str]:
    """The tokens before the first end-of-sequence, and ``"stop"`` if there was one or
    ``"length"`` if the answer ran to its token limit."""
    for index, token in enumerate(tokens):
        if token in eos:
            return list(tokens[:index]), "stop"
    return list(tokens), "length"
