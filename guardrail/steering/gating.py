"""Gates: before a batch is generated, which rows each rail may steer.

A rail's gate (:class:`~guardrail.artifact.gate.GateSet`, fitted by ``guardrail train``)
scores each prompt for harm, in standard deviations of its training scores. A row is steered
when its score is below the gate's ``below`` threshold (confidently benign: steer towards
answering, the ``answer`` side) or above ``above`` (confidently harmful: steer towards
refusing, the ``refuse`` side); rows in between are left as the model has them.
``guardrail calibrate`` chooses the thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from guardrail.steering.capture import read_states
from guardrail.telemetry import GateTelemetry

if TYPE_CHECKING:
    from torch import nn

    from guardrail.steering.rails import Rail

#: Per gated rail: the batch's harm scores ``[n]`` and, per side, the rows it steers towards it.
Decisions = dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]


def gate_sides(scores: torch.Tensor, below: float | None, above: float | None
               ) -> dict[str, torch.Tensor]:
    """Rows a gate lets a rail steer, per side: ``answer`` (confidently benign, ``< below``)
    and ``refuse`` (confidently harmful, ``> above``); a side without a threshold steers none.
    """
    never = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return {"answer": scores < below if below is not None else never,
            "refuse": scores > above if above is not None else never}


def steered_rows(scores: torch.Tensor, below: float | None, above: float | None) -> torch.Tensor:
    """Rows a gate lets a rail steer: confidently benign (``< below``) or harmful (``> above``)."""
    sides = gate_sides(scores, below, above)
    return sides["answer"] | sides["refuse"]


def side_of(scores: torch.Tensor, below: float | None, above: float | None) -> list[str | None]:
    """Per row, the side a gate steers it towards (None: left alone)."""
    sides = gate_sides(scores, below, above)
    return ["answer" if a else "refuse" if r else None
            for a, r in zip(sides["answer"].tolist(), sides["refuse"].tolist(), strict=True)]


def decide(rails: Sequence[Rail], model: nn.Module, num_layers: int, prompts: Sequence[str],
           enc: dict[str, torch.Tensor]) -> Decisions:
    """Per gated rail: the batch's harm scores ``[n]`` and, per side, the rows the rail
    steers towards it (``answer``: below the rail's ``below``; ``refuse``: above ``above``).

    ``prompts`` are the user messages (what text gates read), ``enc`` the encoded batch
    (what state gates read: mean-pooled in one forward pass of ``model`` that stops after the
    deepest layer any gate needs). A gate shared by several rails is scored once.
    """
    gated = [rail for rail in rails if rail.gate is not None]
    if not gated:
        return {}
    layers = sorted({layer for rail in gated
                     for layer in rail.gate.state_layers(num_layers)})  # type: ignore[union-attr]
    states = read_states(model, gated[0].source, enc, layers, "mean") if layers else None
    scores: dict[int, torch.Tensor] = {}
    out = {}
    device = enc["input_ids"].device
    for rail in gated:
        assert rail.gate is not None
        if id(rail.gate) not in scores:
            scores[id(rail.gate)] = rail.gate.score(prompts, states, num_layers)
        score = scores[id(rail.gate)]
        sides = gate_sides(score, rail.below, rail.above)
        out[rail.name] = (score, {side: mask.to(device) for side, mask in sides.items()})
    return out


def rows_of(decisions: Decisions) -> dict[str, dict[str, torch.Tensor]]:
    """Per rail and side, the rows its gate lets it steer (what a steering session takes)."""
    return {name: sides for name, (_, sides) in decisions.items()}


def gate_telemetry(rails: Sequence[Rail], decisions: Decisions, row: int) -> list[GateTelemetry]:
    """What each rail's gate decided for ``row``: its score, thresholds and side."""
    by_name = {rail.name: rail for rail in rails}
    out = []
    for name, (score, sides) in decisions.items():
        side = next((s for s, mask in sides.items() if bool(mask[row])), None)
        out.append(GateTelemetry(rail=name, score=round(float(score[row]), 4),
                                 steered=side is not None, below=by_name[name].below,
                                 above=by_name[name].above, side=side))
    return out
