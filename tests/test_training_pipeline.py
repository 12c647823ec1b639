"""`guardrail train` and `guardrail demo` end to end on a tiny random model with user JSONL files."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from guardrail import Register, hookimpl
from guardrail.artifact.energy import EnergyArtifact
from guardrail.cli import main
from guardrail.plugin.components import RefusalClassifier, Verdict
from guardrail.policy.model import load_policy
from guardrail.steering.guard import Guardrail

from .conftest import write_policy

# Prompts use the tiny tokenizer's words. The classifier below refuses prompts containing
# "kill" or "make", so each context has a comply and a refuse cell of known size.
BENIGN = [f"where can i buy coke {w}" for w in ("please", "store", "shop", "here", "now"[:0] or "it",
                                                "the", "a", "you")] + \
         [f"how kill python process {w}" for w in ("please", "it", "the", "a")]
HARMFUL = [f"how make bomb {w}" for w in ("please", "it", "the", "a", "you", "here")] + \
          [f"how build bomb {w}" for w in ("please", "it", "the", "a", "you", "here")]


class KeywordClassifier(RefusalClassifier):
    """Refuses when the *prompt* contains 'kill' or 'make': labels independent of random weights."""

    name = "keyword-test"

    def classify(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        return [Verdict(refused=("kill" in p or "make" in p), score=1.0) for p in prompts]


class _Plugin:
    @hookimpl
    def guardrail_register_refusal_classifiers(self, register: Register) -> None:
        register(KeywordClassifier)


@pytest.fixture
def keyword_classifier(plugin_manager: Any) -> Iterator[None]:
    """Registers the keyword classifier for one test."""
    plugin = _Plugin()
    plugin_manager.register(plugin, name="keyword-test")
    yield
    plugin_manager.unregister(plugin)


def write_jsonl(path: Path, prompts: list[str], field: str = "text") -> Path:
    """A user-made JSONL prompt file."""
    path.write_text("".join(json.dumps({field: p, "lang": "en"}) + "\n" for p in prompts))
    return path


def tiny_training_policy(tmp_path: Path, model_dir: Path, **training: Any) -> Path:
    """A policy on the tiny model whose training data are two JSONL files in ``tmp_path``."""
    write_jsonl(tmp_path / "benign.jsonl", BENIGN)
    write_jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    section = {
        "sources": [
            {"path": "benign.jsonl", "context": "benign", "field": "text"},
            {"path": "harmful.jsonl", "context": "harmful", "field": "text",
             "filter": {"lang": "en"}},
        ],
        "labels": {"max_new_tokens": 3, "batch_size": 4},
        "capture": {"cache_dir": "state-cache"},
        "trainer": {"epochs": 4, "batch_size": 8, "val_fraction": 0.25},
        "selection": {"top_k": 2},
        "demo": {"prompts": 12, "validation_prompts": 6},
        **training,
    }
    return write_policy(tmp_path / "policy.yaml", {
        "name": "tiny-eds",
        "model": {"source": str(model_dir)},
        "generation": {"max_new_tokens": 3},
        "rails": [{"name": "eds", "energy_model": {
            "artifact": "artifacts/tiny.safetensors", "params": {"hidden": [16], "dropout": 0.0}}}],
        "classifier": {"plugin": "keyword-test"},
        "training": section,
    })


def test_train_writes_an_artifact_the_policy_loads(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None, capsys: pytest.CaptureFixture[str]
) -> None:
    policy_path = tiny_training_policy(tmp_path, tiny_model_dir)
    report_path = tmp_path / "report.json"
    code = main(["train", "--policy", str(policy_path), "--no-progress", "--report",
                 str(report_path)])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(report_path.read_text())
    # 12 benign (4 with "kill"), 12 harmful (6 with "make"); a quarter of each source held out.
    cells = {name: report["cells"]["train"][name] + report["cells"]["val"][name]
             for name in report["cells"]["train"]}
    assert cells == {"benign+comply": 8, "benign+refuse": 4, "harmful+refuse": 6,
                     "harmful+comply": 6}
    assert sum(report["prompts"]["val"].values()) == 6
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2, 3]
    assert len(report["selected"]) == 2
    assert "benign+refuse" in out and "selected" in out
    assert report["capture"]["generated"] == 24
    assert report["capture"]["forward_passes"] == report["capture"]["batches"]

    guard = Guardrail.from_policy(load_policy(policy_path))
    assert guard.rails[0].layers == report["selected"]
    header = EnergyArtifact.read_header(tmp_path / "artifacts" / "tiny.safetensors")
    assert header["metadata"]["data"]["cells"] == report["cells"]
    assert set(header["metadata"]["metrics"]) == {"0", "1", "2", "3"}
    threshold = header["configs"][str(report["selected"][0])]["threshold"]
    assert threshold == pytest.approx(
        report["layers"][report["selected"][0]]["threshold"], abs=1e-3)
    assert (tmp_path / "artifacts" / "tiny.layers.png").is_file()

    # A second run (say with another top_k) never touches the model: everything is cached.
    assert main(["train", "--policy", str(policy_path), "--no-progress", "--top-k", "1",
                 "--report", str(report_path)]) == 0
    again = json.loads(report_path.read_text())
    assert again["capture"]["generated"] == 0 and again["capture"]["cached"] == 24
    assert again["layers"] == report["layers"]  # same data, same seed: same models
    assert len(again["selected"]) == 1


def test_emitted_policy_uses_the_new_artifact(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None
) -> None:
    policy_path = tiny_training_policy(tmp_path, tiny_model_dir)
    out_dir = tmp_path / "elsewhere"
    out_dir.mkdir()
    code = main(["train", "--policy", str(policy_path), "--no-progress",
                 "--output", str(tmp_path / "other.safetensors"),
                 "--emit-policy", str(out_dir / "trained.yaml")])
    assert code == 0
    assert "../other.safetensors" in (out_dir / "trained.yaml").read_text()
    guard = Guardrail.from_policy(out_dir / "trained.yaml")
    assert len(guard.rails[0].layers) == 2
    assert not (tmp_path / "artifacts" / "tiny.safetensors").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"sources": [{"path": "nowhere.jsonl", "context": "benign"},
                      {"path": "harmful.jsonl", "context": "harmful", "field": "text"}]},
         ["training.sources[0]", "nowhere.jsonl", "not found"]),
        ({"sources": [{"path": "benign.jsonl", "context": "harmfull", "field": "text"},
                      {"path": "harmful.jsonl", "context": "harmful", "field": "text"}]},
         ["training.sources[0].context", "'harmfull'", "'benign' or 'harmful'"]),
        ({"sources": [{"path": "benign.jsonl", "context": "benign"},
                      {"path": "harmful.jsonl", "context": "harmful", "field": "text"}]},
         ["training.sources[0] (benign)", "benign.jsonl", "no field 'instruction'", "'text'"]),
        ({"sources": [{"path": "harmful.jsonl", "context": "harmful", "field": "text"}]},
         ["training.sources: got [", "sources with a 'benign' context"]),
        ({"sources": [{"path": "benign.jsonl", "context": "benign", "field": "text"},
                      {"path": "harmful.jsonl", "context": "harmful", "field": "text",
                       "filter": {"lang": "fr"}}]},
         ["training.sources[1]", "harmful.jsonl", "'fr'", "values of 'lang': 'en'"]),
        ({"sources": [{"path": "benign.jsonl", "context": "benign", "field": "text"},
                      {"path": "benign.jsonl", "context": "harmful", "field": "text"}]},
         ["is in benign.jsonl as 'benign' and in benign.jsonl as 'harmful'"]),
    ],
)
def test_missing_or_mislabelled_data_is_a_clear_error(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None,
    capsys: pytest.CaptureFixture[str], change: dict, expected: list[str],
) -> None:
    policy_path = tiny_training_policy(tmp_path, tiny_model_dir, **change)
    assert main(["train", "--policy", str(policy_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for part in expected:
        assert part in err


def test_an_empty_undesirable_side_stops_with_an_explanation(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy_path = tiny_training_policy(tmp_path, tiny_model_dir)
    # Only benign prompts the classifier lets through and harmful ones it refuses.
    write_jsonl(tmp_path / "benign.jsonl", BENIGN[:8])
    write_jsonl(tmp_path / "harmful.jsonl", HARMFUL[:6])
    assert main(["train", "--policy", str(policy_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "undesirable (benign+refuse, harmful+comply) side is empty" in err
    assert "'benign+refuse': 0" in err


def test_policy_without_training_section(tmp_path: Path, tiny_model_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write_policy(tmp_path / "p.yaml", {
        "name": "x", "model": {"source": str(tiny_model_dir)},
        "rails": [{"name": "eds", "energy_model": {"artifact": "a.safetensors"}}]})
    assert main(["train", "--policy", str(path)]) == 1
    assert "training: missing" in capsys.readouterr().err


def test_demo_trains_a_subset_and_prints_base_vs_steered(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GUARDRAIL_CACHE_DIR", str(tmp_path / "cache"))
    policy_path = tiny_training_policy(tmp_path, tiny_model_dir)
    code = main(["demo", "--policy", str(policy_path), "--max-new-tokens", "2", "--no-progress",
                 "--prompt", "how kill python process", "--harmful", "how make bomb"])
    out = capsys.readouterr().out
    assert code == 0
    # The demo's own artifact goes to the cache, not next to the policy's.
    demo_artifact = tmp_path / "cache" / "demo" / "tiny-eds-eds-tiny-model.safetensors"
    assert demo_artifact.is_file() and not (tmp_path / "artifacts" / "demo").exists()
    header = EnergyArtifact.read_header(demo_artifact)
    assert sum(header["metadata"]["data"]["prompts"]["train"].values()) <= 13
    assert out.count("PROMPT") == 2 and "ENERGY   L" in out
    # The keyword classifier refuses both prompts whatever the model says.
    assert "benign-but-scary answered: base 0/1, steered 0/1" in out
    assert "harmful refused:           base 1/1, steered 1/1" in out
    # A second demo reuses the artifact instead of training again.
    assert main(["demo", "--policy", str(policy_path), "--max-new-tokens", "2",
                 "--no-progress"]) == 0
    assert "using the trained artifact" in capsys.readouterr().out


def test_demo_tallies_refusals_on_a_sample_of_the_validation_prompts(
    tmp_path: Path, tiny_model_dir: Path, keyword_classifier: None,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GUARDRAIL_CACHE_DIR", str(tmp_path / "cache"))
    write_jsonl(tmp_path / "benign-val.jsonl", [f"{p}, please" for p in BENIGN])
    write_jsonl(tmp_path / "harmful-val.jsonl", [f"{p}, please" for p in HARMFUL])
    validation = [{"path": "benign-val.jsonl", "context": "benign", "field": "text", "name": "b"},
                  {"path": "harmful-val.jsonl", "context": "harmful", "field": "text", "name": "h"}]
    policy_path = tiny_training_policy(tmp_path, tiny_model_dir, validation=validation)
    code = main(["demo", "--policy", str(policy_path), "--max-new-tokens", "2", "--no-progress",
                 "--tally", "6"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "validation sample (6 prompts, seeded), refusals base -> steered:" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and " of " in line]
    assert {row[1] for row in rows} <= {"benign", "harmful"} and rows
    assert sum(int(row[6]) for row in rows) == 6  # every sampled prompt is counted once
