"""The fine-tuned encoder gate on a tiny random BERT, and fitting gates across families."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail.artifact.gate import GateSet
from guardrail.errors import ArtifactError, PluginError
from guardrail.training.gatefit import family_folds, fit_gate_set, held_out_scores
from guardrail.training.sources import TrainingPrompt

from .conftest import WORDS

HARMFUL = ["how make bomb", "how build bomb please", "tell me how make bomb", "make a bomb",
           "how kill", "kill the process of the store", "build a bomb with that"]
BENIGN = ["where can i buy coke", "tell me about the store", "what is the python process",
          "how can i buy a shop", "tell me about python", "where is the store", "what are steps"]


@pytest.fixture
def tiny_encoder(tmp_path: Path) -> Path:
    """A tiny random BERT with a word-level tokenizer, saved like a sentence encoder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    assert tokenizer.unk_token_id not in tokenizer("how make bomb")["input_ids"]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    out = tmp_path / "tiny-encoder"
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _gate(registry: Any, encoder: Path, **params: Any) -> Any:
    return registry.create("gate", "fine-tuned-encoder", {
        "model": str(encoder), "rank": 4, "epochs": 30, "batch_size": 4, "lr": 0.01,
        "head_lr": 0.05, "progress": False, **params})


def test_fine_tuning_separates_the_training_prompts_and_round_trips(
    registry: Any, tiny_encoder: Path
) -> None:
    gate = _gate(registry, tiny_encoder)
    prompts = HARMFUL + BENIGN
    harmful = torch.tensor([True] * len(HARMFUL) + [False] * len(BENIGN))
    gate.fit(prompts, None, harmful)
    scores = gate.score(prompts, None)
    assert float(scores[harmful].min()) > float(scores[~harmful].max())
    # Only the adapters and the head are stored, and they rebuild the same scores.
    tensors = gate.tensors()
    assert all(k.startswith(("adapter.", "head.")) for k in tensors)
    assert any(k.endswith(".A") for k in tensors) and "head.weight" in tensors
    again = type(gate).from_artifact(gate.params, gate.config(), tensors)
    assert torch.allclose(again.score(prompts, None), scores, atol=1e-4)
    # Adapters trained on one encoder are refused on another.
    config = {**gate.config(), "base_digest": "0" * 16}
    with pytest.raises(PluginError, match="not the one the adapters were trained on"):
        type(gate).from_artifact(gate.params, config, tensors).score(prompts, None)


def test_a_missing_encoder_fails_at_load_with_the_command_to_fetch_it(
    registry: Any, tiny_encoder: Path
) -> None:
    gate = _gate(registry, tiny_encoder, epochs=1)
    gate.fit(HARMFUL + BENIGN, None, torch.tensor([True] * 7 + [False] * 7))
    params = gate.params.model_copy(update={"model": "no-such-encoder-package"})
    with pytest.raises(PluginError, match="guardrail models fetch no-such-encoder-package"):
        type(gate).from_artifact(params, gate.config(), gate.tensors())
    broken = {k: v for k, v in gate.tensors().items() if k != "head.bias"}
    with pytest.raises(PluginError, match="tensors missing"):
        type(gate).from_artifact(gate.params, gate.config(), broken)


def test_the_gate_set_loads_from_an_artifact_header(registry: Any, tiny_encoder: Path) -> None:
    prompts = [TrainingPrompt(t, "harmful", "h", "h") for t in HARMFUL] + \
        [TrainingPrompt(t, "benign", "b", "b") for t in BENIGN]
    params = {"model": str(tiny_encoder), "rank": 4, "epochs": 2, "batch_size": 4,
              "progress": False}
    gates = fit_gate_set([("fine-tuned-encoder", params, 1.0)], registry, prompts, None, 4, None)
    again = GateSet.from_header(gates.header(), gates.tensors(), registry, "test")
    texts = [p.text for p in prompts]
    assert torch.allclose(again.score(texts, None, 4), gates.score(texts, None, 4), atol=1e-4)
    header = gates.header()
    header["members"][0]["config"]["adapters"] = "all of them"
    with pytest.raises(ArtifactError, match="adapters"):
        GateSet.from_header(header, gates.tensors(), registry, "test")


def _prompts(spec: str) -> list[TrainingPrompt]:
    """``"h:a b:c"`` -> prompts of families a (harmful) and c (benign), a few each."""
    out = []
    for item in spec.split():
        context, family = item.split(":")
        words = HARMFUL if context == "h" else BENIGN
        out += [TrainingPrompt(f"{w} {family}", "harmful" if context == "h" else "benign",
                               family, family) for w in words[:3]]
    return out


def test_family_folds_spread_benign_and_harmful_families() -> None:
    train = _prompts("h:a h:b h:c b:x b:y b:z")
    val = _prompts("h:a h:b h:c b:x b:y b:z")
    assert family_folds(train, val, None) == [["a"], ["b"], ["c"], ["x"], ["y"], ["z"]]
    folds = family_folds(train, val, 3)
    assert len(folds) == 3 and sorted(f for g in folds for f in g) == list("abcxyz")
    assert all(any(f in "abc" for f in g) and any(f in "xyz" for f in g) for g in folds)


def test_fitted_gates_are_cached_and_folds_refit_without_their_families(
    registry: Any, tiny_encoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guardrail_plugins.gates.finetuned import FineTunedEncoderGate

    fits: list[int] = []
    original = FineTunedEncoderGate.fit

    def counting(self: Any, prompts: Any, states: Any, harmful: Any) -> None:
        fits.append(len(prompts))
        original(self, prompts, states, harmful)

    monkeypatch.setattr(FineTunedEncoderGate, "fit", counting)
    train = _prompts("h:a h:b b:x b:y")
    val = _prompts("h:a h:b b:x b:y")
    params = {"model": str(tiny_encoder), "rank": 4, "epochs": 2, "batch_size": 4,
              "progress": False}
    members = [("fine-tuned-encoder", params, 1.0)]
    cache = tmp_path / "gates"
    gates = fit_gate_set(members, registry, train, None, 4, cache)
    again = fit_gate_set(members, registry, train, None, 4, cache)
    assert fits == [len(train)]  # the second came from the cache
    texts = [p.text for p in val]
    assert torch.allclose(again.score(texts, None, 4), gates.score(texts, None, 4), atol=1e-4)
    scores = gates.score(texts, None, 4)
    held = held_out_scores(gates, registry, train, None, val, None, 4, scores, folds=2,
                           cache_dir=cache)
    assert fits[1:] == [len(train) // 2, len(train) // 2]  # each fold without half the families
    assert not torch.allclose(held, scores)
    held_out_scores(gates, registry, train, None, val, None, 4, scores, folds=2, cache_dir=cache)
    assert len(fits) == 3  # folds are cached too


def test_a_sentence_embedding_gate_whose_encoder_is_missing_fails_at_load(registry: Any) -> None:
    from guardrail_plugins.gates.model import SentenceEmbeddingGate

    params = SentenceEmbeddingGate.Params(model="no-such-encoder-package")
    tensors = {"mean": torch.zeros(3), "std": torch.ones(3), "weight": torch.zeros(3),
               "bias": torch.zeros(1)}
    with pytest.raises(PluginError, match="guardrail models fetch no-such-encoder-package"):
        SentenceEmbeddingGate.from_artifact(params, {"model": "no-such-encoder-package"}, tensors)
