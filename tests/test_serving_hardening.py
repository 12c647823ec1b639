"""``guardrail serve`` as a real process facing hostile and heavy traffic, on 127.0.0.1 only.

One server on the tiny random model, with authentication on (the key comes from
``GUARDRAIL_API_KEY``), takes a corpus of bad bodies, clients without the key, and a bounded
c=50 load whose ``/metrics`` counts must match what was sent. The shutdown tests start their
own servers, with a deliberately slow steering rail, and SIGTERM them with requests running
and queued.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from guardrail_plugins.mlp_energy import MLPEnergyModel, MLPEnergyParams
from prometheus_client.parser import text_string_to_metric_families

from guardrail.artifact.energy import EnergyArtifact
from guardrail.models import load_model, model_fingerprint

from .conftest import build_tiny_model, build_tiny_tokenizer
from .live_server import LiveServer, smol_server, start_server, write_yaml

KEY = "test-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "tell me about the store"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model directory and a random 4-layer energy artifact for it.

    The model never ends an answer by itself (its end-of-sequence token is suppressed), so a
    request runs for exactly ``max_tokens`` and the shutdown tests control how long.
    """
    directory = tmp_path_factory.mktemp("hardening")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    loaded = load_model(str(directory / "model"), device="cpu")
    torch.manual_seed(0)
    EnergyArtifact(
        plugin="mlp", fingerprint=model_fingerprint(loaded.model, loaded.name),
        models={layer: MLPEnergyModel(32, MLPEnergyParams(hidden=[64], dropout=0.0)).eval()
                for layer in range(4)},
    ).save(directory / "eds.safetensors")
    return directory


def _policy(tiny_dir: Path, name: str, *, steps: int = 2, batch: int = 8) -> Path:
    return write_yaml(tiny_dir / f"{name}.yaml", {
        "name": name, "model": {"source": str(tiny_dir / "model")},
        "generation": {"max_new_tokens": 4, "batch_size": batch},
        "rails": [{"name": "eds", "energy_model": {"plugin": "mlp",
                                                   "artifact": str(tiny_dir / "eds.safetensors")},
                   # a small eta keeps the random model away from its end-of-sequence token
                   "steerer": {"plugin": "gradient-descent",
                               "params": {"eta": 0.01, "steps": steps}}}]})


@pytest.fixture(scope="module")
def guarded(tiny_dir: Path) -> Iterator[LiveServer]:
    """The tiny-model server with authentication on, shared by this module's corpus, auth and
    load tests."""
    server = start_server([_policy(tiny_dir, "tiny")], tiny_dir / "guarded.log",
                          "--max-tokens-limit", "64", "--max-request-bytes", "65536",
                          "--batch-wait-ms", "10", env={"GUARDRAIL_API_KEY": KEY})
    yield server
    server.stop()


def _metrics(server: LiveServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{server.root}/metrics", headers=AUTH, timeout=30).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _value(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and set(labels.items()) <= ls)


# --- bad bodies --------------------------------------------------------------------------------
def _body(**fields: Any) -> bytes:
    return json.dumps({"model": "tiny", "messages": HELLO, **fields}).encode()


def _nested(depth: int) -> bytes:
    return (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "user": '
            + b"[" * depth + b"]" * depth + b"}")


CHAT = "/v1/chat/completions"
CORPUS: list[tuple[str, str, bytes, int, str | None, str | None]] = [
    # (case, path, body, status, param, code)
    ("lone surrogate", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": '
     b'"\\ud800"}]}', 400, "messages[0].content", "invalid_value"),
    ("lone surrogate, energies", "/v1/guardrail/energies", b'{"model": "tiny", "messages": '
     b'[{"role": "user", "content": "a\\udfffb"}]}', 400, "messages[0].content", "invalid_value"),
    ("1000 deep", CHAT, _nested(1000), 400, None, "invalid_json"),
    ("30000 deep", CHAT, _nested(30000), 400, None, "invalid_json"),
    ("seed 2**70", CHAT, _body(seed=2**70), 400, "seed", "invalid_value"),
    ("max_tokens string", CHAT, _body(max_tokens="4"), 400, "max_tokens", "invalid_value"),
    ("max_tokens float", CHAT, _body(max_tokens=4.0), 400, "max_tokens", "invalid_value"),
    ("max_tokens 1e400", CHAT, _body()[:-1] + b', "max_tokens": 1e400}', 400, "max_tokens",
     "invalid_value"),
    ("stream yes", CHAT, _body(stream="yes"), 400, "stream", "invalid_value"),
    ("temperature string", CHAT, _body(temperature="0.5"), 400, "temperature", "invalid_value"),
    ("temperature NaN", CHAT, _body()[:-1] + b', "temperature": NaN}', 400, None, "invalid_json"),
    ("top_p Infinity", CHAT, _body()[:-1] + b', "top_p": Infinity}', 400, None, "invalid_json"),
    ("guardrail.steer string", CHAT, _body(guardrail={"steer": "false"}), 400, "guardrail.steer",
     "invalid_value"),
    ("json_object format", CHAT, _body(response_format={"type": "json_object"}), 400,
     "response_format", "unsupported_value"),
    ("json_schema format", CHAT, _body(response_format={"type": "json_schema", "json_schema": {}}),
     400, "response_format", "unsupported_value"),
    ("logit_bias", CHAT, _body(logit_bias={"5": 10}), 400, "logit_bias", "unsupported_value"),
    ("presence_penalty", CHAT, _body(presence_penalty=0.5), 400, "presence_penalty",
     "unsupported_value"),
    ("tools", CHAT, _body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools",
     "unsupported_value"),
    ("functions", CHAT, _body(functions=[{"name": "f"}]), 400, "functions", "unsupported_value"),
    ("n 3", CHAT, _body(n=3), 400, "n", "unsupported_value"),
    ("not UTF-8", CHAT, b'{"model": "tiny", "messages": "\xff\xfe"}', 400, None, "invalid_json"),
    ("empty body", CHAT, b"", 400, None, "invalid_json"),
    ("null body", CHAT, b"null", 400, None, "invalid_json"),
    ("messages a string", CHAT, _body(messages="hi"), 400, "messages", "invalid_value"),
    ("image part", CHAT, _body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, "messages[0].content",
     "invalid_value"),
    ("model an int", CHAT, _body(model=7), 400, "model", "invalid_value"),
    ("empty stop", CHAT, _body(stop=[""]), 400, "stop", "invalid_value"),
    ("long unknown model", CHAT, _body(model="m" * 20000), 404, "model", "model_not_found"),
    ("oversize body", CHAT, _body(messages=[{"role": "user", "content": "x" * 70000}]), 413, None,
     "request_too_large"),
    ("unknown route", "/v1/completions", _body(), 404, None, "not_found"),
]


@pytest.mark.parametrize(("case", "path", "body", "status", "param", "code"), CORPUS,
                         ids=[c[0] for c in CORPUS])
def test_bad_bodies_get_openai_errors_and_the_server_keeps_serving(
    guarded: LiveServer, case: str, path: str, body: bytes, status: int, param: str | None,
    code: str | None,
) -> None:
    with httpx.Client(base_url=guarded.root, headers=AUTH, timeout=60) as client:
        bad = client.post(path, content=body, headers={"content-type": "application/json"})
        assert bad.status_code == status, bad.text[:500]
        error = bad.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["param"], error["code"]) == (param, code), error
        assert error["type"] == "invalid_request_error" and 10 < len(error["message"]) < 600
        # The same keep-alive connection answers the next request.
        good = client.post(CHAT, json={"model": "tiny", "messages": HELLO, "max_tokens": 2})
        assert good.status_code == 200, good.text[:500]
    assert guarded.process.poll() is None


def test_a_chunked_body_over_the_limit_is_refused_without_buffering_it(guarded: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(200):  # 200 x 4 KiB, no content-length: chunked transfer encoding
            yield b"x" * 4096
        yield b'"}]}'

    response = httpx.post(f"{guarded.base_url}/chat/completions", content=chunks(),
                          headers={**AUTH, "content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


# --- authentication -------------------------------------------------------------------------------
def test_clients_without_the_key_get_openai_401s_and_probes_stay_open(guarded: LiveServer) -> None:
    for api_key in ("wrong-key", KEY[:-1]):
        client = openai.OpenAI(base_url=guarded.base_url, api_key=api_key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model="tiny", messages=HELLO)  # type: ignore[arg-type]
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        assert api_key not in info.value.message and KEY not in info.value.message
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    missing = httpx.post(f"{guarded.base_url}/chat/completions", json={"model": "tiny"})
    assert missing.status_code == 401
    assert missing.json() == {"error": {
        "message": missing.json()["error"]["message"], "type": "invalid_request_error",
        "param": None, "code": "invalid_api_key"}}
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{guarded.root}/metrics").status_code == 401
    assert httpx.get(f"{guarded.root}/healthz").status_code == 200
    assert httpx.get(f"{guarded.root}/readyz").json()["status"] == "ready"
    client = openai.OpenAI(base_url=guarded.base_url, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    answer = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    assert KEY not in guarded.log_path.read_text()


# --- load ---------------------------------------------------------------------------------------
CONCURRENCY = 50
REQUESTS = 150


def test_bounded_load_at_c50_with_auth_loses_nothing_and_metrics_match(guarded: LiveServer) -> None:
    before = _metrics(guarded)

    async def load() -> list[Any]:
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        gate = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(base_url=guarded.base_url, headers=AUTH, limits=limits,
                                     timeout=120) as client:
            async def one(i: int) -> Any:
                async with gate:
                    try:
                        return await client.post("/chat/completions", json={
                            "model": "tiny", "max_tokens": 1 + i % 4,
                            "messages": [{"role": "user", "content": f"tell me about the store {i}"}]})
                    except httpx.HTTPError as exc:
                        return exc

            return list(await asyncio.gather(*(one(i) for i in range(REQUESTS))))

    started = time.perf_counter()
    results = asyncio.run(load())
    seconds = time.perf_counter() - started
    errors = [r for r in results if not isinstance(r, httpx.Response) or r.status_code != 200]
    lost = REQUESTS - len(results)
    print(f"\nc={CONCURRENCY}: {REQUESTS} requests in {seconds:.1f} s, {len(errors)} errors, "
          f"{lost} lost")
    assert not errors and not lost, [getattr(e, "text", repr(e))[:200] for e in errors[:3]]
    bodies = [r.json() for r in results if isinstance(r, httpx.Response)]
    after = _metrics(guarded)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("guardrail_requests_total", route=CHAT, method="POST", status="200") == REQUESTS
    assert delta("guardrail_requests_total", route=CHAT) == REQUESTS
    assert delta("guardrail_request_duration_seconds_count", route=CHAT) == REQUESTS
    assert delta("guardrail_time_to_first_token_seconds_count", policy="tiny") == REQUESTS
    assert delta("guardrail_tokens_total", policy="tiny", kind="completion") == sum(
        b["usage"]["completion_tokens"] for b in bodies)
    assert delta("guardrail_tokens_total", policy="tiny", kind="prompt") == sum(
        b["usage"]["prompt_tokens"] for b in bodies)
    batch_sizes = {b["guardrail"]["timing"]["batch_size"] for b in bodies}
    assert max(batch_sizes) > 1  # concurrent requests shared forward passes
    assert delta("guardrail_batch_size_sum") == REQUESTS
    assert delta("guardrail_steered_layers_total", policy="tiny") == sum(
        len(b["guardrail"]["layers_steered"]) for b in bodies)
    assert delta("guardrail_energy_before_count", policy="tiny", layer="0") == REQUESTS
    assert _value(after, "guardrail_queue_depth") == 0
    assert _value(after, "guardrail_queue_capacity") == 64


# --- tokenising off the event loop -------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    return smol_server(request, tmp_path_factory)


@pytest.mark.integration
def test_a_megabyte_prompt_does_not_hold_up_other_requests(smol: LiveServer) -> None:
    # SmolLM2's BPE tokenizer takes over a second for a 1 MB prompt; /healthz must not wait.
    body = {"model": "smol", "messages": [{"role": "user", "content": "word " * 200_000}]}
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def send() -> None:
        started = time.perf_counter()
        outcome["response"] = httpx.post(f"{smol.base_url}/chat/completions", json=body,
                                         timeout=120)
        outcome["seconds"] = time.perf_counter() - started
        done.set()

    thread = threading.Thread(target=send)
    thread.start()
    waits = []
    with httpx.Client(timeout=30) as client:
        while not done.is_set():
            started = time.perf_counter()
            assert client.get(f"{smol.root}/healthz").status_code == 200
            waits.append(time.perf_counter() - started)
            time.sleep(0.02)
    thread.join()
    print(f"\n1 MB prompt: answered in {outcome['seconds']:.2f} s; {len(waits)} /healthz calls "
          f"meanwhile, slowest {max(waits) * 1000:.0f} ms")
    assert outcome["response"].status_code == 400
    assert outcome["response"].json()["error"]["code"] == "context_length_exceeded"
    assert outcome["seconds"] > 0.3 and len(waits) >= 5  # the two did overlap
    assert max(waits) < 0.5


# --- SIGTERM with requests running and queued -----------------------------------------------------
RUNNING = 20
QUEUED = 6


def _slow_server(tiny_dir: Path, name: str, drain_timeout: str, batch: int = RUNNING
                 ) -> LiveServer:
    """A server whose batches take seconds: 40 gradient steps at 4 layers for every token.

    The first request waits up to 5 s for ``batch - 1`` others, so requests sent together
    share a batch.
    """
    policy = _policy(tiny_dir, name, steps=40, batch=batch)
    return start_server([policy], tiny_dir / f"{name}.log", "--max-batch-size", str(batch),
                        "--max-queue", "32", "--batch-wait-ms", "5000", "--max-tokens-limit",
                        "200", "--drain-timeout", drain_timeout)


def _client() -> httpx.Client:
    limits = httpx.Limits(max_connections=RUNNING + QUEUED)
    return httpx.Client(timeout=120, limits=limits)


def _send(client: httpx.Client, server: LiveServer, i: int, max_tokens: int, stream: bool
          ) -> dict[str, Any]:
    body = {"model": server.log_path.stem, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": f"tell me about the store {i}"}]}
    try:
        with client.stream("POST", f"{server.base_url}/chat/completions", json=body) as reply:
            text = "".join(reply.iter_text())
            return {"status": reply.status_code, "text": text}
    except httpx.HTTPError as exc:
        return {"status": None, "text": repr(exc)}


def _until(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _worker(server: LiveServer) -> dict[str, Any]:
    return dict(server.health()["workers"][0])


def _sse_finish(text: str) -> tuple[str | None, str | None]:
    """(finish_reason of the stream's last choice chunk, error code) and whether it ended."""
    finish, error = None, None
    for line in text.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["code"]
            for choice in event.get("choices", []):
                finish = choice.get("finish_reason") or finish
    return finish, error


def test_sigterm_lets_running_requests_finish_and_answers_queued_ones_503(tiny_dir: Path) -> None:
    server = _slow_server(tiny_dir, "drain", "60")  # the policy's name is the log file's stem
    try:
        with ThreadPoolExecutor(RUNNING + QUEUED) as pool, _client() as client:
            running = [pool.submit(_send, client, server, i, 30, i % 4 == 0)
                       for i in range(RUNNING)]
            _until(lambda: _worker(server)["running"] == RUNNING, "a running batch of 20")
            queued = [pool.submit(_send, client, server, i, 30, i % 2 == 0)
                      for i in range(QUEUED)]
            _until(lambda: _worker(server)["queued"] == QUEUED, "6 queued requests")
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            _until(lambda: not _port_open(server), "the listener to close", timeout=10)
            done_running = [f.result(timeout=120) for f in running]
            done_queued = [f.result(timeout=120) for f in queued]
        code = server.process.wait(timeout=60)
    finally:
        server.stop()
    seconds = time.monotonic() - signalled
    statuses = [r["status"] for r in done_running + done_queued]
    print(f"\nSIGTERM drain: {RUNNING} running -> {statuses[:RUNNING].count(200)} x 200, "
          f"{QUEUED} queued -> {statuses[RUNNING:].count(503)} x 503, "
          f"{statuses.count(None)} without a response; exited after {seconds:.1f} s")
    assert None not in statuses, [r["text"] for r in done_running + done_queued if not r["status"]]
    for i, reply in enumerate(done_running):
        assert reply["status"] == 200, reply["text"][:300]
        if i % 4 == 0:  # streamed: it ran to the end and said so
            finish, error = _sse_finish(reply["text"])
            assert finish in ("length", "stop") and error is None and "[DONE]" in reply["text"]
        else:
            assert json.loads(reply["text"])["choices"][0]["finish_reason"] in ("length", "stop")
    for reply in done_queued:
        assert reply["status"] == 503 and json.loads(reply["text"])["error"]["code"] == \
            "shutting_down"
    assert code == -signal.SIGTERM
    drained = [e for e in server.log_events() if e.get("event") == "serve.draining"]
    assert drained and drained[0]["queued_answered_503"] == QUEUED
    assert drained[0]["running"] == RUNNING


def test_past_the_drain_timeout_running_requests_are_answered_503(tiny_dir: Path) -> None:
    server = _slow_server(tiny_dir, "drain-short", "1", batch=4)
    try:
        with ThreadPoolExecutor(4) as pool, _client() as client:
            running = [pool.submit(_send, client, server, i, 200, i == 0) for i in range(4)]
            _until(lambda: _worker(server)["running"] == 4, "a running batch of 4")
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            replies = [f.result(timeout=120) for f in running]
        code = server.process.wait(timeout=60)
        seconds = time.monotonic() - signalled
    finally:
        server.stop()
    assert code == -signal.SIGTERM and seconds < 20  # 200 tokens would take much longer
    streamed, rest = replies[0], replies[1:]
    assert streamed["status"] == 200  # its headers went out before the signal
    assert _sse_finish(streamed["text"])[1] == "shutting_down" and "[DONE]" in streamed["text"]
    for reply in rest:
        assert reply["status"] == 503 and json.loads(reply["text"])["error"]["code"] == \
            "shutting_down"
    assert any(e.get("event") == "serve.drain_timeout" for e in server.log_events())


def _port_open(server: LiveServer) -> bool:
    try:
        httpx.get(f"{server.root}/healthz", timeout=1)
    except httpx.TransportError:
        return False
    return True


def test_serve_refuses_an_empty_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from guardrail.cli import main

    policy = write_yaml(tmp_path / "p.yaml", {"name": "p", "model": {"source": "x"}})
    assert main(["serve", "--policy", str(policy), "--api-key", " "]) == 1
    assert "--api-key: the API key is empty" in capsys.readouterr().err
    monkeypatch.setenv("GUARDRAIL_API_KEY", "")
    assert main(["serve", "--policy", str(policy)]) == 1
    assert "GUARDRAIL_API_KEY: the API key is empty" in capsys.readouterr().err


# --- trust boundaries: Host and content type ---------------------------------------------------
@pytest.mark.parametrize(("host", "path", "status"), [
    ("evil.example", "/v1/models", 400),
    ("evil.example:80", "/v1/chat/completions", 400),
    ("127.0.0.1.evil.example", "/v1/models", 400),
    ("localhost:{port}", "/v1/models", 200),
    ("127.0.0.1:{port}", "/v1/models", 200),
    ("[::1]:{port}", "/v1/models", 200),
    ("evil.example", "/healthz", 200),  # the probes answer whatever the Host
])
def test_a_foreign_host_is_refused(guarded: LiveServer, host: str, path: str, status: int) -> None:
    headers = {**AUTH, "host": host.format(port=guarded.port)}
    if path == CHAT:
        reply = httpx.post(f"{guarded.root}{path}", content=_body(max_tokens=1),
                           headers={**headers, "content-type": "application/json"}, timeout=60)
    else:
        reply = httpx.get(f"{guarded.root}{path}", headers=headers, timeout=60)
    assert reply.status_code == status, reply.text[:300]
    if status == 400:
        error = reply.json()["error"]
        assert error["code"] == "host_not_allowed" and "--allowed-host" in error["message"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x",
                                          "application/json; charset=latin-1"])
def test_request_bodies_must_be_json(guarded: LiveServer, content_type: str | None) -> None:
    headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
    reply = httpx.post(f"{guarded.base_url}/chat/completions", content=_body(max_tokens=1),
                       headers=headers, timeout=60)
    assert reply.status_code == 415, reply.text[:300]
    assert reply.json()["error"]["code"] == "unsupported_media_type"
    ok = httpx.post(f"{guarded.base_url}/chat/completions", content=_body(max_tokens=1),
                    headers={**AUTH, "content-type": "application/json; charset=UTF-8"},
                    timeout=60)
    assert ok.status_code == 200, ok.text[:300]


# --- metrics cardinality --------------------------------------------------------------------------
def test_metrics_stay_bounded_whatever_methods_and_paths_clients_send(guarded: LiveServer) -> None:
    import random

    rng = random.Random(0)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    size_before = len(httpx.get(f"{guarded.root}/metrics", headers=AUTH, timeout=30).content)

    async def flood() -> None:
        async with httpx.AsyncClient(base_url=guarded.root, timeout=60) as client:
            for start in range(0, 2000, 100):
                await asyncio.gather(*(client.request(
                    "".join(rng.choices(letters, k=rng.randint(3, 12))),
                    f"/{rng.randint(0, 10**9)}/x%1b%5d0", headers={"host": "127.0.0.1"})
                    for _ in range(start, start + 100)))

    asyncio.run(flood())
    text = httpx.get(f"{guarded.root}/metrics", headers=AUTH, timeout=30).text
    methods = {s.labels["method"] for f in text_string_to_metric_families(text)
               for s in f.samples if "method" in s.labels}
    routes = {s.labels["route"] for f in text_string_to_metric_families(text)
              for s in f.samples if "route" in s.labels}
    print(f"\n/metrics: {size_before} bytes before 2000 requests with random methods, "
          f"{len(text)} after")
    assert methods <= {"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "other"}
    assert "other" in methods and "other" in routes
    assert len(text) < size_before + 8000
    assert guarded.process.poll() is None


# --- one admission path ---------------------------------------------------------------------------
def _big(i: int, words: int, model: str = "admit") -> bytes:
    return json.dumps({"model": model, "max_tokens": 2, "messages": [
        {"role": "user", "content": f"tell me about the store {i} " * words}]}).encode()


def _post(client: httpx.Client, server: LiveServer, body: bytes) -> dict[str, Any]:
    try:
        reply = client.post(f"{server.base_url}/chat/completions", content=body,
                            headers={"content-type": "application/json"})
        return {"status": reply.status_code, "text": reply.text,
                "type": reply.headers.get("content-type", "")}
    except httpx.HTTPError as exc:
        return {"status": None, "text": repr(exc), "type": ""}


def _sigterm_while_admitted(server: LiveServer, bodies: list[bytes],
                            settle: float = 0.0) -> list[dict[str, Any]]:
    """Post every body at once, send SIGTERM once 30 are admitted (``settle`` seconds later),
    and return each reply once the server has exited; the server is stopped either way."""
    try:
        with ThreadPoolExecutor(len(bodies)) as pool, httpx.Client(
                timeout=120, limits=httpx.Limits(max_connections=len(bodies))) as client:
            futures = [pool.submit(_post, client, server, body) for body in bodies]
            _until(lambda: server.health()["admission"]["admitted"] >= 30, "30 admitted")
            time.sleep(settle)
            server.process.send_signal(signal.SIGTERM)
            replies = [f.result(timeout=120) for f in futures]
        server.process.wait(timeout=60)
    finally:
        server.stop()
    return replies


def _admit_server(tiny_dir: Path, name: str, *extra: str) -> LiveServer:
    policy = _policy(tiny_dir, name, steps=1, batch=4)
    return start_server([policy], tiny_dir / f"{name}.log", "--max-request-bytes", str(2 << 20),
                        "--max-prompt-tokens", "64", *extra)


def test_sigterm_with_tokenisation_in_flight_answers_everyone_in_openai_shape(
    tiny_dir: Path,
) -> None:
    # 40 megabyte prompts queue up on the one tokenising thread (each is refused after
    # tokenising: too long); 4 small requests wait behind them. SIGTERM then.
    server = _admit_server(tiny_dir, "admit", "--drain-timeout", "1")
    bodies = [_big(i, 40_000) for i in range(40)] + [_big(i, 2) for i in range(4)]
    replies = _sigterm_while_admitted(server, bodies)
    statuses = [r["status"] for r in replies]
    print(f"\nSIGTERM while tokenising: {statuses.count(503)} x 503, {statuses.count(400)} x "
          f"400 (too long, tokenised before the signal), {statuses.count(200)} x 200")
    for reply in replies:
        assert reply["status"] in (200, 400, 503), reply
        assert reply["type"].startswith("application/json"), reply
        body = json.loads(reply["text"])
        if reply["status"] == 503:
            assert body["error"]["code"] == "shutting_down"
    assert all(r["status"] in (200, 503) for r in replies[40:])
    assert statuses.count(503) >= 20
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Internal Server Error" not in log
    drained = [e for e in server.log_events() if e.get("event") == "serve.draining"]
    assert drained and drained[0]["admitted_answered_503"] >= 20


def test_the_queue_bound_counts_requests_still_tokenising(tiny_dir: Path) -> None:
    server = _admit_server(tiny_dir, "bound", "--max-queue", "4")
    try:
        with ThreadPoolExecutor(12) as pool, httpx.Client(timeout=120) as client:
            futures = [pool.submit(_post, client, server, _big(i, 40_000, "bound"))
                       for i in range(12)]
            seen = 0
            while not all(f.done() for f in futures):
                seen = max(seen, server.health()["admission"]["admitted"])
                time.sleep(0.05)
            replies = [f.result() for f in futures]
    finally:
        server.stop()
    codes = [json.loads(r["text"])["error"]["code"] for r in replies]
    assert seen <= 4 and codes.count("queue_full") >= 4, (seen, codes)
    assert set(codes) <= {"queue_full", "context_length_exceeded"}


def test_a_client_gone_mid_upload_is_logged_as_a_disconnect(guarded: LiveServer) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                     b"authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"content-type: application/json\r\ncontent-length: 60000\r\n\r\n"
                     + b'{"model": "tiny", "messages": [' + b" " * 1000)
        time.sleep(0.5)
    _until(lambda: any(e.get("event") == "serve.request" and e.get("status") == 499
                       for e in guarded.log_events()), "the disconnect's log event", timeout=30)
    event = next(e for e in guarded.log_events()
                 if e.get("event") == "serve.request" and e.get("status") == 499)
    assert event["disconnected"] is True and event["path"] == CHAT
    assert "Traceback" not in guarded.log_path.read_text(errors="replace")
    assert _value(_metrics(guarded), "guardrail_requests_total", route=CHAT, status="500") == 0


@pytest.mark.integration
def test_sigterm_while_smollm2_tokenises_megabyte_prompts(tmp_path: Path) -> None:
    # The probe's case: SmolLM2's BPE tokenizer takes about a second per megabyte prompt.
    from guardrail.models import is_installed

    from .live_server import SMOL

    if not is_installed(SMOL):
        pytest.skip(f"packaged checkpoint {SMOL} is not installed")
    policy = write_yaml(tmp_path / "admit.yaml", {"name": "admit", "model": {"source": SMOL},
                                                  "generation": {"max_new_tokens": 4}})
    server = start_server([policy], tmp_path / "admit.log", "--drain-timeout", "1",
                          "--max-request-bytes", str(2 << 20))
    bodies = [_big(i, 40_000) for i in range(40)] + [_big(i, 2) for i in range(4)]
    replies = _sigterm_while_admitted(server, bodies, settle=1.5)  # one or two tokenised by then
    statuses = [r["status"] for r in replies]
    print(f"\nSmolLM2, SIGTERM while tokenising: {statuses.count(503)} x 503, "
          f"{statuses.count(400)} x 400, {statuses.count(200)} x 200")
    assert all(r["status"] in (200, 400, 503) and r["type"].startswith("application/json")
               for r in replies), replies
    assert all(r["status"] in (200, 503) for r in replies[40:])
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Internal Server Error" not in log
