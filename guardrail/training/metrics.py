"""Per-layer figures of a trained energy model: accuracy, AUROC per context, gap, threshold."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from guardrail.evaluation.metrics import auroc
from guardrail.plugin.energy_model import EnergyModel

# (desirable cell, undesirable cell) compared within one context.
CONTEXT_PAIRS = {"benign": (0, 1), "harmful": (2, 3)}


@dataclass
class LayerMetrics:
    """Train/validation figures of one layer's energy model (energies: low = desirable)."""

    layer: int
    train_accuracy: float
    val_accuracy: float
    val_auroc: float
    benign_auroc: float | None
    harmful_auroc: float | None
    balanced_auroc: float
    energy_gap: float
    threshold: float
    best_epoch: int
    val_loss: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, rounded."""
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def score(self, metric: str) -> float:
        """The named selection metric."""
        return {"balanced_auroc": self.balanced_auroc, "auroc": self.val_auroc,
                "accuracy": self.val_accuracy}[metric]


def youden_threshold(desirable: torch.Tensor, undesirable: torch.Tensor) -> float:
    """The energy t maximising TPR - FPR for "E > t means undesirable"."""
    if desirable.numel() == 0 or undesirable.numel() == 0:
        return 0.0
    candidates = torch.cat([desirable, undesirable]).sort().values
    sorted_u, sorted_d = undesirable.sort().values, desirable.sort().values
    tpr = 1 - torch.searchsorted(sorted_u, candidates, right=True) / len(sorted_u)
    fpr = 1 - torch.searchsorted(sorted_d, candidates, right=True) / len(sorted_d)
    best = int(torch.argmax(tpr - fpr))
    upper = candidates[best + 1] if best + 1 < len(candidates) else candidates[best] + 1e-3
    return float((candidates[best] + upper) / 2)


def evaluate_layer(
    model: EnergyModel, layer: int, train_states: torch.Tensor, train_cells: torch.Tensor,
    val_states: torch.Tensor, val_cells: torch.Tensor, *, best_epoch: int = 0,
    val_loss: float = float("nan"),
) -> LayerMetrics:
    """Metrics of a trained model on raw (unstandardised) states, through its public API."""
    with torch.no_grad():
        e_train = model.energy(train_states.float())
        e_val = model.energy(val_states.float())

    def accuracy(energies: torch.Tensor, cells: torch.Tensor) -> float:
        desirable = (cells == 0) | (cells == 2)
        correct = torch.where(desirable, energies < 0, energies > 0)
        return float(correct.float().mean())

    desirable = (val_cells == 0) | (val_cells == 2)
    per_context = {
        context: auroc(e_val[val_cells == bad], e_val[val_cells == good])
        for context, (good, bad) in CONTEXT_PAIRS.items()
    }
    overall = auroc(e_val[~desirable], e_val[desirable])
    present = [v for v in per_context.values() if v is not None]
    return LayerMetrics(
        layer=layer,
        train_accuracy=accuracy(e_train, train_cells),
        val_accuracy=accuracy(e_val, val_cells),
        val_auroc=overall if overall is not None else float("nan"),
        benign_auroc=per_context["benign"],
        harmful_auroc=per_context["harmful"],
        balanced_auroc=sum(present) / len(present) if present else float("nan"),
        energy_gap=float(e_val[~desirable].mean() - e_val[desirable].mean()),
        threshold=youden_threshold(e_val[desirable], e_val[~desirable]),
        best_epoch=best_epoch,
        val_loss=val_loss,
    )
