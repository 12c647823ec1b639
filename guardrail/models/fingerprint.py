"""What identifies a model and a file: the architecture fingerprint, and sha256 digests.

Reads a loaded model's config and the bytes of files only, so energy artifacts, caches and
evaluation can fingerprint without importing transformers.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from tqdm import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = structlog.get_logger("guardrail.models")

_CHUNK = 1 << 20

# fmt: off
_VOLATILE_KEYS = frozenset((
    "transformers_version", "dtype", "torch_dtype", "use_cache", "quantization_config",
    "architectures", "pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id",
    "sep_token_id", "cls_token_id", "mask_token_id", "decoder_start_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "tokenizer_class",
    "id2label", "label2id", "problem_type", "task_specific_params", "chunk_size_feed_forward",
    "prefix", "finetuning_task",
    # generation-ish keys that older configs still carry
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "diversity_penalty",
))
# fmt: on
"""Config keys that differ between a GGUF load and its cached reload, or that describe
generation and tokenisation rather than the network."""


def model_fingerprint(model: PreTrainedModel, name: str, tokenizer: Any = None) -> dict[str, Any]:
    """Identify a model's architecture: what an artifact trained on it must match.

    The compared fields (:data:`guardrail.artifact.energy.FINGERPRINT_KEYS`) are what decides
    whether energy models fit the hidden states: the model type, the sizes (hidden, heads, MLP), the
    layer count, the vocabulary size and, given ``tokenizer``, a digest of its vocabulary.
    They read the same under every transformers release that loads the model.
    ``config_sha256`` hashes the config minus keys that change between a GGUF load and its
    cached reload; its keys change between transformers releases (``rope_scaling`` became
    ``rope_parameters``), so it names caches but is never compared.
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    arch = {
        key: value
        for key, value in config.to_dict().items()
        if not key.startswith("_") and key not in _VOLATILE_KEYS
    }
    blob = json.dumps(arch, sort_keys=True, separators=(",", ":"), default=str)
    out = {
        "name": name,
        "model_type": config.model_type,
        "hidden_size": _first_attr(text, "hidden_size", "n_embd", "d_model"),
        "num_layers": _first_attr(text, "num_hidden_layers", "n_layer", "num_layers"),
        "num_attention_heads": _first_attr(text, "num_attention_heads", "n_head"),
        "num_key_value_heads": _first_attr(text, "num_key_value_heads", "num_attention_heads",
                                           "n_head"),
        "intermediate_size": _first_attr(text, "intermediate_size", "n_inner", "ffn_dim"),
        "vocab_size": _first_attr(text, "vocab_size"),
        "config_sha256": hashlib.sha256(blob.encode()).hexdigest(),
    }
    if tokenizer is not None:
        out["tokenizer_sha256"] = tokenizer_digest(tokenizer)
    return out


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (every token and its id, special ones included):
    the same ids must mean the same text for states to match."""
    vocab = sorted((str(token), int(index)) for token, index in tokenizer.get_vocab().items())
    blob = json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def _first_attr(config: Any, *names: str) -> Any:
    for attr in names:
        value = getattr(config, attr, None)
        if value is not None:
            return value
    return None


def file_sha256(path: Path, *, label: str | None = None) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    return hash_files([path], label=label or path.name)


def hash_files(parts: Iterable[Path], *, label: str, dest: Path | None = None) -> str:
    """sha256 of the concatenation of ``parts``, also writing it to ``dest`` when given."""
    parts = list(parts)
    digest = hashlib.sha256()
    started = time.perf_counter()
    with ExitStack() as stack:
        out = stack.enter_context(open(dest, "wb")) if dest is not None else None
        bar = stack.enter_context(
            tqdm(
                total=sum(p.stat().st_size for p in parts),
                unit="B",
                unit_scale=True,
                desc=label,
                disable=None,
                leave=False,
            )
        )
        for part in parts:
            with open(part, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    if out is not None:
                        out.write(chunk)
                    bar.update(len(chunk))
    log.debug(
        "model.sha256",
        path=str(dest or parts[0]),
        parts=len(parts),
        seconds=round(time.perf_counter() - started, 2),
    )
    return digest.hexdigest()
