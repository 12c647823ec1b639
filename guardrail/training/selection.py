"""Rank layers on validation and write the best ones into one energy-model artifact."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from guardrail.artifact.energy import EnergyArtifact
from guardrail.artifact.gate import GateSet
from guardrail.plugin.energy_model import EnergyModel
from guardrail.training.metrics import LayerMetrics


def rank_layers(metrics: Mapping[int, LayerMetrics], metric: str) -> list[int]:
    """Layers best first: by ``metric``, then by energy gap, then by the lower index."""

    def key(layer: int) -> tuple[float, float, int]:
        value = metrics[layer].score(metric)
        gap = metrics[layer].energy_gap
        return (-value if math.isfinite(value) else math.inf,
                -gap if math.isfinite(gap) else math.inf, layer)

    return sorted(metrics, key=key)


def select_layers(metrics: Mapping[int, LayerMetrics], metric: str, top_k: int) -> list[int]:
    """The ``top_k`` best layers, ascending."""
    return sorted(rank_layers(metrics, metric)[:top_k])


def write_artifact(
    path: str | Path,
    *,
    plugin: str,
    fingerprint: dict[str, Any],
    sets: Mapping[str, Mapping[int, EnergyModel]],
    metadata: dict[str, Any],
    gate: GateSet | None = None,
    dtype: str = "float32",
) -> Path:
    """Save the energy models (one ``shared`` set, or one per gate side) and the rail's
    fitted gate with the run's metadata; returns the path."""
    shared = "shared" in sets
    artifact = EnergyArtifact(
        plugin=plugin,
        fingerprint=fingerprint,
        models=dict(sets["shared"]) if shared else {},
        sides={} if shared else {side: dict(models) for side, models in sets.items()},
        metadata=metadata,
        gate=gate,
    )
    return artifact.save(path, dtype=getattr(torch, dtype))
