"""The training section: schema, sources, validation split, demo subsets, conflicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardrail.errors import DataError, PolicyError
from guardrail.policy.model import load_policy, parse_policy
from guardrail.policy.training import TrainingSection
from guardrail.training.sources import load_prompt_sets

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, prompts: list[str]) -> str:
    path.write_text(json.dumps([{"instruction": p, "category": None} for p in prompts]))
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    return {
        "benign": write(tmp_path / "benign.json", [f"benign {i}" for i in range(40)]),
        "harmful": write(tmp_path / "harmful.json", [f"harmful {i}" for i in range(20)]),
        "val": write(tmp_path / "val.json", ["benign 0", "val b"]),
        "val_h": write(tmp_path / "val_h.json", ["val h"]),
    }


def section(**data: object) -> TrainingSection:
    return TrainingSection.model_validate(data)


def test_held_out_split_per_source_is_disjoint_and_seeded(files: dict[str, str]) -> None:
    spec = section(sources=[{"path": files["benign"], "context": "benign"},
                            {"path": files["harmful"], "context": "harmful", "sample": 10}],
                   trainer={"val_fraction": 0.2})
    sets = load_prompt_sets(spec)
    assert sets.summary() == {"train": {"benign.json": 32, "harmful.json": 8},
                              "val": {"benign.json": 8, "harmful.json": 2}}
    assert not {p.text for p in sets.train} & {p.text for p in sets.val}
    assert [p.text for p in load_prompt_sets(spec).val] == [p.text for p in sets.val]


def test_validation_sources_drop_prompts_seen_in_training(files: dict[str, str]) -> None:
    spec = section(sources=[{"path": files["benign"], "context": "benign"},
                            {"path": files["harmful"], "context": "harmful"}],
                   validation=[{"path": files["val"], "context": "benign", "name": "my-val"},
                               {"path": files["val_h"], "context": "harmful"}])
    sets = load_prompt_sets(spec)
    assert len(sets.train) == 60
    assert [(p.text, p.source) for p in sets.val] == [("val b", "my-val"), ("val h", "val_h.json")]


def test_demo_totals_shrink_each_source_pro_rata_to_a_subset(files: dict[str, str]) -> None:
    spec = section(sources=[{"path": files["benign"], "context": "benign"},
                            {"path": files["harmful"], "context": "harmful"}])
    full = load_prompt_sets(spec)
    small = load_prompt_sets(spec, train_total=12, val_total=3)
    # 12 prompts split 2:1 like the sources, then a fifth held out per source.
    assert small.summary() == {"train": {"benign.json": 6, "harmful.json": 3},
                               "val": {"benign.json": 2, "harmful.json": 1}}
    assert {p.text for p in small.train} <= {p.text for p in full.train} | {
        p.text for p in full.val}


def test_validation_needs_both_contexts(files: dict[str, str]) -> None:
    spec = section(sources=[{"path": files["benign"], "context": "benign"},
                            {"path": files["harmful"], "context": "harmful"}],
                   validation=[{"path": files["val"], "context": "benign"}])
    with pytest.raises(DataError, match="training.validation: no 'harmful' validation prompts"):
        load_prompt_sets(spec)


def test_schema_rejects_unknown_keys_with_their_path() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy({"name": "x", "model": {"source": "m"}, "training": {
            "sources": [{"path": "a", "context": "benign", "colum": "x"},
                        {"path": "b", "context": "harmful"}],
            "trainer": {"temperature": 0}}})
    text = str(info.value)
    assert "training.sources[0].colum: unknown key" in text
    assert "training.trainer.temperature: got 0" in text


def test_shipped_policies_have_valid_training_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GUARDRAIL_DATA", raising=False)
    for name in ("eds-qwen2.5-coder-0.5b.yaml", "eds-smollm2-135m.yaml"):
        policy = load_policy(ROOT / "policies" / name)
        assert policy.training is not None
        contexts = {s.context for s in policy.training.sources}
        assert contexts == {"benign", "harmful"}
        for source in [*policy.training.sources, *policy.training.validation]:
            # ${GUARDRAIL_DATA:-../../shared/data} resolves against policies/.
            assert Path(source.path).parent == (ROOT.parent / "shared" / "data").resolve()
