"""``guardrail serve --replicas 2`` on Ray Serve: the OpenAI client gets answers from both
replicas, each with the policy and telemetry a single server gives."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from .live_server import start_server
from .ray_cluster import needs_ray, needs_smollm2

pytestmark = [needs_ray, *needs_smollm2]

POLICY = "eds-smollm2-135m"


def test_two_replicas_answer_the_openai_client(tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    server = start_server([Path(POLICY)], tmp_path / "serve.log", "--replicas", "2",
                          "--max-tokens-limit", "16", timeout=240)
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                               timeout=120)

        def ask(i: int) -> tuple[str, object]:
            raw = client.chat.completions.with_raw_response.create(
                model=POLICY, max_tokens=4,
                messages=[{"role": "user", "content": f"Name a colour. ({i})"}])
            return raw.headers["x-guardrail-replica"], raw.parse()

        seen: dict[str, int] = {}
        answers = []
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for _ in range(4):  # rounds of 4 concurrent requests, until both replicas answered
                for replica, completion in pool.map(ask, range(4)):
                    seen[replica] = seen.get(replica, 0) + 1
                    answers.append(completion)
                if len(seen) == 2:
                    break
        assert len(seen) == 2, seen
        pids = {replica.rsplit("/", 1)[1] for replica in seen}
        assert len(pids) == 2  # two processes, each with its own model
        for completion in answers:
            assert completion.model == POLICY
            assert completion.choices[0].message.content
            extension = completion.model_extra["guardrail"]
            assert extension["policy"] == POLICY and "steered" in extension
        models = client.models.list()
        assert [m.id for m in models.data] == [POLICY]
    finally:
        code = server.stop(timeout=120)
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    events = [e.get("event") for e in server.log_events()]
    assert "serve.stopped" in events
