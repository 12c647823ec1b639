"""Energy-model artifacts: safetensors tensors plus a JSON header, never pickle.

One artifact holds the energy models of one rail, one per selected layer, with the
fingerprint of the model they were trained on. Loading it for another model is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from guardrail.components import EnergyModel
from guardrail.errors import ArtifactError, PluginError
from guardrail.gating import GateSet

FORMAT = "guardrail-energy/1"
HEADER_KEY = "guardrail"
FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_layers", "config_sha256")


@dataclass
class EnergyArtifact:
    """Per-layer energy models for one model, with how they were made."""

    plugin: str
    fingerprint: dict[str, Any]
    models: dict[int, EnergyModel]
    metadata: dict[str, Any] = field(default_factory=dict)
    gate: GateSet | None = None

    @property
    def layers(self) -> list[int]:
        """Layer indices, ascending."""
        return sorted(self.models)

    def header(self) -> dict[str, Any]:
        """The JSON header stored in the safetensors metadata."""
        return {
            "format": FORMAT,
            "energy_model": self.plugin,
            "model": self.fingerprint,
            "layers": self.layers,
            "configs": {str(layer): self.models[layer].config() for layer in self.layers},
            "metadata": self.metadata,
            **({"gate": self.gate.header()} if self.gate is not None else {}),
        }

    def save(self, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write atomically (temporary file, then rename); returns the path. ``dtype`` stores
        floating-point tensors in that precision (they load back as the models' own)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"layers.{layer}.{key}": value.detach().cpu().contiguous()
            for layer in self.layers
            for key, value in self.models[layer].tensors().items()
        }
        if self.gate is not None:
            tensors.update(self.gate.tensors())
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        _write(path, tensors, self.header())
        return path

    @classmethod
    def update_metadata(cls, path: str | Path, key: str, value: Any) -> None:
        """Set ``metadata[key]`` in an artifact's header in place (atomically); tensors stay."""
        path = Path(path)
        header = cls.read_header(path)
        header.setdefault("metadata", {})[key] = value
        _write(path, load_file(str(path), device="cpu"), header)

    @staticmethod
    def read_header(path: str | Path) -> dict[str, Any]:
        """Read and check the JSON header without loading tensors."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"energy-model artifact {path} not found")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from exc
        if HEADER_KEY not in meta:
            raise ArtifactError(f"{path}: no '{HEADER_KEY}' header; not a guardrail artifact")
        try:
            header = json.loads(meta[HEADER_KEY])
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path}: header is not valid JSON ({exc})") from exc
        if header.get("format") != FORMAT:
            raise ArtifactError(
                f"{path}: header key 'format' is {header.get('format')!r}; expected {FORMAT!r}"
            )
        return header

    @classmethod
    def load(
        cls, path: str | Path, registry: Any, device: torch.device | str = "cpu"
    ) -> EnergyArtifact:
        """Load an artifact; the energy-model plugin named in its header must be registered."""
        path = Path(path)
        header = cls.read_header(path)
        plugin = header["energy_model"]
        try:
            model_cls = registry.get("energy_model", plugin).cls
        except PluginError as exc:
            raise ArtifactError(f"{path}: header key 'energy_model': {exc}") from exc
        tensors = load_file(str(path), device="cpu")
        models: dict[int, EnergyModel] = {}
        for layer in header["layers"]:
            prefix = f"layers.{layer}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not own:
                raise ArtifactError(f"{path}: header lists layer {layer} but it has no tensors")
            model = model_cls.from_artifact(header["configs"][str(layer)], own)
            models[int(layer)] = model.to(device).eval().requires_grad_(False)
        gate = None
        if header.get("gate") is not None:
            gate = GateSet.from_header(header["gate"], tensors, registry, str(path))
        return cls(
            plugin=plugin,
            fingerprint=header["model"],
            models=models,
            metadata=header.get("metadata", {}),
            gate=gate,
        )

    @staticmethod
    def compare(trained: dict[str, Any], fingerprint: dict[str, Any], where: str) -> None:
        """Raise :class:`ArtifactError` naming every fingerprint field that differs."""
        diffs = [
            f"{key}: artifact {trained.get(key)!r} vs model {fingerprint.get(key)!r}"
            for key in FINGERPRINT_KEYS
            if trained.get(key) != fingerprint.get(key)
        ]
        if diffs:
            raise ArtifactError(
                f"{where} was trained for model {trained.get('name')!r}, not for the "
                f"loaded model {fingerprint.get('name')!r} (" + "; ".join(diffs) + "). "
                "Retrain it for this model with `guardrail train`."
            )

    def check_model(self, fingerprint: dict[str, Any], where: str) -> None:
        """Refuse to steer a model this artifact was not trained for."""
        self.compare(self.fingerprint, fingerprint, where)
        num_layers = fingerprint.get("num_layers")
        bad = [layer for layer in self.layers if num_layers is not None and layer >= num_layers]
        if bad:
            raise ArtifactError(f"{where}: layers {bad} do not exist in a {num_layers}-layer model")


def _write(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """Save tensors and header to a temporary file beside ``path``, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
    os.replace(tmp, path)

