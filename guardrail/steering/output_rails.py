"""Running a policy's output rails over finished answers (:meth:`Guardrail.generate`).

Each rail (:class:`~guardrail.plugin.components.OutputRail`) sees every answer with the policy's
refusal verdict on it and the side the gates chose for its prompt, and names the rows to
answer again and the side to steer each towards; those rows are generated again, steered
there, and judged again for the next rail. What each rail did is kept in the answer's
telemetry (``output_rails``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from guardrail.errors import PluginError
from guardrail.plugin.components import Answer, OutputRail
from guardrail.steering.gating import side_of
from guardrail.steering.generation import Conversation, GenerationResult, last_user
from guardrail.steering.rails import SHARED
from guardrail.telemetry import GateTelemetry, OutputRailTelemetry

if TYPE_CHECKING:
    import torch

    from guardrail.plugin.components import OutputRail, Verdict
    from guardrail.policy.model import GenerationSection, Policy
    from guardrail.steering.rails import Rail

SIDES = ("answer", "refuse")


class Reviewing(Protocol):
    """What output rails need of the guardrail whose answers they review."""

    policy: Policy
    rails: list[Rail]
    output_rails: list[OutputRail]

    def classify(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]: ...

    def answer(self, conversations: Sequence[Conversation], *, steer: bool,
               settings: GenerationSection, gates: bool | str = True,
               strength: float | None = None) -> list[GenerationResult]: ...

    def gate_scores(self, conversations: Sequence[Conversation], *,
                    batch_size: int | None = None) -> dict[str, torch.Tensor]: ...


def review_answers(guard: Reviewing, conversations: Sequence[Conversation],
                   results: list[GenerationResult], *, settings: GenerationSection,
                   strength: float | None, first_steered: bool) -> list[GenerationResult]:
    """``results`` after every output rail of ``guard``'s policy has reviewed them."""
    prompts = [last_user(c) for c in conversations]
    sides = _sides(guard, conversations, results, settings, first_steered)
    verdicts = guard.classify(prompts, [r.text for r in results])
    results = list(results)
    for spec, rail in zip(guard.policy.output_rails, guard.output_rails, strict=True):
        answers = [Answer(prompt=p, text=r.text, verdict=v, side=s, steered=r.telemetry.steered)
                   for p, r, v, s in zip(prompts, results, verdicts, sides, strict=True)]
        decisions = _review(rail, spec.plugin, answers)
        for row, side in enumerate(decisions):
            if side is None:
                results[row].telemetry.output_rails.append(
                    OutputRailTelemetry(rail=spec.plugin, action="kept"))
        for side in SIDES:
            rows = [row for row, chosen in enumerate(decisions) if chosen == side]
            if not rows:
                continue
            again = guard.answer([conversations[row] for row in rows], steer=True,
                                 settings=settings, gates=side, strength=strength)
            new_verdicts = guard.classify([prompts[row] for row in rows], [r.text for r in again])
            for row, result, verdict in zip(rows, again, new_verdicts, strict=True):
                first = results[row]
                # Every gated rail steered this row towards ``side``, whatever its gate said.
                result.telemetry.gates = [dataclasses.replace(g, steered=True, side=side)
                                          for g in first.telemetry.gates]
                result.telemetry.output_rails = [*first.telemetry.output_rails, OutputRailTelemetry(
                    rail=spec.plugin, action="answered again", side=side,
                    first={"text": first.text, "steered": first.telemetry.steered,
                           "refused": verdicts[row].refused, "reason": verdicts[row].reason})]
                results[row], verdicts[row] = result, verdict
    return results


def _review(rail: OutputRail, plugin: str, answers: list[Answer]) -> list[str | None]:
    try:
        decisions = list(rail.review(answers))
    except Exception as exc:
        raise PluginError(f"output rail {plugin!r} raised in review: "
                          f"{type(exc).__name__}: {exc}") from exc
    bad = [d for d in decisions if d is not None and d not in SIDES]
    if len(decisions) != len(answers) or bad:
        raise PluginError(f"output rail {plugin!r} returned {decisions!r:.200}; expected one "
                          f"of {list(SIDES)} or None per answer ({len(answers)})")
    return decisions


def _sides(guard: Reviewing, conversations: Sequence[Conversation],
           results: list[GenerationResult], settings: GenerationSection, first_steered: bool
           ) -> list[str | None]:
    """Per row, the side the gates chose: ``shared`` when no rail is gated; otherwise the
    side of the first gated rail that chose one (None: every gate left the row alone).

    After an unsteered first pass the gates have not run yet: they score the prompts now,
    and their decisions go into the answers' telemetry as a steered pass would have put them.
    """
    gated = [rail for rail in guard.rails if rail.gate is not None]
    if not gated:
        return [SHARED] * len(results)
    if not first_steered:
        scores = guard.gate_scores(conversations, batch_size=settings.batch_size)
        for rail in gated:
            chosen = side_of(scores[rail.name], rail.below, rail.above)
            for result, score, side in zip(results, scores[rail.name].tolist(), chosen,
                                           strict=True):
                result.telemetry.gates.append(GateTelemetry(
                    rail=rail.name, score=round(float(score), 4), steered=False,
                    below=rail.below, above=rail.above, side=side))
    return [next((g.side for g in r.telemetry.gates if g.side is not None), None)
            for r in results]
