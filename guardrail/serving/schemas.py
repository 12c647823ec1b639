"""Request and response bodies of the HTTP API (OpenAI chat-completions shapes plus ``guardrail``).

Requests accept the fields OpenAI clients send and ignore unknown ones, except where
ignoring would silently change the answer (``n > 1``, ``logprobs``, ``tools``,
``response_format`` other than text, ...): those are refused with a 400 naming the field.
Types are strict, as OpenAI's are: ``"max_tokens": "4"`` and ``"stream": "yes"`` are 400s.
Every response carries the guardrail telemetry in the ``guardrail`` extension field (see
``docs/serving.md``).

Why these models and not ``openai.types``: the ``openai`` package's request types
(``openai.types.chat.completion_create_params``) are TypedDicts for building a request, not
validators; they hold none of the strictness or the refusals above, which is what a server
needs. Its response types are pydantic models this module could build, but that would make
the ``openai`` SDK (and what it pulls in) a dependency of the ``serve`` extra for a dozen
fields, and tie the server's wire format to whichever SDK release is installed (it ships
several a week). Instead the test suite validates every response and streamed chunk this
server sends with ``openai.types.chat.ChatCompletion`` / ``ChatCompletionChunk``
(``tests/test_serving_gates.py``), so a drift from OpenAI's shapes fails a test, not a client.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from guardrail.serving.errors import ApiError, validation_error

# Deeper than any OpenAI request needs; json.loads itself gives up near 1000 levels.
MAX_JSON_DEPTH = 64
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# OpenAI's seed is a 64-bit integer (torch.manual_seed refuses larger ones).
SEED_RANGE = (-(2**63), 2**64 - 1)


class ChatMessage(BaseModel):
    """One message; ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(extra="ignore", strict=True)
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

    model_config = ConfigDict(extra="forbid", strict=True)
    steer: bool = Field(True, description="false gives the policy's unsteered model")
    classify: bool = Field(True, description="run the policy's refusal classifier on the answer")
    strength: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="a multiplier on each rail's calibrated step size, up to the largest its "
        "artifact's calibration found within the safety budget; omitted: as calibrated")


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with token counts."""

    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; ``model`` names a loaded policy."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    guardrail: GuardrailOptions = Field(default_factory=GuardrailOptions)

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, message)`` for the first option this server would otherwise ignore."""
        checks: list[tuple[str, bool, str]] = [
            ("n", self.n != 1, f"got {self.n}; only n=1 is supported"),
            ("logprobs", bool(self.logprobs), "not supported"),
            ("top_logprobs", self.top_logprobs is not None, "not supported (no logprobs)"),
            ("tools", bool(self.tools), "tool calling is not supported"),
            ("tool_choice", self.tool_choice not in (None, "none", "auto"),
             "tool calling is not supported"),
            ("functions", bool(self.functions), "function calling is not supported"),
            ("function_call", self.function_call not in (None, "none", "auto"),
             "function calling is not supported"),
            ("response_format", _format_type(self.response_format) not in (None, "text"),
             f"type {_format_type(self.response_format)!r} is not supported; this server "
             "does not constrain its output (only 'text')"),
            ("logit_bias", bool(self.logit_bias), "not supported"),
            ("frequency_penalty", bool(self.frequency_penalty), "only 0 is supported"),
            ("presence_penalty", bool(self.presence_penalty), "only 0 is supported"),
            ("modalities", self.modalities not in (None, ["text"]), "only ['text'] is supported"),
            ("audio", self.audio is not None, "audio output is not supported"),
        ]
        for param, refused, why in checks:
            if refused:
                return param, f"{param}: {why}"
        return None

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

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    messages: list[ChatMessage] = Field(min_length=1)

    def conversation(self) -> list[dict[str, str]]:
        """The messages as chat-template turns."""
        return [m.to_turn() for m in self.messages]


def _format_type(response_format: dict[str, Any] | None) -> Any:
    return None if response_format is None else response_format.get("type", "?")


# --- responses ------------------------------------------------------------------------------
class LayerEnergy(BaseModel):
    """What steering did at one rail and layer (energies at the last prompt token)."""

    rail: str
    layer: int
    side: str | None = Field(
        None, description="the gate side the row was steered towards (answer, refuse; shared "
        "for an ungated rail); null when the gate left it alone")
    energy_before: float | None
    energy_after: float | None
    steps: int
    steered_positions: int
    gated_positions: int
    generated_positions: int
    nonfinite_positions: int
    mean_energy_before_generated: float | None
    mean_energy_after_generated: float | None


class GateDecision(BaseModel):
    """A gated rail's decision on the request, made before generation."""

    rail: str
    score: float = Field(description="the gate's harm score, in training standard deviations "
                         "(> 0 leans harmful)")
    side: Literal["answer", "refuse"] | None = Field(
        description="answer: scored below `below`, steered towards answering; refuse: above "
        "`above`, steered towards refusing; null: left as the model has it")
    steered: bool
    below: float | None
    above: float | None


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
    steered: bool = Field(description="whether any rail steered this request (false when "
                          "steering was off, or every gate left the request alone)")
    strength: float | None = Field(
        None, description="the strength asked for (a multiplier on each rail's calibrated "
        "step size); null: the calibrated strength")
    gates: list[GateDecision] = Field(
        default_factory=list, description="each gated rail's decision (empty when steering "
        "was off or no rail is gated)")
    layers_steered: list[int]
    layers_skipped: list[int] = Field(
        description="layers that left at least one position unsteered: its energy was not finite")
    layers_disabled: list[int] = Field(
        description="layers the policy names that were disabled at load (non-finite weights)")
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
    gates: list[GateDecision] = Field(default_factory=list)
    timing: Timing


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Decode and validate a JSON body; raise :class:`ApiError` (400) naming the bad field.

    Refused before validation: invalid JSON (``NaN`` and ``Infinity`` included), nesting
    deeper than :data:`MAX_JSON_DEPTH`, and strings holding lone UTF-16 surrogates, which no
    tokenizer can encode.
    """
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise ApiError(400, f"request body is nested too deeply (at most {MAX_JSON_DEPTH} "
                       "levels)", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    _check_structure(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _check_structure(data: dict[str, Any]) -> None:
    """Depth and lone surrogates, walked without recursion; the 400 names the place."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep "
                           f"(at {where or 'the top level'})", code="invalid_json")
        if isinstance(node, str):
            found = _LONE_SURROGATE.search(node)
            if found:
                param = where or None
                raise ApiError(400, f"{where or 'body'}: contains a lone surrogate "
                               f"({found.group()!r}) at position {found.start()}; expected "
                               "valid Unicode text", param=param, code="invalid_value")
        elif isinstance(node, dict):
            for key, value in node.items():
                if _LONE_SURROGATE.search(key):
                    raise ApiError(400, f"{where or 'body'}: a key contains a lone surrogate; "
                                   "expected valid Unicode text", code="invalid_value")
                stack.append((value, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(node, list):
            stack.extend((value, f"{where}[{i}]", depth + 1) for i, value in enumerate(node))
