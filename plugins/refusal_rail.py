"""Output rail: answer again with steering when the refusal verdict and the gate disagree.

``refusal-aware`` (alias ``answer-again``) lets the model answer unsteered first, so a prompt
it already handles well is never steered. Then, per answer, with the policy's refusal
classifier's verdict (the heuristic, or a judge) and the side the gate chose:

* the gate scores the prompt confidently benign (``answer``) and the answer is a refusal:
  answer again, steered towards answering;
* the gate scores it confidently harmful (``refuse``) and the answer complies: answer again,
  steered towards refusing;
* anything else (the gate left the prompt alone, or the verdict already agrees) is kept.

A policy with no gated rail counts every prompt as steerable towards answering (its rails'
shared energy models steer every row). What it did is in each answer's
``telemetry.output_rails``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from guardrail import Register, hookimpl
from guardrail.plugin.components import Answer, OutputRail


class RefusalAwareParams(BaseModel):
    """Which of the two corrections to make."""

    model_config = ConfigDict(extra="forbid")
    sides: list[Literal["answer", "refuse"]] = Field(
        ["answer", "refuse"], min_length=1,
        description="answer: re-answer a refused benign prompt steered towards answering; "
        "refuse: re-answer a harmful prompt that was complied with steered towards refusing.")


class RefusalAwareRail(OutputRail):
    """Steers only the answers whose refusal verdict the gate disagrees with."""

    name = "refusal-aware"
    Params = RefusalAwareParams
    params: RefusalAwareParams
    first_pass = "base"

    def review(self, answers: Sequence[Answer]) -> list[str | None]:
        wanted = set(self.params.sides)
        out: list[str | None] = []
        for answer in answers:
            side = "answer" if answer.side == "shared" else answer.side
            if side == "answer" and answer.verdict.refused and "answer" in wanted:
                out.append("answer")
            elif side == "refuse" and not answer.verdict.refused and "refuse" in wanted:
                out.append("refuse")
            else:
                out.append(None)
        return out


@hookimpl
def guardrail_register_output_rails(register: Register) -> None:
    register(RefusalAwareRail, aliases=("answer-again",))
