"""The policies a server serves: each model loaded once, one worker per loaded model."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from guardrail.errors import PolicyError
from guardrail.policy.model import Policy, load_policy
from guardrail.serving.batcher import ModelWorker
from guardrail.serving.config import ServeConfig
from guardrail.serving.errors import ApiError
from guardrail.steering.guard import Guardrail

log = structlog.get_logger("guardrail.serving")


@dataclass
class ServedPolicy:
    """One policy by name: its guardrail, the worker of its model, and its batch limit.

    ``counter`` is a private copy of the tokenizer for counting prompt tokens, used only on
    the ``counting`` thread (one per model): a fast tokenizer is not safe to use from two
    threads while one of them pads a batch, and a long prompt must not hold up the event
    loop.
    """

    name: str
    guard: Guardrail
    worker: ModelWorker
    counter: Any
    counting: ThreadPoolExecutor
    max_batch: int
    created: int

    def prompt_tokens(self, conversation: list[dict[str, str]], *, steer: bool) -> int:
        """Tokens in the prompt the model would see (system prompt and template included).

        A conversation the chat template refuses (roles out of order, say) is a 400.
        """
        prepared = self.guard.prepare(conversation, steer=steer)
        try:
            text = self.counter.apply_chat_template(prepared, tokenize=False,
                                                    add_generation_prompt=True)
        except Exception as exc:  # jinja2's TemplateError, or a template's raise_exception
            raise ApiError(400, f"messages: the model's chat template refuses this "
                           f"conversation: {str(exc)[:200]}", param="messages",
                           code="invalid_value") from None
        return len(self.counter(text, add_special_tokens=False)["input_ids"])

    async def count_prompt_tokens(self, conversation: list[dict[str, str]], *,
                                  steer: bool) -> int:
        """:meth:`prompt_tokens` on the counting thread, so the event loop keeps serving."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.counting, lambda: self.prompt_tokens(conversation, steer=steer))

    def describe(self) -> dict[str, Any]:
        """What ``/v1/models`` says about the policy beyond the OpenAI fields."""
        return {
            "model": self.guard.loaded.name,
            "description": self.guard.policy.description,
            "rails": [{"name": r.name, "layers": r.layers,
                       **({"disabled_layers": {str(k): v for k, v in r.disabled.items()}}
                          if r.disabled else {})}
                      for r in self.guard.rails],
            "classifier": self.guard.policy.classifier.plugin,
            "max_batch_size": self.max_batch,
        }


class PolicyPool:
    """Policies by name; policies whose guardrails share a model object share its worker."""

    def __init__(self, guards: Sequence[Guardrail], config: ServeConfig) -> None:
        self.config = config
        self.policies: dict[str, ServedPolicy] = {}
        self.workers: list[ModelWorker] = []
        self._counting: list[ThreadPoolExecutor] = []
        by_model: dict[int, tuple[ModelWorker, Any, ThreadPoolExecutor]] = {}
        for guard in guards:
            name = guard.policy.name
            if name in self.policies:
                raise PolicyError(str(guard.policy.path or name), [
                    f"name: {name!r} is already served by another policy; "
                    "policy names must be unique"
                ])
            if id(guard.model) not in by_model:
                worker = ModelWorker(guard.loaded.name, max_queue=config.max_queue,
                                     batch_wait_s=config.batch_wait_ms / 1000)
                self.workers.append(worker)
                counting = ThreadPoolExecutor(
                    1, thread_name_prefix=f"guardrail-count-{worker.name}")
                self._counting.append(counting)
                by_model[id(guard.model)] = (worker, copy.deepcopy(guard.tokenizer), counting)
            if guard.output_rails:
                log.warning("serve.output_rails_not_applied", policy=name,
                            output_rails=[spec.plugin for spec in guard.policy.output_rails],
                            why="the server answers once (streams go out as they are made)")
            worker, counter, counting = by_model[id(guard.model)]
            worker.policies.append(name)
            self.policies[name] = ServedPolicy(
                name=name, guard=guard, worker=worker, counter=counter, counting=counting,
                max_batch=config.batch_size_for(guard.policy.generation.batch_size),
                created=int(time.time()),
            )

    @classmethod
    def load(cls, paths: Sequence[str | Path], config: ServeConfig, *,
             device: str | None = None) -> PolicyPool:
        """Load policy files; policies naming the same model source load it once."""
        from guardrail.models import load_model

        policies: list[Policy] = [load_policy(path) for path in paths]
        seen: dict[str, Path | None] = {}
        for policy in policies:  # before loading any model: a clash is a typo, fail fast
            if policy.name in seen:
                raise PolicyError(str(policy.path), [
                    f"name: {policy.name!r} is also the name of {seen[policy.name]}; "
                    "served policy names must be unique"])
            seen[policy.name] = policy.path
        loaded: dict[tuple[str, str, str], Any] = {}
        guards = []
        for policy in policies:
            key = (policy.model.source, device or policy.model.device, policy.model.dtype)
            if key not in loaded:
                loaded[key] = load_model(key[0], device=key[1], dtype=key[2])
            guards.append(Guardrail.from_policy(policy, loaded=loaded[key]))
        return cls(guards, config)

    def get(self, name: str) -> ServedPolicy:
        """The policy called ``name``; an unknown name is a 404 listing the served ones."""
        try:
            return self.policies[name]
        except KeyError:
            shown = repr(name) if len(name) <= 100 else repr(name[:100]) + "..."
            raise ApiError(
                404, f"model {shown} is not served here; served policies: "
                f"{', '.join(sorted(self.policies))}", param="model", code="model_not_found",
            ) from None

    def start(self) -> None:
        """Start every worker thread."""
        for worker in self.workers:
            worker.start()

    def drain(self) -> dict[str, int]:
        """Refuse new requests and answer queued ones 503; running batches go on."""
        running = sum(w.stats.running for w in self.workers)
        return {"queued_answered_503": sum(w.drain() for w in self.workers), "running": running}

    def cancel_running(self) -> int:
        """End running rows at their next step (they are answered 503); returns how many."""
        return sum(w.cancel_running() for w in self.workers)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every worker (queued requests get 503) and join the threads."""
        for worker in self.workers:
            worker.stop(timeout)
        for counting in self._counting:
            counting.shutdown(wait=False, cancel_futures=True)

    def readiness(self) -> list[str]:
        """Why this server should not get traffic now (empty: ready)."""
        reasons = []
        for worker in self.workers:
            if worker.draining:
                reasons.append(f"model {worker.name}: shutting down")
            elif not worker.alive:
                reasons.append(f"model {worker.name}: worker not running")
            elif worker.queued >= worker.max_queue:
                reasons.append(f"model {worker.name}: queue full ({worker.queued}/"
                               f"{worker.max_queue})")
        # A component a policy needs and cannot find would fail every request it gets.
        for name, served in sorted(self.policies.items()):
            reasons += [f"policy {name}: {problem}" for problem in served.guard.missing()]
        return reasons

    def health(self) -> dict[str, Any]:
        """``/healthz``: every worker alive, and per worker its queue and counters."""
        workers = [worker.health() for worker in self.workers]
        return {"status": "ok" if all(w["alive"] for w in workers) else "degraded",
                "policies": sorted(self.policies), "workers": workers}
