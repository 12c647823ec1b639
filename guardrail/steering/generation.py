"""Conversations, generation settings and end of sequence: what every caller of ``generate`` shares.

:class:`~guardrail.steering.guard.Guardrail`, the training labeller and the server's stop criteria
all read answers the same way: the policy's generation defaults with the caller's overrides,
the same ``model.generate`` arguments, and an answer that ends at the first end-of-sequence
token of the generation config or the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from guardrail.telemetry import GenerationTelemetry

if TYPE_CHECKING:
    from guardrail.policy.model import GenerationSection

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
        from guardrail.policy.model import format_validation_error

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


_SENTINEL = "\u2063guardrail-user-message\u2063"


class UserMessageParser:
    """Finds the last user message in a prompt rendered by a tokenizer's chat template.

    ``Guardrail.attach`` sees token ids, not conversations; gates read the user's message.
    The template is probed once with a sentinel message (with and without a system turn): the
    text after the sentinel ends every rendered prompt, and the longest text before it that
    both renderings share opens the user's turn. A prompt is read back as text (exact for
    byte-level tokenizers) or, failing that, by finding those two pieces' token ids. A prompt
    that does not fit (another template, raw text) gives ``None``: the caller must then treat
    the row as ungated, never as benign.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.opener: str | None = None
        self.closer: str | None = None
        self._opener_ids: list[int] = []
        self._closer_ids: list[int] = []
        try:
            alone = tokenizer.apply_chat_template(
                [{"role": "user", "content": _SENTINEL}], tokenize=False,
                add_generation_prompt=True)
            with_system = tokenizer.apply_chat_template(
                [{"role": "system", "content": "x"}, {"role": "user", "content": _SENTINEL}],
                tokenize=False, add_generation_prompt=True)
        except Exception:  # no chat template, or one that refuses these turns
            return
        if alone.count(_SENTINEL) != 1 or with_system.count(_SENTINEL) != 1:
            return
        before, after = alone.split(_SENTINEL)
        other = with_system.split(_SENTINEL)[0]
        shared = 0
        while shared < min(len(before), len(other)) and before[-1 - shared] == other[-1 - shared]:
            shared += 1
        if shared and after:
            self.opener, self.closer = before[len(before) - shared :], after
            self._opener_ids = self._ids(self.opener)
            self._closer_ids = self._ids(self.closer)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, rendered: str) -> str | None:
        """The last user message of ``rendered`` (None if the template's shape is not found)."""
        if self.opener is None or self.closer is None or not rendered.endswith(self.closer):
            return None
        body = rendered[: len(rendered) - len(self.closer)]
        start = body.rfind(self.opener)
        return None if start < 0 else body[start + len(self.opener) :]

    def from_ids(self, ids: Sequence[int]) -> str | None:
        """The last user message of a prompt's token ids (padding removed)."""
        found = self(self.tokenizer.decode(list(ids), skip_special_tokens=False))
        if found is not None or not self._opener_ids or not self._closer_ids:
            return found
        ids = list(ids)
        close = len(self._closer_ids)
        if len(ids) < close or ids[-close:] != self._closer_ids:
            return None
        body = ids[:-close]
        width = len(self._opener_ids)
        for start in range(len(body) - width, -1, -1):
            if body[start : start + width] == self._opener_ids:
                return str(self.tokenizer.decode(body[start + width :], skip_special_tokens=True))
        return None


@dataclass
class GenerationResult:
    """One answer: its text, token ids, why it stopped, and what steering did."""

    text: str
    token_ids: list[int]
    finish_reason: str
    telemetry: GenerationTelemetry
