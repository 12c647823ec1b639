"""The server says what the gate decided: the ``guardrail`` field's ``gates``, ``steered`` per
request, and the ``x-guardrail-steered`` / ``x-guardrail-gate`` headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from guardrail.serving import ServeConfig, create_app
from guardrail.serving.pool import PolicyPool

from .gated_guard import BENIGN, HARMFUL, gated_guard, word_gate  # noqa: F401

CONFIG = ServeConfig(max_tokens_limit=16, max_prompt_tokens=40, request_timeout_s=30)


def _client(loaded: Any, tmp_path: Path) -> TestClient:
    guard = gated_guard(loaded, tmp_path, below=0.0)
    return TestClient(create_app(PolicyPool([guard], CONFIG), CONFIG))


def _complete(client: TestClient, messages: list[dict[str, str]], **extra: Any) -> Any:
    return client.post("/v1/chat/completions", json={
        "model": "tiny-gated", "messages": messages, "max_tokens": 3, "temperature": 0,
        **extra})


def test_a_steered_and_a_gated_out_request_each_say_what_the_gate_decided(
    tiny_loaded: Any, tmp_path: Path, word_gate: None,  # noqa: F811
) -> None:
    with _client(tiny_loaded, tmp_path) as client:
        steered = _complete(client, BENIGN)
        ext = steered.json()["guardrail"]
        assert ext["steered"] is True
        assert ext["gates"] == [{"rail": "eds", "score": -1.0, "side": "answer",
                                 "steered": True, "below": 0.0, "above": None}]
        assert ext["layers_steered"] == [1, 2]
        assert {e["side"] for e in ext["energies"]} == {"answer"}
        assert steered.headers["x-guardrail-steered"] == "true"
        assert steered.headers["x-guardrail-gate"] == "eds;score=-1.0000;side=answer"

        kept_out = _complete(client, HARMFUL)
        ext = kept_out.json()["guardrail"]
        assert ext["steered"] is False
        assert ext["gates"] == [{"rail": "eds", "score": 1.0, "side": None, "steered": False,
                                 "below": 0.0, "above": None}]
        assert ext["layers_steered"] == []
        assert all(e["side"] is None and e["energy_before"] is None and e["steps"] == 0
                   for e in ext["energies"])
        assert kept_out.headers["x-guardrail-steered"] == "false"
        assert kept_out.headers["x-guardrail-gate"] == "eds;score=1.0000;side=none"

        # Steering off: no gate ran, and the headers say so.
        base = _complete(client, BENIGN, guardrail={"steer": False})
        assert base.json()["guardrail"]["gates"] == []
        assert base.headers["x-guardrail-steered"] == "false"
        assert "x-guardrail-gate" not in base.headers


def test_a_stream_and_the_energies_endpoint_carry_the_gate_decision(
    tiny_loaded: Any, tmp_path: Path, word_gate: None,  # noqa: F811
) -> None:
    with _client(tiny_loaded, tmp_path) as client:
        reply = _complete(client, HARMFUL, stream=True)
        events = [json.loads(line[len("data: "):]) for line in reply.text.splitlines()
                  if line.startswith("data: {")]
        last = next(e for e in events if e.get("guardrail"))
        assert last["guardrail"]["gates"][0]["side"] is None
        assert last["guardrail"]["steered"] is False
        energies = client.post("/v1/guardrail/energies", json={
            "model": "tiny-gated", "messages": BENIGN}).json()
        assert energies["gates"] == [{"rail": "eds", "score": -1.0, "side": "answer",
                                      "steered": True, "below": 0.0, "above": None}]


def test_every_response_and_chunk_is_a_valid_openai_type(
    tiny_loaded: Any, tmp_path: Path, word_gate: None,  # noqa: F811
) -> None:
    # The server keeps its own request and response models (guardrail/serving/schemas.py says
    # why); the openai SDK's types are the reference they are checked against.
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    with _client(tiny_loaded, tmp_path) as client:
        for messages in (BENIGN, HARMFUL):
            body = _complete(client, messages).json()
            parsed = ChatCompletion.model_validate(body)
            assert parsed.choices[0].message.role == "assistant"
            assert (parsed.model_extra or {})["guardrail"]["gates"] == body["guardrail"]["gates"]
            reply = _complete(client, messages, stream=True,
                              stream_options={"include_usage": True})
            chunks = [json.loads(line[len("data: "):]) for line in reply.text.splitlines()
                      if line.startswith("data: {")]
            assert len(chunks) >= 3
            for chunk in chunks:
                ChatCompletionChunk.model_validate(chunk)
