"""The per-shard job of answering (``calibrate``, ``eval``); labelling's is
:class:`guardrail.training.labelling.LabelWork`.

Both keep the batches the single-process loops make: labelling shards are its batches
(prompts sorted longest first), and answering shards are runs of whole generation batches
in :meth:`Guardrail.answer`'s longest-first order, so a sharded run pads every batch as
the single-process run does and gives the same results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from guardrail.distributed.executor import ShardWork, current, shards_of
from guardrail.distributed.replicas import guardrail_for, policy_digest
from guardrail.policy.model import GenerationSection, Policy

#: One answer: text, token ids, finish reason.
AnswerTuple = tuple[str, list[int], str]


@dataclass(frozen=True)
class AnswerWork(ShardWork[list[Any], list[AnswerTuple]]):
    """:meth:`Guardrail.generate` on a shard of conversations, steered or not."""

    policy: Policy
    steer: bool
    gates: bool | str
    settings: dict[str, Any]
    progress: bool = False

    def replica_key(self) -> str:
        """The policy's digest (a calibration grid point is a policy of its own)."""
        return "answer:" + policy_digest(self.policy, None)

    def load(self, device: str | None) -> Any:
        """The policy's guardrail."""
        return guardrail_for(self.policy, device)

    def run(self, replica: Any, shard: list[Any]) -> list[AnswerTuple]:
        """Answer one shard of conversations."""
        results = replica.generate(shard, steer=self.steer, gates=self.gates,
                                   progress=self.progress, **self.settings)
        return [(r.text, list(r.token_ids), r.finish_reason) for r in results]


def answer_on_executor(
    guard: Any,
    conversations: Sequence[Any],
    *,
    steer: bool,
    gates: bool | str,
    settings: GenerationSection,
    progress: bool,
    on_answers: Callable[[list[int], list[AnswerTuple]], None],
) -> None:
    """Answer ``conversations`` with ``guard`` on the current executor.

    ``on_answers(rows, answers)`` gets each shard's answers as it finishes (rows index
    ``conversations``). Locally the whole list is one shard, answered by ``guard`` itself,
    exactly as before executors existed; on Ray each shard is ``settings.batch_size`` rows
    of the longest-first order, answered by a replica built from ``guard.policy``.
    """
    from guardrail.console import progress_bar
    from guardrail.steering.batches import longest_first_order

    executor = current()
    if executor.kind == "local":
        rows = list(range(len(conversations)))
        shards = [rows]
        work = AnswerWork(guard.policy, steer, gates, settings.model_dump(), progress)
        bar = None
    else:
        rows = longest_first_order(guard.tokenizer, guard.render(conversations, steer=steer))
        shards = shards_of(rows, settings.batch_size)
        work = AnswerWork(guard.policy, steer, gates, settings.model_dump())
        bar = progress_bar(len(rows), progress,
                           "generate (steered)" if steer else "generate (base)")

    def done(index: int, answers: list[AnswerTuple]) -> None:
        on_answers(shards[index], answers)
        if bar is not None:
            bar.update(len(answers))

    try:
        executor.map(work, [[conversations[i] for i in shard] for shard in shards], done,
                     replica=guard)
    finally:
        if bar is not None:
            bar.close()
