"""``guardrail serve`` as a real process, called by real clients (openai, httpx, curl).

The SmolLM2 tests share one server process (see ``live_server``); the shutdown and logging
tests start their own server on the tiny random model.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .live_server import STEERED_LAYERS, LiveServer, smol_server, start_server, write_yaml

QUESTION = [{"role": "user", "content": "Name a colour of the sky."}]


@pytest.fixture(scope="session")
def smol(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    return smol_server(request, tmp_path_factory)


@pytest.fixture
def client(smol: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=smol.base_url, api_key="not-needed", max_retries=0, timeout=120)


@pytest.mark.integration
def test_openai_client_gets_steered_answer_telemetry_and_timing(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="smol-eds", messages=QUESTION, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 6
    ext = (completion.model_extra or {})["guardrail"]
    assert ext["policy"] == "smol-eds" and ext["model"] == "smollm2-135m-instruct"
    assert [e["layer"] for e in ext["energies"]] == list(STEERED_LAYERS)
    assert ext["layers_steered"] == list(STEERED_LAYERS)
    for energy in ext["energies"]:
        assert energy["energy_after"] < energy["energy_before"]
    assert ext["verdict"]["reason"] is not None
    assert float(raw.headers["x-guardrail-generate-ms"]) > 0
    assert raw.headers["x-request-id"] == completion.id


@pytest.mark.integration
def test_openai_stream_yields_tokens_that_join_to_the_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=8,  # type: ignore[arg-type]
                                           temperature=0)
    stream = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=8,  # type: ignore[arg-type]
                                            temperature=0, stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2
    assert "".join(deltas) == whole.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert (last.model_extra or {})["guardrail"]["policy"] == "smol"


@pytest.mark.integration
def test_concurrent_clients_share_forward_passes(smol: LiveServer, client: openai.OpenAI) -> None:
    prompts = ["Say hi.", "Count to three.", "Name a fruit.", "Name a city."]

    def ask(prompt: str) -> Any:
        return client.chat.completions.with_raw_response.create(
            model="smol", messages=[{"role": "user", "content": prompt}], max_tokens=4)

    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(ask, prompts))
    sizes = [int(r.headers["x-guardrail-batch-size"]) for r in responses]
    assert all(r.parse().choices[0].message.content for r in responses)
    assert max(sizes) >= 2, sizes
    assert smol.health()["workers"][0]["largest_batch"] >= 2


@pytest.mark.integration
def test_bad_requests_get_4xx_and_the_server_keeps_serving(smol: LiveServer, client: openai.OpenAI) -> None:
    malformed = httpx.post(f"{smol.base_url}/chat/completions", content=b'{"model": "smol",',
                           headers={"content-type": "application/json"}, timeout=30)
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-policy", messages=QUESTION)  # type: ignore[arg-type]
    assert unknown.value.code == "model_not_found" and "smol-eds" in unknown.value.message
    for max_tokens in (-1, 10**7):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=max_tokens)  # type: ignore[arg-type]
        assert bad.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as content:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": 7}])  # type: ignore[list-item]
    assert content.value.param == "messages[0].content"
    ok = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]
    assert ok.choices[0].message.content


@pytest.mark.integration
def test_client_disconnect_mid_stream_frees_its_slot(smol: LiveServer) -> None:
    before = smol.health()["workers"][0]
    body = {"model": "smol", "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 400, "stream": True}
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", f"{smol.base_url}/chat/completions", json=body) as response:
        seen = 0
        for line in response.iter_lines():
            if '"content"' in line:
                seen += 1
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    left_at = time.monotonic()
    while time.monotonic() - left_at < 15:
        worker = smol.health()["workers"][0]
        if worker["running"] == 0 and worker["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.2)
    assert worker["running"] == 0 and worker["queued"] == 0
    assert worker["cancelled"] == before["cancelled"] + 1
    # The row stopped soon after the disconnect, far short of its 400 tokens.
    assert worker["tokens_generated"] - before["tokens_generated"] < 100
    events = [e for e in smol.log_events() if e.get("event") == "serve.request" and e.get("disconnected")]
    assert events and events[-1]["stream"] is True


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_server_sent_events(smol: LiveServer) -> None:
    body = json.dumps({"model": "smol", "messages": QUESTION, "max_tokens": 4, "stream": True})
    out = subprocess.run(
        ["curl", "-sN", f"{smol.base_url}/chat/completions", "-H", "content-type: application/json",
         "-d", body], capture_output=True, text=True, timeout=120, check=True).stdout
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["object"] == "chat.completion.chunk"
    assert "guardrail" in json.loads(events[-2])


@pytest.mark.integration
def test_policies_on_one_model_share_one_worker(smol: LiveServer, client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == ["smol", "smol-eds", "smol-judged"]
    workers = smol.health()["workers"]
    assert len(workers) == 1 and sorted(workers[0]["policies"]) == ["smol", "smol-eds", "smol-judged"]
    loads = [e for e in smol.log_events() if e.get("event") == "model.loaded"]
    assert len(loads) == 1


@pytest.mark.integration
def test_energies_endpoint_over_http(smol: LiveServer) -> None:
    response = httpx.post(f"{smol.base_url}/guardrail/energies",
                          json={"model": "smol-eds", "messages": QUESTION}, timeout=60)
    assert response.status_code == 200
    body = response.json()
    assert [e["layer"] for e in body["energies"]] == list(STEERED_LAYERS)
    assert all(isinstance(e["energy"], float) for e in body["energies"]) and body["prompt_tokens"] > 5


# --- tiny model: logging and shutdown ------------------------------------------------------------
def test_one_log_event_per_request_and_clean_shutdown(tiny_model_dir: Path, tmp_path: Path) -> None:
    policy = write_yaml(tmp_path / "tiny.yaml", {
        "name": "tiny", "model": {"source": str(tiny_model_dir)},
        "generation": {"max_new_tokens": 4}})
    server = start_server([policy], tmp_path / "server.log", "--max-tokens-limit", "32")
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        client.chat.completions.create(model="tiny", messages=QUESTION)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=33)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=QUESTION)  # type: ignore[arg-type]
        assert server.health()["status"] == "ok"
    finally:
        started = time.monotonic()
        code = server.stop()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells why it ended.
    assert code == -signal.SIGTERM and time.monotonic() - started < 20
    events = server.log_events()
    requests = [e for e in events if e.get("event") == "serve.request"]
    # Startup polling of /healthz comes first, then exactly one event per request made above.
    while requests and requests[0]["path"] == "/healthz":
        requests.pop(0)
    assert [(e["path"], e["status"]) for e in requests] == [
        ("/v1/chat/completions", 200), ("/v1/chat/completions", 400),
        ("/v1/chat/completions", 404), ("/healthz", 200)]
    assert requests[0]["completion_tokens"] >= 1 and requests[1]["error"] == "invalid_value"
    names = [e.get("event") for e in events]
    assert names.index("serve.stopping") < names.index("serve.worker_stopped") < names.index("serve.stopped")


def test_serve_command_reports_bad_policies_and_ports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from guardrail.cli import main

    assert main(["serve", "--policy", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml:\n  - file not found" in capsys.readouterr().err
    policy = write_yaml(tmp_path / "p.yaml", {"name": "p", "model": {"source": "x"}})
    for option, value in (("--port", "70000"), ("--drain-timeout", "inf"),
                          ("--max-queue", "many")):
        with pytest.raises(SystemExit) as info:
            main(["serve", "--policy", str(policy), option, value])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"error: argument {option}" in err and f": got '{value}'; expected" in err
