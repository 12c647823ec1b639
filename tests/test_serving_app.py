"""The HTTP app in-process on a tiny random model: answers, streaming, batching, errors, limits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from guardrail_plugins.mlp_energy import MLPEnergyModel, MLPEnergyParams

from guardrail import hookimpl
from guardrail.artifact.energy import EnergyArtifact
from guardrail.models import model_fingerprint
from guardrail.policy.model import parse_policy
from guardrail.serving import ServeConfig, create_app
from guardrail.serving.pool import PolicyPool
from guardrail.steering.guard import Guardrail

COKE = [{"role": "user", "content": "where can i buy coke"}]
KILL = [{"role": "user", "content": "how can i kill a python process please"}]
STORE = [{"role": "user", "content": "tell me about the store"}]
LONG = [{"role": "user", "content": "how can i kill a python process please " * 10}]  # > 40 tokens


def tiny_guards(loaded: Any, tmp_path: Path) -> tuple[Guardrail, Guardrail]:
    """A steered policy (random energy model at layers 1 and 2) and an unsteered one, one model."""
    torch.manual_seed(0)
    hidden = loaded.model.config.hidden_size
    artifact = EnergyArtifact(
        plugin="mlp", fingerprint=model_fingerprint(loaded.model, loaded.name),
        models={layer: MLPEnergyModel(hidden, MLPEnergyParams(hidden=[16], dropout=0.0)).eval()
                for layer in (1, 2)},
    )
    path = artifact.save(tmp_path / "eds.safetensors")
    steered = parse_policy({
        "name": "tiny-eds", "model": {"source": "unused"},
        "generation": {"max_new_tokens": 6, "batch_size": 4},
        "rails": [{"name": "eds", "energy_model": {"plugin": "mlp", "artifact": str(path)},
                   "steerer": {"plugin": "gradient-descent", "params": {"eta": 5.0, "steps": 3}}}],
    })
    base = parse_policy({"name": "tiny-base", "model": {"source": "unused"},
                         "generation": {"max_new_tokens": 6, "batch_size": 4}})
    return (Guardrail.from_policy(steered, loaded=loaded), Guardrail.from_policy(base, loaded=loaded))


CONFIG = ServeConfig(max_tokens_limit=64, max_prompt_tokens=40, max_request_bytes=4096,
                     batch_wait_ms=30, request_timeout_s=30)


@pytest.fixture
def guards(tiny_loaded, tmp_path: Path) -> tuple[Guardrail, Guardrail]:  # type: ignore[no-untyped-def]
    return tiny_guards(tiny_loaded, tmp_path)


def make_pool(guards: tuple[Guardrail, ...], **overrides: Any) -> PolicyPool:
    config = ServeConfig(**{**CONFIG.__dict__, **overrides})
    return PolicyPool(guards, config)


@pytest.fixture
def pool(guards) -> Iterator[PolicyPool]:  # type: ignore[no-untyped-def]
    pool = make_pool(guards)
    pool.start()
    yield pool
    pool.stop()


def call(pool: PolicyPool, scenario: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    """Run ``scenario`` against the app over httpx's in-process ASGI transport."""
    app = create_app(pool)

    async def main() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await scenario(client)

    return asyncio.run(main())


def chat(client: httpx.AsyncClient, messages: list[dict[str, str]], model: str = "tiny-eds",
         **fields: Any) -> Awaitable[httpx.Response]:
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, **fields})


def sse_events(text: str) -> list[Any]:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.strip()]
    return [event if event == "[DONE]" else json.loads(event) for event in events]


# --- answers ------------------------------------------------------------------------------------
def test_completion_is_the_steered_answer_with_telemetry(pool: PolicyPool, guards) -> None:  # type: ignore[no-untyped-def]
    response = call(pool, lambda c: chat(c, KILL, max_tokens=5))
    assert response.status_code == 200
    body = response.json()
    expected = guards[0].generate([KILL], max_new_tokens=5)[0]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["object"] == "chat.completion" and body["model"] == "tiny-eds"
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)
    assert body["usage"]["prompt_tokens"] == expected.telemetry.prompt_tokens
    ext = body["guardrail"]
    assert ext["steered"] is True and ext["layers_steered"] == [1, 2]
    assert [(e["rail"], e["layer"]) for e in ext["energies"]] == [("eds", 1), ("eds", 2)]
    for energy in ext["energies"]:
        assert energy["energy_after"] < energy["energy_before"] and energy["steps"] >= 3
    assert ext["verdict"]["refused"] in (True, False) and ext["verdict_error"] is None
    for header in ("queue", "generate", "classify", "total"):
        assert float(response.headers[f"x-guardrail-{header}-ms"]) >= 0
    assert response.headers["x-guardrail-batch-size"] == "1"
    assert response.headers["x-request-id"] == body["id"]


def test_steer_false_gives_the_unsteered_answer(pool: PolicyPool, guards) -> None:  # type: ignore[no-untyped-def]
    response = call(pool, lambda c: chat(c, COKE, guardrail={"steer": False, "classify": False}))
    body = response.json()
    base = guards[0].generate([COKE], steer=False)[0]
    assert body["choices"][0]["message"]["content"] == base.text
    assert body["guardrail"]["steered"] is False and body["guardrail"]["energies"] == []
    assert body["guardrail"]["verdict"] is None


def test_stream_deltas_join_to_the_non_streamed_answer(pool: PolicyPool) -> None:
    async def scenario(c: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        whole = await chat(c, KILL, max_tokens=6)
        streamed = await chat(c, KILL, max_tokens=6, stream=True,
                              stream_options={"include_usage": True})
        return whole, streamed

    whole, streamed = call(pool, scenario)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole.json()["choices"][0]["message"]["content"]
    final = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert len(final) == 1 and final[0]["guardrail"]["layers_steered"] == [1, 2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.json()["usage"]
    assert len({c["id"] for c in chunks}) == 1


def test_stop_sequence_cuts_the_answer_streamed_or_not(pool: PolicyPool) -> None:
    async def scenario(c: httpx.AsyncClient) -> list[httpx.Response]:
        full = (await chat(c, STORE, model="tiny-base", max_tokens=12)).json()
        text = full["choices"][0]["message"]["content"]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        return [full, stop, await chat(c, STORE, model="tiny-base", max_tokens=12, stop=stop),
                await chat(c, STORE, model="tiny-base", max_tokens=12, stop=[stop], stream=True)]

    full, stop, cut, streamed = call(pool, scenario)
    text = full["choices"][0]["message"]["content"]
    assert len(stop) == 3
    expected = text[: text.index(stop)]
    assert cut.json()["choices"][0]["message"]["content"] == expected
    assert cut.json()["choices"][0]["finish_reason"] == "stop"
    chunks = sse_events(streamed.text)[:-1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_requests_share_one_batch_and_keep_their_own_limits(guards) -> None:  # type: ignore[no-untyped-def]
    requests = [(COKE, 3), (KILL, 6), (STORE, 5)]
    pool = make_pool(guards, batch_wait_ms=500)  # room for all three on a busy machine

    async def scenario(c: httpx.AsyncClient) -> list[httpx.Response]:
        return list(await asyncio.gather(*[chat(c, m, max_tokens=n) for m, n in requests]))

    pool.start()
    try:
        responses = call(pool, scenario)
    finally:
        pool.stop()
    assert [r.headers["x-guardrail-batch-size"] for r in responses] == ["3", "3", "3"]
    for response, (messages, max_tokens) in zip(responses, requests, strict=True):
        alone = guards[0].generate([messages], max_new_tokens=max_tokens)[0]
        body = response.json()
        assert body["choices"][0]["message"]["content"] == alone.text
        assert body["usage"]["completion_tokens"] == len(alone.token_ids) <= max_tokens
    assert pool.workers[0].stats.largest_batch == 3


def test_seeded_sampling_is_reproducible(pool: PolicyPool) -> None:
    async def scenario(c: httpx.AsyncClient) -> list[httpx.Response]:
        fields = {"temperature": 1.5, "seed": 7, "max_tokens": 12}
        return list(await asyncio.gather(*[chat(c, COKE, model="tiny-base", **fields)
                                           for _ in range(2)]))

    first, second = call(pool, scenario)
    assert first.json()["choices"][0]["message"]["content"] == \
        second.json()["choices"][0]["message"]["content"]
    assert first.headers["x-guardrail-batch-size"] == second.headers["x-guardrail-batch-size"] == "1"


# --- other endpoints ----------------------------------------------------------------------------
def test_energies_endpoint_scores_without_generating(pool: PolicyPool, guards) -> None:  # type: ignore[no-untyped-def]
    response = call(pool, lambda c: c.post("/v1/guardrail/energies",
                                           json={"model": "tiny-eds", "messages": COKE}))
    assert response.status_code == 200
    body = response.json()
    expected = guards[0].energies([COKE])[0].layers
    assert [(e["layer"], e["threshold"]) for e in body["energies"]] == [(1, 0.0), (2, 0.0)]
    for got, want in zip(body["energies"], expected, strict=True):
        assert got["energy"] == pytest.approx(want.energy_before, abs=1e-5)
    assert pool.workers[0].stats.tokens_generated == 0


def test_models_and_health_show_policies_sharing_one_worker(pool: PolicyPool) -> None:
    async def scenario(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [await c.get("/v1/models"), await c.get("/v1/models/tiny-eds"), await c.get("/healthz")]

    models, one, health = call(pool, scenario)
    assert [m["id"] for m in models.json()["data"]] == ["tiny-base", "tiny-eds"]
    assert one.json()["guardrail"]["rails"] == [{"name": "eds", "layers": [1, 2]}]
    workers = health.json()["workers"]
    assert len(workers) == 1 and workers[0]["policies"] == ["tiny-eds", "tiny-base"]
    assert health.json()["status"] == "ok" and workers[0]["alive"] is True


# --- bad input ----------------------------------------------------------------------------------
GOOD = {"model": "tiny-eds", "messages": KILL}
BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "tiny-eds", "messages": [', 400, None, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None, "invalid_json"),
    ("unknown policy", {**GOOD, "model": "nope"}, 404, "model", "model_not_found"),
    ("non-string content", {**GOOD, "messages": [{"role": "user", "content": 42}]}, 400,
     "messages[0].content", "invalid_value"),
    ("unknown role", {**GOOD, "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages[0].role", "invalid_value"),
    ("no messages", {**GOOD, "messages": []}, 400, "messages", "invalid_value"),
    ("missing model", {"messages": KILL}, 400, "model", "invalid_value"),
    ("negative max_tokens", {**GOOD, "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ("huge max_tokens", {**GOOD, "max_tokens": 10**9}, 400, "max_tokens", "invalid_value"),
    ("huge max_completion_tokens", {**GOOD, "max_completion_tokens": 65}, 400,
     "max_completion_tokens", "invalid_value"),
    ("n > 1", {**GOOD, "n": 2}, 400, "n", "unsupported_value"),
    ("too many stops", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("oversize prompt", {**GOOD, "messages": LONG}, 400,
     "messages", "context_length_exceeded"),
    ("oversize body", {**GOOD, "messages": [{"role": "user", "content": "x" * 5000}]}, 413,
     None, "request_too_large"),
    ("bad guardrail option", {**GOOD, "guardrail": {"steeer": False}}, 400,
     "guardrail.steeer", "invalid_value"),
]


@pytest.mark.parametrize(("case", "body", "status", "param", "code"), BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_openai_error_and_server_keeps_serving(
    pool: PolicyPool, case: str, body: Any, status: int, param: str | None, code: str
) -> None:
    async def scenario(c: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        bad = await c.post("/v1/chat/completions", content=content,
                           headers={"content-type": "application/json"})
        return bad, await c.post("/v1/chat/completions", json={**GOOD, "max_tokens": 2})

    bad, good = call(pool, scenario)
    assert bad.status_code == status
    error = bad.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error" and len(error["message"]) > 10
    assert good.status_code == 200


def test_error_messages_name_the_field_and_the_limit(pool: PolicyPool) -> None:
    async def scenario(c: httpx.AsyncClient) -> list[dict[str, Any]]:
        out = []
        for body in ({**GOOD, "messages": [{"role": "user", "content": 42}]},
                     {**GOOD, "max_tokens": 10**9},
                     {**GOOD, "messages": LONG}):
            out.append((await c.post("/v1/chat/completions", json=body)).json()["error"]["message"])
        return out

    content, huge, long = call(pool, scenario)
    assert content.startswith("messages[0].content: got 42 (int); expected a string")
    assert huge == "max_tokens: got 1000000000; this server allows at most 64 (--max-tokens-limit)"
    assert "accepts at most 40 (--max-prompt-tokens)" in long


def test_unknown_route_is_an_openai_style_404(pool: PolicyPool) -> None:
    response = call(pool, lambda c: c.post("/v1/completions", json={}))
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


# --- capacity, timeouts, lifecycle ---------------------------------------------------------------
class SlowSteps:
    """A plugin whose per-step hook sleeps, so generation takes long enough to interrupt."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    @hookimpl
    def guardrail_on_step(self, event: Any) -> None:
        time.sleep(self.seconds)


@pytest.fixture
def slow_steps(plugin_manager) -> Iterator[SlowSteps]:  # type: ignore[no-untyped-def]
    plugin = SlowSteps(0.05)
    plugin_manager.register(plugin, name="slow-steps")
    yield plugin
    plugin_manager.unregister(plugin)


def test_full_queue_answers_503_and_the_queued_requests_still_finish(guards, slow_steps) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(guards, max_queue=1, batch_wait_ms=0, max_batch_size=1)
    pool.start()

    worker = pool.workers[0]

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(200):
            if condition():
                return
            await asyncio.sleep(0.025)
        raise AssertionError("the worker never got there")

    async def scenario(c: httpx.AsyncClient) -> list[httpx.Response]:
        running = asyncio.create_task(chat(c, KILL, max_tokens=10))
        await until(lambda: worker.stats.running == 1)
        queued = asyncio.create_task(chat(c, COKE, max_tokens=2))
        await until(lambda: worker.queued == 1)
        rejected = await chat(c, STORE, max_tokens=2)
        return [rejected, await running, await queued]

    try:
        rejected, running, queued = call(pool, scenario)
    finally:
        pool.stop()
    assert rejected.status_code == 503 and rejected.json()["error"]["code"] == "queue_full"
    assert rejected.headers["retry-after"] == "1"
    assert running.status_code == 200 and queued.status_code == 200


def test_timeout_answers_504_and_ends_the_row_early(guards, slow_steps) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(guards, request_timeout_s=0.6, batch_wait_ms=0)
    pool.start()

    async def scenario(c: httpx.AsyncClient) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        response = await chat(c, KILL, max_tokens=60)
        return response, time.perf_counter() - started

    try:
        response, seconds = call(pool, scenario)
        deadline = time.monotonic() + 5
        while pool.workers[0].stats.running and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = pool.workers[0].stats
    finally:
        pool.stop()
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert response.json()["error"]["type"] == "timeout_error"
    assert seconds < 3
    # 60 tokens at >= 0.05 s per step would take > 3 s; the row was ended soon after the timeout.
    assert stats.running == 0 and stats.cancelled == 1 and stats.tokens_generated < 40


def test_lifespan_starts_and_stops_the_workers(guards) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(guards)
    with TestClient(create_app(pool)) as client:
        assert client.get("/healthz").json()["workers"][0]["alive"] is True
        assert client.post("/v1/chat/completions", json={**GOOD, "max_tokens": 2}).status_code == 200
    assert pool.health()["workers"][0]["alive"] is False
    assert pool.health()["status"] == "degraded"
    response = call(pool, lambda c: c.get("/healthz"))
    assert response.status_code == 503 and response.json()["status"] == "degraded"


def test_two_policies_with_one_name_are_refused_before_any_model_loads(tmp_path: Path) -> None:
    from guardrail.errors import PolicyError

    missing = str(tmp_path / "no-such-model")  # loading it would raise ModelNotFoundError
    paths = []
    for file in ("a.yaml", "b.yaml"):
        paths.append(tmp_path / file)
        paths[-1].write_text(json.dumps({"name": "same", "model": {"source": missing}}))
    with pytest.raises(PolicyError, match=r"name: 'same' is also the name of .*a\.yaml"):
        PolicyPool.load(paths, CONFIG)


# --- readiness, drain, telemetry of skipped layers, metrics ------------------------------------------
def test_readyz_says_why_not_ready_and_drain_answers_queued_requests_503(guards, slow_steps) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(guards, max_queue=1, batch_wait_ms=0, max_batch_size=1)
    pool.start()
    worker = pool.workers[0]

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(200):
            if condition():
                return
            await asyncio.sleep(0.025)
        raise AssertionError("the worker never got there")

    async def scenario(c: httpx.AsyncClient) -> list[Any]:
        ready = await c.get("/readyz")
        running = asyncio.create_task(chat(c, KILL, max_tokens=8))
        await until(lambda: worker.stats.running == 1)
        queued = asyncio.create_task(chat(c, COKE, max_tokens=2, stream=True))
        await until(lambda: worker.queued == 1)
        full = await c.get("/readyz")
        assert pool.drain() == {"queued_answered_503": 1, "running": 1}
        refused = await chat(c, STORE, max_tokens=2)
        draining = await c.get("/readyz")
        return [ready, full, draining, refused, await queued, await running]

    try:
        ready, full, draining, refused, queued, running = call(pool, scenario)
    finally:
        pool.stop()
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert full.status_code == 503 and full.json()["reasons"] == ["model tiny-model: queue full (1/1)"]
    assert draining.status_code == 503 and "shutting down" in draining.json()["reasons"][0]
    # A queued stream is refused with a real 503, not a 200 whose first event is an error.
    for response in (refused, queued):
        assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert running.status_code == 200 and running.json()["choices"][0]["message"]["content"]


def test_nonfinite_skips_and_disabled_layers_show_in_telemetry_and_metrics(tiny_loaded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    hidden = tiny_loaded.model.config.hidden_size
    models = {layer: MLPEnergyModel(hidden, MLPEnergyParams(hidden=[16], dropout=0.0)).eval()
              for layer in (1, 2, 3)}
    with torch.no_grad():
        models[3].net[0].weight.fill_(float("nan"))  # disabled at load
        models[1].input_std.fill_(1e-45)  # finite, but every energy at layer 1 overflows
    path = EnergyArtifact(plugin="mlp", fingerprint=model_fingerprint(tiny_loaded.model,
                                                                      tiny_loaded.name),
                          models=models).save(tmp_path / "mixed.safetensors")
    guard = Guardrail.from_policy(parse_policy({
        "name": "mixed", "model": {"source": "unused"}, "generation": {"max_new_tokens": 3},
        "rails": [{"name": "eds", "energy_model": {"plugin": "mlp", "artifact": str(path)}}]}),
        loaded=tiny_loaded)
    pool = make_pool((guard,))
    pool.start()

    async def scenario(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [await chat(c, KILL, model="mixed"), await c.get("/v1/models/mixed"),
                await c.get("/metrics")]

    try:
        answer, card, metrics = call(pool, scenario)
    finally:
        pool.stop()
    ext = answer.json()["guardrail"]
    assert ext["layers_skipped"] == [1] and ext["layers_steered"] == [2]
    assert ext["layers_disabled"] == [3]
    assert [(e["layer"], e["nonfinite_positions"] > 0) for e in ext["energies"]] == [
        (1, True), (2, False)]
    assert card.json()["guardrail"]["rails"] == [{
        "name": "eds", "layers": [1, 2],
        "disabled_layers": {"3": "non-finite weights in net.0.weight"}}]
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'guardrail_nonfinite_skips_total{layer="1",policy="mixed",rail="eds"}' in text
    assert 'guardrail_steered_layers_total{layer="2",policy="mixed",rail="eds"} 1.0' in text
    assert 'guardrail_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0' \
        in text
    assert 'guardrail_queue_depth{model="tiny-model"} 0.0' in text


def test_the_console_log_escapes_what_a_client_sends(pool: PolicyPool,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from guardrail.console import configure_logging

    configure_logging(json=False)
    capsys.readouterr()
    # An OSC title change, a clear-screen CSI, a C1 CSI and a bidi override in the path.
    response = call(pool, lambda c: c.get("/v1/models/%1b%5d0%3bpwned%07%1b%5b2J%c2%9b%e2%80%ae"))
    assert response.status_code == 404
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "serve.request" in line)
    assert not any(c in err for c in "\x1b\x07\u009b\u202e"), err
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x9b\\u202e" in line
