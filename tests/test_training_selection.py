"""Layer selection and the artifact it writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from guardrail_plugins.mlp_energy import MLPEnergyModel, MLPEnergyParams

from guardrail.artifact.energy import EnergyArtifact
from guardrail.training.metrics import LayerMetrics
from guardrail.training.selection import rank_layers, select_layers, write_artifact


def metrics(layer: int, balanced: float, gap: float = 1.0, auroc: float = 0.5) -> LayerMetrics:
    return LayerMetrics(layer=layer, train_accuracy=0.9, val_accuracy=0.8, val_auroc=auroc,
                        benign_auroc=balanced, harmful_auroc=balanced, balanced_auroc=balanced,
                        energy_gap=gap, threshold=0.1 * layer, best_epoch=3, val_loss=1.0)


def test_ranks_by_metric_then_gap_then_lower_layer() -> None:
    table = {0: metrics(0, 0.6), 1: metrics(1, 0.9, gap=1.0), 2: metrics(2, 0.9, gap=2.0),
             3: metrics(3, float("nan")), 4: metrics(4, 0.9, gap=2.0), 5: metrics(5, 0.7, auroc=0.99)}
    assert rank_layers(table, "balanced_auroc") == [2, 4, 1, 5, 0, 3]
    assert rank_layers(table, "auroc")[0] == 5
    assert select_layers(table, "balanced_auroc", 3) == [1, 2, 4]
    assert select_layers(table, "balanced_auroc", 10) == [0, 1, 2, 3, 4, 5]


def test_artifact_holds_only_the_selected_layers_with_thresholds(
    tmp_path: Path, registry: Any
) -> None:
    models = {}
    for layer in range(3):
        model = MLPEnergyModel(4, MLPEnergyParams(hidden=[8], dropout=0.0))
        model.set_standardisation(torch.full((4,), float(layer)), torch.full((4,), 2.0))
        model.threshold = 0.5 + layer
        models[layer] = model
    fingerprint = {"name": "m", "model_type": "qwen2", "hidden_size": 4, "num_layers": 3,
                   "config_sha256": "abc"}
    path = write_artifact(tmp_path / "a.safetensors", plugin="mlp", fingerprint=fingerprint,
                          sets={"shared": {0: models[0], 2: models[2]}},
                          metadata={"metrics": {"0": 1}})
    artifact = EnergyArtifact.load(path, registry)
    assert artifact.layers == [0, 2]
    assert artifact.metadata == {"metrics": {"0": 1}}
    assert artifact.models[2].threshold == 2.5
    assert torch.equal(artifact.models[2].input_mean, torch.full((4,), 2.0))
    states = torch.randn(5, 4)
    assert torch.allclose(artifact.models[2].energy(states), models[2].eval().energy(states))
