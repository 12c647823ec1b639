"""Energy-model artifacts: safetensors tensors plus a JSON header, never pickle.

One artifact holds the energy models of one rail, one per selected layer, with the
fingerprint of the model they were trained on. Loading it for another model is refused.

An artifact holds either one *shared* set of energy models (format ``guardrail-energy/1``:
trained on all four label cells, it steers either way) or one set per *side* of the rail's
gate (``guardrail-energy/2``): ``answer``, trained on benign prompts (an answer is desirable),
steers the rows the gate scores confidently benign towards answering; ``refuse``, trained on
harmful prompts (a refusal is desirable), steers the confidently harmful rows towards
refusing. With one model per side the direction of each step is unambiguous: lower energy on
the ``refuse`` side can only mean "more like a refusal of a harmful request".

Loading checks every header field and every tensor against the energy-model plugin's own
rebuild of the layer; anything off is an :class:`ArtifactError` naming the file, the layer
and the field. A layer whose weights hold NaN or infinity is disabled (one warning names
them all) rather than steering with garbage; an artifact with no usable layer is an error.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from guardrail.artifact.file import ArtifactFile, check_header, read_artifact
from guardrail.artifact.gate import GateSet
from guardrail.artifact.header import (
    FINGERPRINT_KEYS,
    FORMAT,
    FORMAT_SHARED,
    FORMATS,
    HEADER_KEY,
    SIDES,
    ArtifactHeader,
    Calibration,
)
from guardrail.errors import ArtifactError, PluginError
from guardrail.plugin.energy_model import EnergyModel

if TYPE_CHECKING:
    from guardrail.plugin.registry import Registry

log = structlog.get_logger("guardrail.artifact.energy")

__all__ = ["FINGERPRINT_KEYS", "FORMAT", "FORMATS", "FORMAT_SHARED", "HEADER_KEY", "SIDES",
           "EnergyArtifact", "finite"]


@dataclass
class EnergyArtifact:
    """Per-layer energy models for one model, with how they were made.

    ``models`` is the shared set (format 1); ``sides`` holds one set per gate side (format 2).
    An artifact has one or the other.
    """

    plugin: str
    fingerprint: dict[str, Any]
    models: dict[int, EnergyModel] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    gate: GateSet | None = None
    #: Layers found unusable at load (layer -> why), left out of ``models``.
    disabled: dict[int, str] = field(default_factory=dict)
    #: Per-side energy models (``answer``, ``refuse``), and their layers disabled at load.
    sides: dict[str, dict[int, EnergyModel]] = field(default_factory=dict)
    sides_disabled: dict[str, dict[int, str]] = field(default_factory=dict)
    #: The checked header it was loaded from (None: built in memory, not loaded).
    checked: ArtifactHeader | None = None

    @property
    def calibration(self) -> Calibration | None:
        """``metadata.calibration`` as checked at load (None: not calibrated, or not loaded)."""
        return self.checked.calibration if self.checked is not None else None

    @property
    def layers(self) -> list[int]:
        """Layer indices of every set, ascending."""
        return sorted({layer for models in self.sets().values() for layer in models})

    def sets(self) -> dict[str, dict[int, EnergyModel]]:
        """The energy-model sets by side: ``{"shared": models}`` or the per-side sets."""
        return dict(self.sides) if self.sides else {"shared": self.models}

    def disabled_sets(self) -> dict[str, dict[int, str]]:
        """Layers disabled at load, by side (as :meth:`sets`)."""
        return dict(self.sides_disabled) if self.sides else {"shared": self.disabled}

    def header(self) -> dict[str, Any]:
        """The JSON header stored in the safetensors metadata."""
        if self.sides and self.models:
            raise ArtifactError("an artifact holds a shared energy-model set or one per side, "
                                "not both")
        unknown = sorted(set(self.sides) - set(SIDES))
        if unknown:
            raise ArtifactError(f"energy-model sides {unknown}; expected some of {list(SIDES)}")

        def describe(models: dict[int, EnergyModel]) -> dict[str, Any]:
            return {"layers": sorted(models),
                    "configs": {str(layer): models[layer].config() for layer in sorted(models)}}

        body: dict[str, Any] = (
            {"format": FORMAT, "sides": {side: describe(m) for side, m in self.sides.items()}}
            if self.sides else {"format": FORMAT_SHARED, **describe(self.models)})
        return {
            **body,
            "energy_model": self.plugin,
            "model": self.fingerprint,
            "metadata": self.metadata,
            **({"gate": self.gate.header()} if self.gate is not None else {}),
        }

    def save(self, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write atomically (temporary file, then rename); returns the path. ``dtype`` stores
        floating-point tensors in that precision (they load back as the models' own)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = self.header()
        tensors = {
            f"{_prefix(side)}{layer}.{key}": value.detach().cpu().contiguous()
            for side, models in self.sets().items()
            for layer in sorted(models)
            for key, value in models[layer].tensors().items()
        }
        if self.gate is not None:
            tensors.update(self.gate.tensors())
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        _write(path, tensors, header)
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
        """Read and check the JSON header (every field, and the tensor table) without loading
        tensors; returns it as a mapping (:func:`~guardrail.artifact.file.read_artifact`
        gives the checked model)."""
        return read_artifact(path).raw

    @classmethod
    def load(
        cls, path: str | Path, registry: Registry, device: torch.device | str = "cpu"
    ) -> EnergyArtifact:
        """Load an artifact; the energy-model plugin named in its header must be registered.

        Layers with non-finite weights are left out of ``models`` and listed in ``disabled``
        (one ``artifact.nonfinite_weights`` warning); if that leaves none, it is an error.
        The gate's members are rebuilt, and the files they name resolved, here: a broken
        gate is an error now, not at the first request.
        """
        path = Path(path)
        checked = read_artifact(path)
        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from exc
        return cls.assemble(checked, tensors, registry, path, device)

    @classmethod
    def assemble(cls, checked: ArtifactFile, tensors: dict[str, torch.Tensor], registry: Registry,
                 path: str | Path, device: torch.device | str = "cpu") -> EnergyArtifact:
        """The artifact a checked header and its tensors describe (:meth:`load`'s second
        half): energy models rebuilt and checked, the gate rebuilt."""
        path = Path(path)
        header = checked.header
        plugin = header.energy_model
        try:
            model_cls = registry.get("energy_model", plugin).cls
        except PluginError as exc:
            raise ArtifactError(f"{path}: header field 'energy_model': {exc}") from exc
        hidden_size = header.model.hidden_size
        sets: dict[str, dict[int, EnergyModel]] = {}
        disabled_sets: dict[str, dict[int, str]] = {}
        for side, entry in header.sets().items():
            sets[side], disabled_sets[side] = _load_set(
                model_cls, side, entry.layers, entry.configs, tensors, hidden_size, path, device)
        gate = None
        if header.gate is not None:
            gate = GateSet.from_header(header.gate, tensors, registry, str(path),
                                       num_layers=header.model.num_layers)
        shared = "shared" in sets
        return cls(
            plugin=plugin,
            fingerprint=checked.raw["model"],
            models=sets["shared"] if shared else {},
            metadata=checked.raw.get("metadata", {}),
            gate=gate,
            disabled=disabled_sets["shared"] if shared else {},
            sides={} if shared else sets,
            sides_disabled={} if shared else disabled_sets,
            checked=header,
        )

    @staticmethod
    def compare(trained: dict[str, Any], fingerprint: dict[str, Any], where: str) -> None:
        """Raise :class:`ArtifactError` naming every fingerprint field that differs."""
        diffs = [
            f"{key}: artifact {trained.get(key)!r} vs model {fingerprint.get(key)!r}"
            for key in FINGERPRINT_KEYS
            if key in trained and key in fingerprint and trained[key] != fingerprint[key]
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
    """Save tensors and header to a temporary file beside ``path``, then rename over it.

    The header is checked as a load would check it first: nothing writes an artifact that
    would then be refused."""
    text = json.dumps(header)
    check_header(json.loads(text), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={HEADER_KEY: text})
    os.replace(tmp, path)

def _prefix(side: str) -> str:
    """Tensor-name prefix of a set's layers: ``layers.`` (shared) or ``{side}.layers.``."""
    return "layers." if side == "shared" else f"{side}.layers."


def _load_set(model_cls: Any, side: str, layers: list[int], configs: dict[str, Any],
              tensors: dict[str, torch.Tensor], hidden_size: Any, path: Path,
              device: torch.device | str) -> tuple[dict[int, EnergyModel], dict[int, str]]:
    """One energy-model set rebuilt from its tensors; layers with non-finite weights are
    disabled (one warning names them), and a set left with no layer is an error."""
    models: dict[int, EnergyModel] = {}
    disabled: dict[int, str] = {}
    label = "" if side == "shared" else f"side {side!r} "
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    base = _prefix(side)
    for name, tensor in tensors.items():
        if name.startswith(base):
            layer_key, _, rest = name[len(base):].partition(".")
            by_layer.setdefault(layer_key, {})[rest] = tensor
    for layer in layers:
        found = _load_layer(model_cls, configs[str(layer)], by_layer.get(str(layer), {}),
                            hidden_size, f"{path}: {label}layer {layer}", f"{base}{layer}.",
                            device)
        if isinstance(found, str):
            disabled[int(layer)] = found
            continue
        models[int(layer)] = found
    if disabled:
        log.warning("artifact.nonfinite_weights", path=str(path), side=side,
                    layers=sorted(disabled),
                    detail={str(k): v for k, v in sorted(disabled.items())},
                    action="layers disabled")
    if not models:
        raise ArtifactError(f"{path}: every {label}layer ({sorted(disabled)}) has non-finite "
                            "(NaN or infinite) weights; retrain the artifact")
    return models, disabled


def _load_layer(model_cls: Any, config: dict[str, Any], own: dict[str, torch.Tensor],
                hidden_size: int, where: str, prefix: str, device: torch.device | str = "cpu"
                ) -> EnergyModel | str:
    """One layer's energy model rebuilt from its config and tensors and checked, or why it
    is disabled (non-finite weights); anything else wrong is an :class:`ArtifactError`."""
    if not own:
        raise ArtifactError(f"{where}: the header lists it but the file has no tensors "
                            f"named {prefix}*")
    if config.get("hidden_size", hidden_size) != hidden_size:
        raise ArtifactError(f"{where}: config field 'hidden_size' is "
                            f"{_shown(config['hidden_size'])} but the header's model has "
                            f"hidden_size {hidden_size}")
    model = _rebuild(model_cls, config, own, where)
    _check_input_size(model, hidden_size, where)
    bad = sorted(name for name, t in own.items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        return f"non-finite weights in {', '.join(bad)}"
    return model.to(device).eval().requires_grad_(False)


def _rebuild(model_cls: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor],
             where: str) -> EnergyModel:
    """The plugin's ``from_artifact``; whatever it raises becomes an :class:`ArtifactError`."""
    try:
        model = model_cls.from_artifact(config, tensors)
    except ArtifactError as exc:
        raise ArtifactError(f"{where}: {exc}") from exc
    except Exception as exc:  # a plugin's KeyError or load_state_dict's RuntimeError
        detail = _first_line(exc) if isinstance(exc, ValueError) else (
            f"{type(exc).__name__}: {_first_line(exc)}")
        raise ArtifactError(f"{where}: config {_shown(config, 200)} and its tensors do not "
                            f"rebuild a {model_cls.__name__}: {detail}") from exc
    if not isinstance(model, EnergyModel):
        raise ArtifactError(f"{where}: {model_cls.__name__}.from_artifact returned a "
                            f"{type(model).__name__}, not an EnergyModel")
    return model


def _check_input_size(model: EnergyModel, hidden_size: Any, where: str) -> None:
    """The rebuilt model takes states of the fingerprint's hidden size, one energy per row."""
    if not _is_index(hidden_size):
        return
    own = getattr(model, "hidden_size", None)
    if own is not None and own != hidden_size:
        raise ArtifactError(f"{where}: config field 'hidden_size' is {_shown(own)} but the "
                            f"header's model has hidden_size {hidden_size}")
    try:
        with torch.no_grad():
            out = model.eval().energy(torch.zeros(2, hidden_size))
    except Exception as exc:
        raise ArtifactError(f"{where}: the rebuilt energy model rejects states of the model's "
                            f"hidden size {hidden_size}: {type(exc).__name__}: "
                            f"{_first_line(exc)}") from exc
    if tuple(out.shape) != (2,):
        raise ArtifactError(f"{where}: the rebuilt energy model maps 2 states to shape "
                            f"{list(out.shape)}; expected one energy per state, [2]")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return text if len(text) <= 300 else text[:300] + "..."


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def finite(value: float | None) -> float | None:
    """``value`` if it is a finite number, else ``None`` (for telemetry)."""
    return value if value is not None and math.isfinite(value) else None
