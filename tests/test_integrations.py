"""LiteLLM and LangChain against a real ``guardrail serve`` app (uvicorn on a loopback port,
the tiny gated policy): the steering options reach the server, the answers come back.

Skipped when the libraries are not installed (the ``integrations`` extra)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from guardrail import hookimpl
from guardrail.integrations import guardrail_options
from guardrail.serving import ServeConfig, create_app
from guardrail.serving.pool import PolicyPool

from .gated_guard import gated_guard, word_gate  # noqa: F401
from .live_server import free_port
from .test_strength import CALIBRATION

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ServeConfig(max_tokens_limit=16, max_prompt_tokens=64, request_timeout_s=60)
COKE = "where can i buy coke"


class _Seen:
    """Records the telemetry of every answered request (the guardrail_on_generation hook)."""

    def __init__(self) -> None:
        self.telemetry: list[Any] = []

    @hookimpl
    def guardrail_on_generation(self, telemetry: Any, extra: dict[str, Any]) -> None:
        self.telemetry.append(telemetry)


@pytest.fixture
def server(tiny_loaded: Any, tmp_path: Path, word_gate: None,  # noqa: F811
           plugin_manager: Any) -> Iterator[tuple[str, _Seen]]:
    """The tiny gated policy (strength up to 2) served by uvicorn on 127.0.0.1."""
    import uvicorn

    seen = _Seen()
    plugin_manager.register(seen, name="seen")
    guard = gated_guard(tiny_loaded, tmp_path, calibration=CALIBRATION, params={})
    app = create_app(PolicyPool([guard], CONFIG), CONFIG)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    yield f"http://127.0.0.1:{port}/v1", seen
    server.should_exit = True
    thread.join(30)
    plugin_manager.unregister(seen)


def test_guardrail_options_send_only_what_differs_from_the_defaults() -> None:
    assert guardrail_options() == {}
    assert guardrail_options(steer=False, strength=1, classify=False) == {
        "steer": False, "strength": 1.0, "classify": False}


def test_langchain_chat_model_steers_through_the_server(server: tuple[str, _Seen]) -> None:
    pytest.importorskip("langchain_openai")
    from guardrail.integrations.langchain import chat_model

    base_url, seen = server
    model = chat_model(base_url, "tiny-gated", strength=0.5, max_tokens=3, temperature=0)
    answer = model.invoke(COKE)
    assert isinstance(answer.content, str) and answer.response_metadata["model_name"] == "tiny-gated"
    [telemetry] = seen.telemetry
    assert telemetry.strength == 0.5 and telemetry.steered
    assert telemetry.gates[0].side == "answer"
    # Streaming and the unsteered model, through the same LangChain interface.
    pieces = list(chat_model(base_url, "tiny-gated", steer=False, max_tokens=3).stream(COKE))
    assert pieces and not seen.telemetry[-1].steered and seen.telemetry[-1].gates == []
    # What the server refuses, LangChain raises (the openai client's BadRequestError).
    import openai

    with pytest.raises(openai.BadRequestError, match="allows at most 2"):
        chat_model(base_url, "tiny-gated", strength=3, max_tokens=3).invoke(COKE)


def test_litellm_routes_the_proxy_configs_models_to_the_server(
    server: tuple[str, _Seen], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import
    pytest.importorskip("litellm")
    import litellm

    from guardrail.integrations.litellm import model_entry

    base_url, seen = server
    # The documented proxy config, pointed at this server: litellm's Router takes the same
    # model_list the proxy reads.
    config = yaml.safe_load((ROOT / "docs" / "examples" / "litellm_config.yaml").read_text())
    monkeypatch.setenv("GUARDRAIL_API_KEY", "not-needed")
    for entry in config["model_list"]:
        entry["litellm_params"].update(api_base=base_url, model="openai/tiny-gated")
    router = litellm.Router(model_list=config["model_list"])
    reply = router.completion(model="gentle-qwen", max_tokens=3, temperature=0,
                              messages=[{"role": "user", "content": COKE}])
    assert isinstance(reply.choices[0].message.content, str)
    assert seen.telemetry[-1].strength == 0.5 and seen.telemetry[-1].steered
    router.completion(model="steered-qwen", max_tokens=3,
                      messages=[{"role": "user", "content": COKE}])
    assert seen.telemetry[-1].strength is None and seen.telemetry[-1].steered
    # model_entry writes such an entry; the SDK call is the same without a Router.
    entry = model_entry("x", base_url, "tiny-gated", strength=2)
    assert entry["litellm_params"]["extra_body"] == {"guardrail": {"strength": 2.0}}
    litellm.completion(messages=[{"role": "user", "content": COKE}], max_tokens=3,
                       **entry["litellm_params"])
    assert seen.telemetry[-1].strength == 2.0
