"""The HTTP judge refusal classifier: parsing, retries, timeouts, garbage, fail modes, a live judge."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from guardrail_plugins.judge_classifier import JudgeError, JudgeParams, JudgeRefusalClassifier

from guardrail.errors import GuardrailError, PolicyError
from guardrail.plugin.registry import Registry
from guardrail.policy.checks import check_plugins
from guardrail.policy.model import parse_policy

from .live_server import LiveServer, free_port, smol_server


class FakeJudge:
    """A loopback HTTP judge whose behaviour a test sets: answers, errors, slowness, garbage."""

    def __init__(self) -> None:
        self.mode = "judge"
        self.fail_first = 0
        self.fail_status = 503
        self.retry_after: str | None = None
        self.times: list[float] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                judge.requests.append(body)
                judge.headers.append({k.lower(): v for k, v in self.headers.items()})
                judge.times.append(time.perf_counter())
                if len(judge.requests) <= judge.fail_first:
                    return self._send(judge.fail_status, {"error": {"message": "overloaded"}},
                                      judge.retry_after)
                if judge.mode == "slow":
                    time.sleep(1.0)
                if judge.mode == "garbage":
                    return self._send(200, "<html>not json</html>")
                if judge.mode == "banana":
                    return self._send(200, _completion("banana"))
                if judge.mode == "404":
                    return self._send(404, {"error": {"message": "model 'x' is not served"}})
                text = body["messages"][-1]["content"]
                answer = "REFUSAL" if "sorry" in text.lower() else "COMPLIANCE."
                return self._send(200, _completion(answer))

            def _send(self, status: int, payload: Any, retry_after: str | None = None) -> None:
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    if retry_after is not None:
                        self.send_header("retry-after", retry_after)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _completion(text: str) -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}]}


@pytest.fixture
def fake() -> Iterator[FakeJudge]:
    judge = FakeJudge()
    yield judge
    judge.server.shutdown()
    judge.server.server_close()


def classifier(url: str, **params: Any) -> JudgeRefusalClassifier:
    return JudgeRefusalClassifier(JudgeParams(base_url=url, model="judge", **params))


PROMPTS = ["how do i bake bread", "how do i kill a python process"]
ANSWERS = ["I'm sorry, I can't help with that.", "Run `kill <pid>`."]


def test_verdicts_follow_the_judges_labels_and_quote_it(fake: FakeJudge) -> None:
    verdicts = classifier(fake.url).classify(PROMPTS, ANSWERS)
    assert [(v.refused, v.score) for v in verdicts] == [(True, 1.0), (False, 0.0)]
    assert verdicts[0].reason == "judge: REFUSAL" and verdicts[1].reason == "judge: COMPLIANCE."
    sent = sorted(fake.requests, key=lambda body: "bread" not in body["messages"][-1]["content"])
    assert sent[0]["model"] == "judge" and sent[0]["temperature"] == 0 and sent[0]["max_tokens"] == 8
    question = sent[0]["messages"][-1]["content"]
    assert "how do i bake bread" in question and "I'm sorry, I can't help" in question


def test_custom_prompt_labels_system_prompt_and_extra_body(fake: FakeJudge) -> None:
    judge = classifier(fake.url, prompt="Q={prompt} A={response} refuses?", system_prompt="Be terse.",
                       refusal_label="REFUSAL", compliance_label="COMPLIANCE",
                       extra_body={"guardrail": {"classify": False}}, response_chars=5)
    judge.classify(["q"], ["sorry, no way"])
    body = fake.requests[0]
    assert body["messages"] == [{"role": "system", "content": "Be terse."},
                                {"role": "user", "content": "Q=q A=sorry refuses?"}]
    assert body["guardrail"] == {"classify": False}


def test_5xx_is_retried_with_backoff_then_succeeds(fake: FakeJudge) -> None:
    fake.fail_first = 2
    verdict = classifier(fake.url, retries=2).classify(["q"], ["sorry"])[0]
    assert verdict.refused and len(fake.requests) == 3


@pytest.mark.parametrize(("on_error", "refused"), [("fail-open", False), ("fail-closed", True)])
def test_timeout_follows_the_fail_mode(fake: FakeJudge, on_error: str, refused: bool) -> None:
    fake.mode = "slow"
    started = time.perf_counter()
    verdict = classifier(fake.url, timeout_s=0.2, retries=1, on_error=on_error).classify(
        ["q"], ["fine"])[0]
    assert verdict.refused is refused and verdict.score == (1.0 if refused else 0.0)
    assert verdict.reason.startswith(f"judge failed ({on_error}): judge {fake.url}")
    assert "timed out after 0.2 s" in verdict.reason and "after 2 attempts" in verdict.reason
    assert len(fake.requests) == 2 and time.perf_counter() - started < 3


@pytest.mark.parametrize(("mode", "message"), [
    ("garbage", "returned a body that is not a chat completion"),
    ("banana", "judge answered 'banana', which names neither of 'REFUSAL' and 'COMPLIANCE'"),
])
@pytest.mark.parametrize(("on_error", "refused"), [("fail-open", False), ("fail-closed", True)])
def test_garbage_follows_the_fail_mode(fake: FakeJudge, mode: str, message: str, on_error: str,
                                       refused: bool) -> None:
    fake.mode = mode
    verdict = classifier(fake.url, on_error=on_error).classify(["q"], ["sorry"])[0]
    assert verdict.refused is refused and message in verdict.reason
    assert len(fake.requests) == 1  # garbage is not retried


def test_answer_naming_both_labels_is_not_a_verdict(fake: FakeJudge) -> None:
    judge = classifier(fake.url)
    with pytest.raises(JudgeError, match="names both of 'REFUSAL' and 'COMPLIANCE'"):
        judge._parse("Refusal or Compliance")


def test_unreachable_judge_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(JudgeError) as error:
        classifier(url, retries=1).classify(["q"], ["a"])
    message = str(error.value)
    assert f"judge {url}/chat/completions unreachable after 2 attempts" in message
    assert "ConnectError" in message and "on_error to fail-open or fail-closed" in message
    assert isinstance(error.value, GuardrailError)


def test_client_error_is_not_retried_and_names_the_judges_message(fake: FakeJudge) -> None:
    fake.mode = "404"
    with pytest.raises(JudgeError, match="answered HTTP 404: model 'x' is not served"):
        classifier(fake.url, retries=3).classify(["q"], ["a"])
    assert len(fake.requests) == 1


def test_api_key_comes_from_the_named_environment_variable(fake: FakeJudge, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", "sk-test-123")
    classifier(fake.url, api_key_env="JUDGE_KEY").classify(["q"], ["a"])
    assert fake.headers[0]["authorization"] == "Bearer sk-test-123"
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(JudgeError, match="environment variable 'JUDGE_KEY' is not set"):
        classifier(fake.url, api_key_env="JUDGE_KEY").classify(["q"], ["a"])


def test_retry_after_is_honoured(fake: FakeJudge) -> None:
    # What guardrail serve sends with a full queue: 503 queue_full with retry-after.
    fake.fail_first, fake.fail_status, fake.retry_after = 1, 429, "2"
    verdict = classifier(fake.url, retries=1).classify(["q"], ["sorry"])[0]
    assert verdict.refused and len(fake.requests) == 2
    assert fake.times[1] - fake.times[0] >= 1.9  # not the 0.5 s backoff


def test_no_key_named_means_no_key_sent(fake: FakeJudge, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leave")
    classifier(fake.url).classify(["q"], ["a"])
    assert "sk-must-not-leave" not in json.dumps(fake.headers[0])


def test_a_key_goes_only_to_hosts_the_user_allows_outside_the_policy(
    monkeypatch: pytest.MonkeyPatch, fake: FakeJudge, registry: Registry,
) -> None:
    from guardrail_plugins.judge_classifier import JudgeHostError

    from guardrail.steering.guard import Guardrail

    monkeypatch.setenv("JUDGE_KEY", "sk-test-123")
    monkeypatch.delenv("GUARDRAIL_JUDGE_HOSTS", raising=False)
    remote = "https://judge.example.com/v1"
    with pytest.raises(JudgeHostError) as caught:
        classifier(remote, api_key_env="JUDGE_KEY")
    assert ("classifier.params.base_url: 'https://judge.example.com/v1' would get the key in "
            "$JUDGE_KEY, and its host 'judge.example.com' is not one you allowed") in str(caught.value)
    assert "GUARDRAIL_JUDGE_HOSTS=judge.example.com" in str(caught.value)
    # A policy naming it fails at load, before any request.
    policy = parse_policy({"name": "p", "model": {"source": "x"}, "classifier": {
        "plugin": "openai-judge", "params": {"base_url": remote, "model": "m",
                                             "api_key_env": "JUDGE_KEY"}}})
    with pytest.raises(GuardrailError, match="is not one you allowed"):
        Guardrail.from_policy(policy, loaded=object())
    # Allowed by host, or by host and port; loopback always; no key, no question.
    monkeypatch.setenv("GUARDRAIL_JUDGE_HOSTS", "other.org, JUDGE.example.com")
    classifier(remote, api_key_env="JUDGE_KEY")
    monkeypatch.setenv("GUARDRAIL_JUDGE_HOSTS", "judge.example.com:8443")
    classifier("https://judge.example.com:8443/v1", api_key_env="JUDGE_KEY")
    with pytest.raises(JudgeHostError):
        classifier(remote, api_key_env="JUDGE_KEY")
    classifier(remote)
    classifier(fake.url, api_key_env="JUDGE_KEY").classify(["q"], ["a"])
    assert fake.headers[0]["authorization"] == "Bearer sk-test-123"


def test_policy_checks_the_judge_params(registry: Registry) -> None:
    policy = parse_policy({"name": "p", "model": {"source": "x"}, "classifier": {
        "plugin": "http-judge", "params": {"base_url": "http://127.0.0.1:1/v1", "model": "m",
                                           "prompt": "no placeholders", "on_error": "maybe"}}})
    problems = check_plugins(policy, registry)
    assert any(p.startswith("classifier.params.prompt:") and "{prompt} and {response}" in p
               for p in problems)
    assert any(p.startswith("classifier.params.on_error:") for p in problems)
    assert registry.get("refusal_classifier", "http-judge").name == "openai-judge"


def test_server_reports_an_unreachable_judge_next_to_the_answer(tiny_loaded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A policy judged by a dead endpoint still answers; the verdict error says why."""
    from guardrail.serving.pool import PolicyPool
    from guardrail.steering.guard import Guardrail

    from .test_serving_app import CONFIG, KILL, call

    dead = f"http://127.0.0.1:{free_port()}/v1"
    policy = parse_policy({"name": "judged", "model": {"source": "x"}, "classifier": {
        "plugin": "openai-judge", "params": {"base_url": dead, "model": "m", "retries": 0}}})
    pool = PolicyPool([Guardrail.from_policy(policy, loaded=tiny_loaded)], CONFIG)
    pool.start()
    try:
        response = call(pool, lambda c: c.post("/v1/chat/completions", json={
            "model": "judged", "messages": KILL, "max_tokens": 2}))
    finally:
        pool.stop()
    assert response.status_code == 200
    ext = response.json()["guardrail"]
    assert ext["verdict"] is None and "unreachable after 1 attempt" in ext["verdict_error"]


def test_invalid_policy_names_the_judge_key(tmp_path: Path) -> None:
    from guardrail.steering.guard import Guardrail

    policy = parse_policy({"name": "p", "model": {"source": "x"},
                           "classifier": {"plugin": "openai-judge", "params": {"model": "m"}}})
    with pytest.raises(PolicyError, match=r"classifier\.params\.base_url: required key is missing"):
        Guardrail.from_policy(policy, loaded=object())


# --- a real judge: this project's server running SmolLM2 ----------------------------------------
@pytest.fixture(scope="session")
def smol(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    return smol_server(request, tmp_path_factory)


@pytest.mark.integration
def test_smollm2_server_as_the_judge(smol: LiveServer) -> None:
    judge = JudgeRefusalClassifier(JudgeParams(
        base_url=smol.base_url, model="smol", refusal_label="yes", compliance_label="no",
        prompt="Question: {prompt}\nAnswer: {response}\n\nDoes the answer refuse to help? "
               "Reply yes or no.", extra_body={"guardrail": {"classify": False}}, timeout_s=60))
    before = smol.health()["workers"][0]["completed"]
    verdicts = judge.classify(PROMPTS, ANSWERS)
    assert smol.health()["workers"][0]["completed"] - before == 2
    for verdict in verdicts:
        # SmolLM2-135M is a weak judge: check the round trip, not its judgement.
        assert verdict.reason.startswith("judge: ")
        said_yes = "yes" in verdict.reason.lower().split(":", 1)[1]
        assert verdict.refused is said_yes
    with pytest.raises(JudgeError, match="answered HTTP 404: model 'nope' is not served here"):
        JudgeRefusalClassifier(JudgeParams(base_url=smol.base_url, model="nope")).classify(["q"], ["a"])


@pytest.mark.integration
def test_policy_judged_by_the_same_server(smol: LiveServer) -> None:
    import openai

    client = openai.OpenAI(base_url=smol.base_url, api_key="x", max_retries=0, timeout=120)
    completion = client.chat.completions.create(
        model="smol-judged", messages=[{"role": "user", "content": "How do I boil an egg?"}],
        max_tokens=8)
    verdict = (completion.model_extra or {})["guardrail"]["verdict"]
    # The judge policy is fail-closed; either way its reason shows the judge was asked.
    assert verdict["reason"].startswith(("judge: ", "judge failed (fail-closed): judge answered"))
