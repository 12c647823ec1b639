"""Request and response bodies of the HTTP API (OpenAI chat-completions shapes plus ``guardrail``).

Requests accept the fields OpenAI clients send and ignore unknown ones, except where
ignoring would silently change the answer (``n > 1``, ``logprobs``, ``tools``): those are
refused with a 400 naming the field. Every response carries the guardrail telemetry in the
``guardrail`` extension field (see ``docs/serving.md``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from guardrail.serving.errors import ApiError, validation_error


class ChatMessage(BaseModel):
    """One message; ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str) for part in value
        ):
            return "".join(part["text"] for part in value)
        raise ValueError('expected a string or a list of {"type": "text", "text": str} parts')

    def to_turn(self) -> dict[str, str]:
        """The ``{"role", "content"}`` mapping chat templates take (``developer`` -> ``system``)."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content}


class GuardrailOptions(BaseModel):
    """Per-request guardrail switches (send as ``extra_body={"guardrail": {...}}``)."""

    model_config = ConfigDict(extra="forbid")
    steer: bool = Field(True, description="false gives the policy's unsteered model")
    classify: bool = Field(True, description="run the policy's refusal classifier on the answer")


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with token counts."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; ``model`` names a loaded policy."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    guardrail: GuardrailOptions = Field(default_factory=GuardrailOptions)

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if any(item == "" for item in items):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def stop_sequences(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def conversation(self) -> list[dict[str, str]]:
        """The messages as chat-template turns."""
        return [m.to_turn() for m in self.messages]


class EnergiesRequest(BaseModel):
    """``POST /v1/guardrail/energies``: score a conversation without generating."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)

    def conversation(self) -> list[dict[str, str]]:
        """The messages as chat-template turns."""
        return [m.to_turn() for m in self.messages]


# --- responses ------------------------------------------------------------------------------
class LayerEnergy(BaseModel):
    """What steering did at one rail and layer (energies at the last prompt token)."""

    rail: str
    layer: int
    energy_before: float | None
    energy_after: float | None
    steps: int
    steered_positions: int
    gated_positions: int
    generated_positions: int
    mean_energy_before_generated: float | None
    mean_energy_after_generated: float | None


class VerdictBody(BaseModel):
    """The refusal classifier's verdict on the answer."""

    refused: bool
    score: float
    reason: str


class Timing(BaseModel):
    """Milliseconds spent queued, generating (the whole batch), classifying and in total."""

    queue_ms: float
    generate_ms: float
    classify_ms: float
    total_ms: float
    batch_size: int


class GuardrailExtension(BaseModel):
    """The ``guardrail`` field of every completion: telemetry of the steered generation."""

    policy: str
    model: str
    steered: bool
    layers_steered: list[int]
    energies: list[LayerEnergy]
    verdict: VerdictBody | None
    verdict_error: str | None = None
    timing: Timing


class Usage(BaseModel):
    """Token counts."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    """The generated answer."""

    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    """The one choice (``n`` is always 1)."""

    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    """A non-streamed chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    guardrail: GuardrailExtension


class Delta(BaseModel):
    """New text in a streamed chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    """The one choice of a streamed chunk."""

    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed completion; the last carries ``guardrail``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    guardrail: GuardrailExtension | None = None


class PromptEnergy(BaseModel):
    """The energy of the prompt's last token at one rail and layer, and its gate threshold."""

    rail: str
    layer: int
    energy: float | None
    threshold: float | None


class EnergiesResponse(BaseModel):
    """``POST /v1/guardrail/energies`` answer."""

    object: Literal["guardrail.energies"] = "guardrail.energies"
    model: str
    prompt_tokens: int
    energies: list[PromptEnergy]
    timing: Timing


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Decode and validate a JSON body; raise :class:`ApiError` (400) naming the bad field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
