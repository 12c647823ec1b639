"""Resolve a model source to a loaded (model, tokenizer) pair on a device, in a dtype.

A source is a packaged offline checkpoint's short name, a local ``.gguf`` file, a local
Hugging Face directory or a hub id. GGUF sources load through the dequantised cache.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from guardrail.cache import cache_entry_path, is_cached
from guardrail.errors import GuardrailError, ModelNotFoundError
from guardrail.models.catalogue import PACKAGED_MODELS
from guardrail.models.fingerprint import file_sha256
from guardrail.models.gguf import GGUFSource, dequantise_into, existing_gguf, packaged_gguf

log = structlog.get_logger("guardrail.models")

ALLOW_DOWNLOADS_ENV = "GUARDRAIL_ALLOW_DOWNLOADS"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM in eval mode on ``device`` in ``dtype``, with a left-padding tokenizer.

    ``name`` is the packaged short name, the directory or file stem, or the hub id with ``/``
    written as ``--``; ``source`` is the string the caller passed.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    name: str
    device: torch.device
    dtype: torch.dtype


# --- device and dtype -----------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` gives cuda when available, else cpu; anything else must name a usable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise GuardrailError(
            f"device {device!r} is not a torch device; expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise GuardrailError(f"device {device!r} asked for, but CUDA is not available; use 'cpu'")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` gives float32 on cpu and bfloat16 (float16 without bf16 support) on cuda."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise GuardrailError(
            f"dtype {dtype!r} is unknown; expected one of auto, {', '.join(_DTYPES)}"
        )
    return _DTYPES[dtype]


# --- loading --------------------------------------------------------------------------------
def load_model(
    source: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load ``source``: a packaged name, a ``.gguf`` file, an HF directory or a hub id.

    GGUF sources go through the dequantised cache under ``cache_root(cache_dir)``. Hub ids are
    read from the local HF cache only, unless ``GUARDRAIL_ALLOW_DOWNLOADS=1``. Nothing is
    cached in-process: each call returns a fresh model.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    started = time.perf_counter()
    loaded = _resolve(source, torch_device, torch_dtype, cache_dir)
    log.info(
        "model.loaded",
        source=source,
        name=loaded.name,
        device=str(torch_device),
        dtype=str(torch_dtype).removeprefix("torch."),
        seconds=round(time.perf_counter() - started, 2),
    )
    return loaded


def _resolve(
    source: str, device: torch.device, dtype: torch.dtype, cache_dir: str | Path | None
) -> LoadedModel:
    common: dict[str, Any] = {"source": source, "device": device, "dtype": dtype}
    if source in PACKAGED_MODELS:
        # A filled cache loads without the packages; they are only read to fill it.
        return _load_gguf(
            name=source,
            sha256=PACKAGED_MODELS[source].sha256,
            gguf=lambda scratch: packaged_gguf(source, scratch),
            cache_dir=cache_dir,
            **common,
        )

    tried = [f"packaged name: not one of {', '.join(PACKAGED_MODELS)}"]
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return _load_gguf(
            name=path.stem,
            sha256=file_sha256(path),
            gguf=lambda _: existing_gguf(path),
            cache_dir=cache_dir,
            **common,
        )
    if path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = _from_pretrained(path, dtype)
        return _prepare(model, tokenizer, name=path.resolve().name, **common)

    if path.is_dir():
        tried.append(f"HF directory {path}: has no config.json")
    elif path.exists():
        tried.append(f"local file {path}: not a .gguf file")
    else:
        tried.append(f"local path {path}: does not exist")
    if _HUB_ID.match(source) and ".." not in source:
        allow = os.environ.get(ALLOW_DOWNLOADS_ENV) == "1"
        try:
            model, tokenizer = _from_pretrained(source, dtype, local_files_only=not allow)
        except (OSError, ValueError) as exc:
            where = (
                "hub (downloads allowed)"
                if allow
                else f"local HF cache ({ALLOW_DOWNLOADS_ENV} unset)"
            )
            tried.append(f"hub id in {where}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
        else:
            return _prepare(model, tokenizer, name=source.replace("/", "--"), **common)
    else:
        tried.append("hub id: not of the form 'org/name'")

    close = difflib.get_close_matches(source, PACKAGED_MODELS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    lines = "\n".join(f"  - {item}" for item in tried)
    raise ModelNotFoundError(
        f"model source {source!r} names nothing loadable.{hint} Tried:\n{lines}\n"
        f"Expected a packaged name ({', '.join(PACKAGED_MODELS)}; install with "
        f"`guardrail models fetch NAME`), a .gguf file, a directory with config.json, or a hub id."
    )


def _load_gguf(
    *,
    source: str,
    name: str,
    sha256: str,
    gguf: GGUFSource,
    cache_dir: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
) -> LoadedModel:
    """Load through the cache, dequantising ``gguf(scratch_dir)`` on a miss.

    The cache keeps the model in its compute dtype when that is bfloat16 or float16 (half
    the disk and load time of float32), else in float32. A cache hit that fails to load is
    discarded and rebuilt once.
    """
    cache_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    entry = cache_entry_path(name, sha256, cache_dir, str(cache_dtype).removeprefix("torch."))
    for attempt in range(2):
        hit = is_cached(entry)
        if not hit:
            dequantise_into(entry, source=source, name=name, sha256=sha256, gguf=gguf,
                            dtype=cache_dtype)
        started = time.perf_counter()
        try:
            model, tokenizer = _from_pretrained(entry, dtype)
        except Exception as exc:
            if not hit or attempt:
                raise
            log.warning("model.cache_invalid", path=str(entry), error=str(exc))
            shutil.rmtree(entry, ignore_errors=True)
            continue
        if hit:
            log.info(
                "model.cache_hit",
                name=name,
                path=str(entry),
                seconds=round(time.perf_counter() - started, 2),
            )
        return _prepare(model, tokenizer, source=source, name=name, device=device, dtype=dtype)
    raise AssertionError("unreachable")  # pragma: no cover


def _from_pretrained(
    ref: str | Path, dtype: torch.dtype, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(ref, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, **kwargs)
    return model, tokenizer


def adopt_model(model: Any, tokenizer: Any, *, name: str | None = None) -> LoadedModel:
    """A causal LM and tokenizer the caller loaded, as a :class:`LoadedModel`, unchanged.

    Any dtype, quantisation or device placement is kept as it is: the model is steered
    where it lives. A tokenizer without a pad token is copied (not changed) and pads with its
    eos token; padding side is chosen per call. ``name`` (default: the model's
    ``name_or_path``) labels logs and artifact fingerprints.
    """
    if not (hasattr(model, "generate") and hasattr(model, "config")):
        raise GuardrailError(
            f"model=: got {type(model).__name__}; expected a Hugging Face causal LM (for "
            "example from AutoModelForCausalLM.from_pretrained)"
        )
    if tokenizer is None or not callable(tokenizer):
        raise GuardrailError(
            f"tokenizer=: got {type(tokenizer).__name__}; expected the model's tokenizer "
            "(for example from AutoTokenizer.from_pretrained)"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise GuardrailError(
                "tokenizer=: it has neither a pad nor an eos token; expected at least an eos "
                "token to pad with"
            )
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "training", False):
        log.warning("model.training_mode", hint="call model.eval(): dropout makes answers and "
                    "energies random")
    first = next(iter(model.parameters()), None)
    device = getattr(model, "device", None) or (first.device if first is not None else None)
    dtype = getattr(model, "dtype", None) or (first.dtype if first is not None else None)
    label = name or str(getattr(model, "name_or_path", "") or type(model).__name__)
    label = Path(label).name if label.startswith((".", "/", "~")) else label.replace("/", "--")
    return LoadedModel(model, tokenizer, source=f"<{type(model).__name__} object>", name=label,
                       device=torch.device(device or "cpu"), dtype=dtype or torch.float32)


def _prepare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
) -> LoadedModel:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise GuardrailError(
                f"tokenizer of model source {source!r} has neither a pad nor an eos token; "
                "expected at least an eos token to pad with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device=device, dtype=dtype)  # type: ignore[call-arg]
    model.eval()
    return LoadedModel(model, tokenizer, source=source, name=name, device=device, dtype=dtype)
