"""The demo's showcase prompts are not in, nor close to, any prompt the shipped policies train,
calibrate or fit their gates on: what the demo shows is what a user would see."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guardrail.cli.demo_cmd import BENIGN_BUT_SCARY, HARMFUL
from guardrail.policy.model import load_policy
from guardrail.prompts import resolve_data_dir
from guardrail.training.sources import load_prompt_sets

ROOT = Path(__file__).resolve().parents[1]
# Word-set overlap (Jaccard) at which two prompts count as the same request reworded.
NEAR = 0.6


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


@pytest.mark.parametrize("policy", sorted(p.name for p in (ROOT / "policies").glob("eds-*.yaml")))
def test_showcase_prompts_are_far_from_every_training_and_validation_prompt(policy: str) -> None:
    try:
        resolve_data_dir(None)
    except Exception:
        pytest.skip("the prompt sets (../shared/data) are not here")
    loaded = load_policy(ROOT / "policies" / policy)
    assert loaded.training is not None
    sets = load_prompt_sets(loaded.training)
    prompts = [p.text for p in (*sets.train, *sets.val, *sets.gate)]
    assert len(prompts) > 100
    for showcase in (*BENIGN_BUT_SCARY, *HARMFUL):
        words = _words(showcase)
        closest = max(prompts, key=lambda t: len(words & _words(t)) / len(words | _words(t)))
        overlap = len(words & _words(closest)) / len(words | _words(closest))
        assert showcase.lower() not in {p.lower() for p in prompts}
        assert overlap < NEAR, f"{showcase!r} is close to a {policy} prompt: {closest!r}"
