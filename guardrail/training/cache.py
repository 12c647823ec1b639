"""On-disk cache of prompt states and labelling responses, one safetensors shard per batch.

Entries are keyed by the rendered prompt text (chat template and system prompt included)
inside a directory per model (fingerprint plus a digest of some weights), capture positions
and label length. A shard is written atomically as soon as its batch is done, so an
interrupted run keeps every finished batch and a re-run or a parameter sweep finds its
prompts without touching the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import nn

log = structlog.get_logger("guardrail.training")

FORMAT = "guardrail-states/1"
HEADER_KEY = "guardrail"
_MEAN = "mean_states"


def prompt_key(rendered: str) -> str:
    """The cache key of one rendered prompt."""
    return hashlib.sha256(rendered.encode("utf-8")).hexdigest()[:32]


def weights_digest(model: nn.Module) -> str:
    """A cheap digest of a few weights, so two checkpoints of one architecture get two caches."""
    digest = hashlib.sha256()
    params = list(model.parameters())
    for param in (params[0], params[len(params) // 2], params[-1]):
        flat = param.detach().reshape(-1)[:4096].float().cpu().contiguous()
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class CachedRows:
    """States ``[n, layers, hidden]`` (float16) and generated responses for some prompts;
    ``mean_states`` (the prompt-mean states gates read) when the cache keeps them."""

    states: torch.Tensor
    responses: list[str]
    mean_states: torch.Tensor | None = None


class StateCache:
    """Prompt states per model, positions and label length; see the module docstring."""

    def __init__(
        self,
        root: str | Path,
        fingerprint: dict[str, Any],
        weights: str,
        *,
        positions: str,
        max_new_tokens: int,
        mean_states: bool = False,
    ) -> None:
        name = re.sub(r"[^\w.-]+", "_", str(fingerprint.get("name") or "model"))
        model_dir = f"{name}-{str(fingerprint.get('config_sha256', ''))[:12]}-{weights}"
        # A cache that keeps prompt means for gates is a directory of its own.
        kept = f"{positions}+mean" if mean_states and positions != "mean" else positions
        self.dir = Path(root).expanduser() / model_dir / f"{kept}-t{max_new_tokens}"
        self.mean_states = mean_states
        self.num_layers = int(fingerprint.get("num_layers") or 0)
        self.hidden_size = int(fingerprint.get("hidden_size") or 0)
        self._index: dict[str, tuple[Path, int]] | None = None

    # --- lookup -------------------------------------------------------------------------------
    def index(self) -> dict[str, tuple[Path, int]]:
        """Key -> (shard, row) over every complete shard (read from headers only)."""
        if self._index is None:
            self._index = {}
            for shard in sorted(self.dir.glob("shard-*.safetensors")):
                header = _read_header(shard)
                if header is None:
                    log.warning("cache.shard_unreadable", path=str(shard))
                    continue
                for row, key in enumerate(header["keys"]):
                    self._index.setdefault(key, (shard, row))
        return self._index

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys with no cached entry, in the given order."""
        index = self.index()
        return [key for key in keys if key not in index]

    def load(self, keys: Sequence[str]) -> CachedRows:
        """States and responses for ``keys`` (all must be cached), in the given order."""
        index = self.index()
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            shard, row = index[key]
            by_shard.setdefault(shard, []).append((position, row))
        shape = (len(keys), self.num_layers, self.hidden_size)
        states = torch.empty(shape, dtype=torch.float16)
        means = torch.empty(shape, dtype=torch.float16) if self.mean_states else None
        responses = [""] * len(keys)
        for shard, wanted in by_shard.items():
            positions = torch.tensor([p for p, _ in wanted])
            rows = torch.tensor([r for _, r in wanted])
            with safe_open(str(shard), framework="pt") as handle:
                states[positions] = handle.get_tensor("states")[rows]
                if means is not None:
                    means[positions] = handle.get_tensor(_MEAN)[rows]
                header = json.loads((handle.metadata() or {})[HEADER_KEY])
            for position, row in wanted:
                responses[position] = header["responses"][row]
        return CachedRows(states=states, responses=responses, mean_states=means)

    # --- writing ------------------------------------------------------------------------------
    def write(
        self, keys: Sequence[str], prompts: Sequence[str], responses: Sequence[str],
        states: torch.Tensor,
        mean_states: torch.Tensor | None = None,
    ) -> Path:
        """Store one finished batch: ``states`` (and, in a cache that keeps them,
        ``mean_states``) are ``[n, layers, hidden]``."""
        tensors = {"states": states}
        if self.mean_states:
            if mean_states is None:
                raise ValueError("this cache keeps prompt-mean states; mean_states is missing")
            tensors[_MEAN] = mean_states
        for name, tensor in tensors.items():
            if tensor.shape != (len(keys), self.num_layers, self.hidden_size):
                raise ValueError(
                    f"{name} shape {tuple(tensor.shape)}; expected "
                    f"({len(keys)}, {self.num_layers}, {self.hidden_size})"
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]
        path = self.dir / f"shard-{name}.safetensors"
        header = {"format": FORMAT, "keys": list(keys), "prompts": list(prompts),
                  "responses": list(responses)}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: v.detach().to(torch.float16).cpu().contiguous() for k, v in tensors.items()},
                  str(tmp), metadata={HEADER_KEY: json.dumps(header)})
        os.replace(tmp, path)
        if self._index is not None:
            for row, key in enumerate(keys):
                self._index.setdefault(key, (path, row))
        log.debug("cache.shard_written", path=str(path), prompts=len(keys))
        return path


def _read_header(path: Path) -> dict[str, Any] | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        header = json.loads(meta[HEADER_KEY])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError):
        return None
    return header if header.get("format") == FORMAT else None
