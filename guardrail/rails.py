"""Building a policy's rails: each rail's components from the registry, its energy models from
its artifact, checked against the loaded model's fingerprint."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from guardrail.components import ActivationSource, EnergyModel, Steerer
from guardrail.energy import EnergyArtifact
from guardrail.errors import ArtifactError, PolicyError
from guardrail.plugins import Registry
from guardrail.policy import PluginSpec, RailSpec
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
    steerer = create_steerer(spec.steerer, registry)
    if spec.energy_model is not None:
        layers, energies = _energies(spec, f"rails[{index}]", registry, fingerprint, device, where)
    else:
        auto = list(range(int(fingerprint.get("num_layers") or 0)))
        layers, energies = (auto if spec.layers == "auto" else list(spec.layers)), {}
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
    )


def with_steerer(rail: Rail, spec: PluginSpec, registry: Registry) -> Rail:
    """``rail`` with the steerer ``spec`` names; its source and energy models are shared."""
    plugins = {**rail.plugins, "steerer": spec.plugin}
    return dataclasses.replace(rail, steerer=create_steerer(spec, registry), plugins=plugins)


def create_steerer(spec: PluginSpec, registry: Registry) -> Steerer:
    """The steerer a rail's ``steerer:`` section names, with its validated params."""
    steerer = registry.create("steerer", spec.plugin, spec.params)
    assert isinstance(steerer, Steerer)
    return steerer


def _energies(
    spec: RailSpec,
    key: str,
    registry: Registry,
    fingerprint: dict[str, Any],
    device: torch.device,
    where: str,
) -> tuple[list[int], dict[int, EnergyModel]]:
    """The rail's layers and, per layer, the energy model its artifact holds for it."""
    assert spec.energy_model is not None
    artifact_path = spec.energy_model.artifact
    if artifact_path is None:
        raise PolicyError(where, [f"{key}.energy_model.artifact: missing; train one first"])
    try:
        artifact = EnergyArtifact.load(artifact_path, registry, device=device)
    except ArtifactError as exc:
        raise ArtifactError(f"{where}: {key}.energy_model.artifact: {exc}") from exc
    artifact.check_model(fingerprint, f"{where}: {key}.energy_model.artifact {artifact_path}")
    layers = artifact.layers if spec.layers == "auto" else list(spec.layers)
    missing = [layer for layer in layers if layer not in artifact.models]
    if missing:
        raise PolicyError(
            where,
            [
                f"{key}.layers: {missing} are not in the artifact {artifact_path} "
                f"(it has {artifact.layers})"
            ],
        )
    return layers, {layer: artifact.models[layer] for layer in layers}
