"""Building a policy's rails: each rail's components from the registry, its energy models (and
gate) from its artifact, checked against the loaded model's fingerprint.

Values ``guardrail calibrate`` stored in the artifact fill what the policy leaves open: steerer
params the rail's ``steerer.params`` does not set, and gate thresholds set to ``auto``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from guardrail.components import ActivationSource, EnergyModel, Steerer
from guardrail.energy import EnergyArtifact
from guardrail.errors import ArtifactError, PolicyError
from guardrail.gating import GateSet
from guardrail.plugins import Registry
from guardrail.policy import GateSpec, PluginSpec, RailSpec
from guardrail.steering import Rail


def build_rail(
    spec: RailSpec,
    index: int,
    registry: Registry,
    fingerprint: dict[str, Any],
    device: torch.device,
    where: str,
) -> Rail:
    """Instantiate one rail's components and load its energy-model artifact."""
    source = registry.create(
        "activation_source", spec.activation_source.plugin, spec.activation_source.params
    )
    assert isinstance(source, ActivationSource)
    key = f"rails[{index}]"
    artifact = _artifact(spec, key, registry, fingerprint, device, where)
    calibrated = calibration_of(artifact, spec.name) if artifact is not None else {}
    steerer_spec = spec.steerer
    if calibrated.get("steerer"):
        # The policy's own params win; calibration fills the rest.
        params = {**calibrated["steerer"], **spec.steerer.params}
        steerer_spec = spec.steerer.model_copy(update={"params": params})
    steerer = create_steerer(steerer_spec, registry)
    disabled: dict[int, str] = {}
    if artifact is not None:
        layers, energies, disabled = _energies(artifact, spec, key, where)
    else:
        auto = list(range(int(fingerprint.get("num_layers") or 0)))
        layers, energies = (auto if spec.layers == "auto" else list(spec.layers)), {}
    gate, below, above = None, None, None
    if spec.gate is not None:
        assert artifact is not None  # check_plugins: a gate needs an energy-model artifact
        gate, below, above = _gate(spec.gate, artifact.gate, calibrated, f"{key}.gate",
                                   str(spec.energy_model.artifact if spec.energy_model else ""),
                                   where)
    return Rail(
        name=spec.name,
        layers=layers,
        source=source,
        steerer=steerer,
        energies=energies,
        plugins={
            "activation_source": spec.activation_source.plugin,
            "steerer": spec.steerer.plugin,
        },
        fingerprint=fingerprint,
        disabled=disabled,
        gate=gate,
        below=below,
        above=above,
        budget=dict(calibrated.get("budget") or {}),
    )


def calibration_of(artifact: EnergyArtifact, rail: str) -> dict[str, Any]:
    """What ``guardrail calibrate`` stored in ``artifact`` for ``rail`` ({} if nothing)."""
    found = artifact.metadata.get("calibration")
    if not isinstance(found, dict) or found.get("rail") not in (None, rail):
        return {}
    return found


def _gate(spec: GateSpec, fitted: GateSet | None, calibrated: dict[str, Any], key: str,
          artifact: str, where: str) -> tuple[GateSet, float | None, float | None]:
    """The rail's fitted gate and its thresholds, ``auto`` read from the calibration."""
    if fitted is None:
        raise PolicyError(where, [f"{key}: the artifact {artifact} has no fitted gate; retrain "
                                  "it with `guardrail train` from this policy"])
    wanted = [m.plugin for m in spec.members]
    stored = [m.plugin for m in fitted.members]
    if wanted != stored:
        raise PolicyError(where, [f"{key}.members: the policy names {wanted} but the artifact "
                                  f"{artifact} was fitted with {stored}; retrain it"])
    thresholds: list[float | None] = []
    for side in ("below", "above"):
        value = getattr(spec, side)
        if value == "auto":
            value = (calibrated.get("gate") or {}).get(side, "missing")
            if value == "missing":
                raise PolicyError(where, [
                    f"{key}.{side}: 'auto' takes the threshold `guardrail calibrate` stores in "
                    f"the artifact, and {artifact} has none; run `guardrail calibrate --policy "
                    f"{where}` or give a number"])
        thresholds.append(None if value is None else float(value))
    return fitted, thresholds[0], thresholds[1]


def with_steerer(rail: Rail, spec: PluginSpec, registry: Registry) -> Rail:
    """``rail`` with the steerer ``spec`` names; its source and energy models are shared."""
    plugins = {**rail.plugins, "steerer": spec.plugin}
    return dataclasses.replace(rail, steerer=create_steerer(spec, registry), plugins=plugins)


def create_steerer(spec: PluginSpec, registry: Registry) -> Steerer:
    """The steerer a rail's ``steerer:`` section names, with its validated params."""
    steerer = registry.create("steerer", spec.plugin, spec.params)
    assert isinstance(steerer, Steerer)
    return steerer


def _artifact(spec: RailSpec, key: str, registry: Registry, fingerprint: dict[str, Any],
              device: torch.device, where: str) -> EnergyArtifact | None:
    """The rail's energy-model artifact, loaded and checked against the model (None: no
    energy model)."""
    if spec.energy_model is None:
        return None
    artifact_path = spec.energy_model.artifact
    if artifact_path is None:
        raise PolicyError(where, [f"{key}.energy_model.artifact: missing; train one first"])
    try:
        artifact = EnergyArtifact.load(artifact_path, registry, device=device)
    except ArtifactError as exc:
        raise ArtifactError(f"{where}: {key}.energy_model.artifact: {exc}") from exc
    artifact.check_model(fingerprint, f"{where}: {key}.energy_model.artifact {artifact_path}")
    return artifact


def _energies(
    artifact: EnergyArtifact, spec: RailSpec, key: str, where: str
) -> tuple[list[int], dict[int, EnergyModel], dict[int, str]]:
    """The rail's layers, per layer the energy model its artifact holds for it, and the layers
    the artifact disabled at load (non-finite weights), which the rail leaves out."""
    stored = sorted({*artifact.layers, *artifact.disabled})
    layers = stored if spec.layers == "auto" else list(spec.layers)
    missing = [layer for layer in layers if layer not in stored]
    if missing:
        assert spec.energy_model is not None
        raise PolicyError(
            where,
            [
                f"{key}.layers: {missing} are not in the artifact {spec.energy_model.artifact} "
                f"(it has {stored})"
            ],
        )
    disabled = {layer: artifact.disabled[layer] for layer in layers if layer in artifact.disabled}
    layers = [layer for layer in layers if layer not in disabled]
    if not layers:
        assert spec.energy_model is not None
        raise ArtifactError(
            f"{where}: {key}.energy_model.artifact {spec.energy_model.artifact}: every layer the "
            f"rail steers is disabled ({', '.join(f'{k}: {v}' for k, v in disabled.items())})"
        )
    return layers, {layer: artifact.models[layer] for layer in layers}, disabled
