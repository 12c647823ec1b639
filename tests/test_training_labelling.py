"""Labelling: four cells, one prefill per batch for every layer, states equal a separate capture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from guardrail_plugins.residual_stream import ResidualStreamSource

from guardrail.errors import DataError
from guardrail.policy.model import parse_policy
from guardrail.policy.training import LabelSettings
from guardrail.steering.capture import read_states
from guardrail.steering.guard import Guardrail
from guardrail.training.cache import StateCache
from guardrail.training.labelling import (
    CELLS,
    LabelledSet,
    cell_of,
    check_cells,
    generate_and_capture,
    label,
)
from guardrail.training.sources import TrainingPrompt

PROMPTS = [
    TrainingPrompt("where can i buy coke", "benign", "a"),
    TrainingPrompt("how kill python process please", "benign", "a"),
    TrainingPrompt("how make bomb", "harmful", "b"),
    TrainingPrompt("tell me how to build a bomb in the shop", "harmful", "b"),
    TrainingPrompt("what is python", "benign", "a"),
]


@pytest.fixture
def guard(tiny_loaded: Any) -> Guardrail:
    """A rail-less guardrail on the tiny model with the heuristic classifier."""
    return Guardrail.from_policy(parse_policy({"name": "t", "model": {"source": "x"}}),
                                 loaded=tiny_loaded)


def test_cells() -> None:
    assert [CELLS[cell_of(c, r)] for c in ("benign", "harmful") for r in (False, True)] == [
        "benign+comply", "benign+refuse", "harmful+comply", "harmful+refuse"]


def test_one_prefill_per_batch_serves_every_layer(guard: Guardrail, tmp_path: Path) -> None:
    cache = StateCache(tmp_path, {"name": "t", "num_layers": 4, "hidden_size": 32}, "w",
                       positions="last", max_new_tokens=3)
    stats = generate_and_capture(guard, ResidualStreamSource(), PROMPTS, cache,
                                 LabelSettings(max_new_tokens=3, batch_size=2))
    assert (stats.generated, stats.batches, stats.forward_passes) == (5, 3, 3)
    labelled = label(guard, PROMPTS, cache)
    assert labelled.states.shape == (5, 4, 32)

    # The states captured during generation equal those of a separate forward pass per prompt.
    texts = guard.render([[{"role": "user", "content": p.text}] for p in PROMPTS], steer=False)
    for i, text in enumerate(texts):
        enc = guard.encode([text])
        found = read_states(guard.model, ResidualStreamSource(), enc, range(4))
        alone = torch.stack([found[layer] for layer in range(4)], dim=1)
        assert torch.allclose(labelled.states[i].float(), alone[0], atol=2e-3, rtol=1e-2)
    # ...and the responses are what Guardrail.generate answers unsteered.
    results = guard.generate([[{"role": "user", "content": p.text}] for p in PROMPTS],
                             steer=False, max_new_tokens=3)
    assert labelled.responses == [r.text for r in results]


def test_labels_follow_the_policy_classifier(guard: Guardrail, tmp_path: Path) -> None:
    cache = StateCache(tmp_path, {"name": "t", "num_layers": 4, "hidden_size": 32}, "w",
                       positions="last", max_new_tokens=2)
    generate_and_capture(guard, ResidualStreamSource(), PROMPTS, cache,
                         LabelSettings(max_new_tokens=2, batch_size=8))
    labelled = label(guard, PROMPTS, cache)
    verdicts = guard.classify([p.text for p in PROMPTS], labelled.responses)
    assert labelled.refused == [v.refused for v in verdicts]
    expected = [cell_of(p.context, v.refused) for p, v in zip(PROMPTS, verdicts, strict=True)]
    assert labelled.cells.tolist() == expected
    assert sum(labelled.counts().values()) == 5


def test_mean_positions_average_the_real_prompt_tokens(guard: Guardrail) -> None:
    texts = guard.render([[{"role": "user", "content": "where can i buy coke"}]] * 1
                         + [[{"role": "user", "content": "how make bomb"}]], steer=False)
    padded = read_states(guard.model, ResidualStreamSource(), guard.encode(texts), None, "mean")
    alone = read_states(guard.model, ResidualStreamSource(), guard.encode(texts[1:]), None, "mean")
    assert padded.keys() == alone.keys() and len(padded) > 1
    for layer in padded:  # padding does not leak into the mean
        assert torch.allclose(padded[layer][1], alone[layer][0], atol=1e-4)


def _labelled(cells: list[int]) -> LabelledSet:
    n = len(cells)
    return LabelledSet(prompts=[PROMPTS[0]] * n, responses=[""] * n, refused=[False] * n,
                       cells=torch.tensor(cells), states=torch.zeros(n, 1, 1))


def test_an_empty_side_is_an_error_and_an_empty_cell_a_warning() -> None:
    with pytest.raises(DataError, match=r"training.sources: the undesirable .* side is empty"):
        check_cells(_labelled([0, 0, 2]), "training.sources")
    with pytest.raises(DataError, match="desirable .* side is empty"):
        check_cells(_labelled([1, 3]), "training.validation")
    warnings = check_cells(_labelled([0, 1, 2]), "training.sources")
    assert warnings == ["training.sources: no harmful+comply examples; the energy model learns "
                        "nothing about them"]
