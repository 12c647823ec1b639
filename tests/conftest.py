"""Shared fixtures: a fresh plugin manager per test, tiny random models, temp caches."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from guardrail.plugin.manager import build_plugin_manager, set_plugin_manager
from guardrail.plugin.registry import Registry

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [
    "the",
    "a",
    "i",
    "you",
    "can",
    "where",
    "buy",
    "coke",
    "how",
    "kill",
    "python",
    "process",
    "bomb",
    "make",
    "build",
    "sorry",
    "cannot",
    "help",
    "with",
    "that",
    "to",
    "of",
    "in",
    "is",
    "it",
    "what",
    "why",
    "tell",
    "me",
    "about",
    "please",
    "here",
    "are",
    "some",
    "steps",
    "store",
    "shop",
]


@pytest.fixture(autouse=True)
def _isolated(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """No installed third-party plugins unless a test asks; a fresh manager per test."""
    monkeypatch.delenv("GUARDRAIL_DISABLE_PLUGINS", raising=False)
    set_plugin_manager(build_plugin_manager(load_entrypoints=False))
    yield
    set_plugin_manager(None)


@pytest.fixture
def plugin_manager():  # type: ignore[no-untyped-def]
    """The per-test plugin manager (built-ins only)."""
    from guardrail.plugin.manager import get_plugin_manager

    return get_plugin_manager()


@pytest.fixture
def registry(plugin_manager) -> Registry:  # type: ignore[no-untyped-def]
    """A registry filled from the per-test plugin manager."""
    return Registry.from_plugin_manager(plugin_manager)


def build_tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A word-level tokenizer with ChatML specials and a chat template; no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {
        tok: i for i, tok in enumerate([*specials, "\n", "system", "user", "assistant", *WORDS])
    }
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        # What a causal LM takes (transformers 4.x's generate() refuses token_type_ids).
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.chat_template = CHATML
    tok.padding_side = "left"
    return tok


def build_tiny_model(vocab_size: int, layers: int = 4, seed: int = 0):  # type: ignore[no-untyped-def]
    """A randomly initialised Qwen2-style causal LM with ``layers`` decoder blocks."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny random model and tokenizer saved as a local HF directory."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok))
    out = tmp_path / "tiny-model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_loaded(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """The tiny model loaded through the project's own loader."""
    from guardrail.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


# Three single-turn conversations in the tiny tokenizer's vocabulary.
CONVERSATIONS = [
    [{"role": "user", "content": "where can i buy coke"}],
    [{"role": "user", "content": "how can i kill a python process please"}],
    [{"role": "user", "content": "tell me about the store"}],
]


def random_artifact(loaded, layers=(1, 2), seed: int = 0):  # type: ignore[no-untyped-def]
    """An artifact of untrained (randomly initialised) MLP energy models for ``loaded``."""
    from guardrail_plugins.mlp_energy import MLPEnergyModel, MLPEnergyParams

    from guardrail.artifact.energy import EnergyArtifact
    from guardrail.models import model_fingerprint

    torch.manual_seed(seed)
    hidden = loaded.model.config.hidden_size
    models = {
        layer: MLPEnergyModel(hidden, MLPEnergyParams(hidden=[16, 8], dropout=0.2)).eval()
        for layer in layers
    }
    return EnergyArtifact(
        plugin="mlp",
        fingerprint=model_fingerprint(loaded.model, loaded.name),
        models=models,
        metadata={"note": "random"},
    )


def tiny_policy(artifact: Path, **steerer: object) -> object:
    """Policy ``tiny``: one ``eds`` rail steering by gradient descent on ``artifact``."""
    from guardrail.policy.model import parse_policy

    return parse_policy(
        {
            "name": "tiny",
            "model": {"source": "unused"},
            "generation": {"max_new_tokens": 6, "batch_size": 2},
            "rails": [
                {
                    "name": "eds",
                    "energy_model": {"plugin": "mlp", "artifact": str(artifact)},
                    "steerer": {
                        "plugin": "gradient-descent",
                        "params": {"eta": 5.0, "steps": 3, **steerer},
                    },
                }
            ],
        }
    )


def write_policy(path: Path, data: dict) -> Path:
    """Write a policy mapping as YAML (JSON is valid YAML)."""
    path.write_text(json.dumps(data, indent=2))
    return path
