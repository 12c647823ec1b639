"""Train one energy model per layer, all layers at once: InfoNCE over four-cell-balanced batches.

For each desirable state (benign+comply, harmful+refuse) in a batch, InfoNCE asks for lower
energy than every undesirable one in the batch (benign+refuse, harmful+comply). Batches draw
equally from the four cells: with the cells unbalanced the model can learn "refusal is bad"
(or "harmful wording is bad") instead of "an unjustified refusal is bad". InfoNCE does not
care where zero is, so a weak logistic loss on the same logits anchors the boundary at 0.

The layers' models are stacked with ``torch.func`` and trained by one vmapped forward and
backward per step (a plugin model that cannot be vmapped is trained layer by layer). Inputs
are standardised with the training statistics, which are stored in the model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from guardrail.plugin.energy_model import EnergyModel
from guardrail.policy.training import TrainerSettings
from guardrail.training.metrics import LayerMetrics, evaluate_layer
from guardrail.training.stacking import Stacked, stack_models

log = structlog.get_logger("guardrail.training")

DESIRABLE = (0, 2)
UNDESIRABLE = (1, 3)


@dataclass
class TrainedLayers:
    """Trained models and their metrics, per layer."""

    models: dict[int, EnergyModel]
    metrics: dict[int, LayerMetrics]
    epochs: int
    seconds: float
    vectorised: bool


def train_layers(
    train_states: torch.Tensor,
    train_cells: torch.Tensor,
    val_states: torch.Tensor,
    val_cells: torch.Tensor,
    layers: Sequence[int],
    build: Callable[[], EnergyModel],
    settings: TrainerSettings,
    *,
    seed: int = 0,
    progress: Any = None,
    threads: int | None = 1,
) -> TrainedLayers:
    """Train a model per layer in ``layers`` on states ``[n, all layers, hidden]``.

    Cells are 0 benign+comply, 1 benign+refuse, 2 harmful+refuse, 3 harmful+comply. Early
    stopping keeps each layer's epoch with the lowest cell-balanced validation loss.
    Deterministic for a given ``seed`` (the global RNG is left as it was). ``threads`` caps
    torch's CPU threads meanwhile: the steps are small, and on a busy machine a second
    spinning thread costs more than it gives (4x slower measured on a shared 2-core box).
    """
    started = time.perf_counter()
    layers = list(layers)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(train_states, train_cells, val_states, val_cells, layers, build, settings,
                      seed, progress, started)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    train_states: torch.Tensor, train_cells: torch.Tensor, val_states: torch.Tensor,
    val_cells: torch.Tensor, layers: list[int], build: Callable[[], EnergyModel],
    settings: TrainerSettings, seed: int, progress: Any, started: float,
) -> TrainedLayers:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = [build() for _ in layers]
        generator = torch.Generator().manual_seed(seed)
        xs, mean, std = _standardise(train_states, layers)
        xv = (val_states[:, layers, :].float().transpose(0, 1) - mean[:, None]) / std[:, None]
        stack = stack_models(models, xs[:, :2])
        optimiser = torch.optim.Adam(stack.parameters(), lr=settings.lr,
                                     weight_decay=settings.weight_decay)
        sampler = CellSampler(train_cells, settings.batch_size, generator)
        steps = max(1, math.ceil(len(train_cells) / settings.batch_size))
        best_loss = torch.full((len(layers),), math.inf)
        best_epoch = torch.zeros(len(layers), dtype=torch.long)
        epoch = 0
        for epoch in range(settings.epochs):
            stack.train(True)
            for _ in range(steps):
                rows = sampler.sample()
                energies = stack.energies(xs[:, rows])
                loss = energy_loss(energies, train_cells[rows], settings.temperature,
                                   settings.anchor_weight, settings.contrast).sum()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            stack.train(False)
            with torch.no_grad():
                val_loss = energy_loss(stack.energies(xv), val_cells, settings.temperature,
                                       settings.anchor_weight, settings.contrast)
            improved = val_loss < best_loss - 1e-4
            stack.snapshot(improved)
            best_loss = torch.where(improved, val_loss, best_loss)
            best_epoch = torch.where(improved, torch.full_like(best_epoch, epoch), best_epoch)
            if progress is not None:
                progress.set_postfix(val_loss=f"{float(best_loss.mean()):.3f}", refresh=False)
                progress.update(1)
            if bool(((epoch - best_epoch) >= settings.patience).all()):
                break
        if progress is not None and progress.total is not None:
            progress.update(max(0, progress.total - progress.n))
        trained = stack.restore()
    result: dict[int, EnergyModel] = {}
    metrics: dict[int, LayerMetrics] = {}
    for g, (layer, model) in enumerate(zip(layers, trained, strict=True)):
        model.set_standardisation(mean[g], std[g])
        model.eval().requires_grad_(False)
        metrics[layer] = evaluate_layer(
            model, layer, train_states[:, layer, :], train_cells, val_states[:, layer, :],
            val_cells, best_epoch=int(best_epoch[g]), val_loss=float(best_loss[g]),
        )
        model.threshold = metrics[layer].threshold
        result[layer] = model
    seconds = time.perf_counter() - started
    log.info("train.layers_done", layers=len(layers), epochs=epoch + 1, seconds=round(seconds, 1),
             vectorised=isinstance(stack, Stacked))
    return TrainedLayers(result, metrics, epoch + 1, seconds, isinstance(stack, Stacked))


# --- objective ------------------------------------------------------------------------------
def cell_weights(cells: torch.Tensor) -> torch.Tensor:
    """Per-row weights: each present cell gets equal mass within its side (sums to 1 per side)."""
    weights = torch.zeros(cells.shape[0])
    for side in (DESIRABLE, UNDESIRABLE):
        present = [c for c in side if bool((cells == c).any())]
        for c in present:
            mask = cells == c
            weights[mask] = 1.0 / (int(mask.sum()) * len(present))
    return weights


def energy_loss(
    energies: torch.Tensor,
    cells: torch.Tensor,
    temperature: float,
    anchor_weight: float,
    contrast: str = "all",
) -> torch.Tensor:
    """Cell-balanced InfoNCE plus the sign anchor, per layer: ``[G, n]`` energies -> ``[G]``.

    Each desirable row i contributes softplus(logsumexp_j(-E_j/tau) - (-E_i/tau)) over the
    undesirable rows j, i.e. -log of the softmax probability of picking i among them.
    ``contrast="all"`` takes the negatives from both contexts (the paper's objective);
    ``"context"`` only from the row's own context (benign+comply against benign+refuse,
    harmful+refuse against harmful+comply), so the energy cannot lower itself by making a
    prompt look benign: it has to learn which *response* fits the context.
    """
    weights = cell_weights(cells).to(energies.device)
    desirable = (cells == DESIRABLE[0]) | (cells == DESIRABLE[1])
    logits = -energies / temperature
    if contrast == "all":
        infonce = _infonce(logits, weights, desirable, ~desirable)
    else:
        parts = [
            _infonce(logits, weights, cells == good, cells == bad)
            for good, bad in zip(DESIRABLE, UNDESIRABLE, strict=True)
            if bool((cells == good).any()) and bool((cells == bad).any())
        ]
        infonce = torch.stack(parts).mean(0) if parts else logits.new_zeros(logits.shape[0])
    # Logistic loss on the same logits: P(desirable) = sigmoid(-E/tau), so E = 0 is the boundary.
    anchor = (torch.nn.functional.softplus(-logits[:, desirable]) * weights[desirable]).sum(1) + (
        torch.nn.functional.softplus(logits[:, ~desirable]) * weights[~desirable]
    ).sum(1)
    return infonce + anchor_weight * anchor


def _infonce(
    logits: torch.Tensor, weights: torch.Tensor, good: torch.Tensor, bad: torch.Tensor
) -> torch.Tensor:
    """-log softmax of each ``good`` row against the ``bad`` rows, cell-weighted: ``[G]``."""
    w_bad = weights[bad] / weights[bad].sum()
    # log(w_j * n_bad) re-weights the negatives so each cell counts the same; 0 when balanced.
    lse = torch.logsumexp(logits[:, bad] + torch.log(w_bad * int(bad.sum())), dim=1)
    w_good = weights[good] / weights[good].sum()
    return (torch.nn.functional.softplus(lse[:, None] - logits[:, good]) * w_good).sum(1)


class CellSampler:
    """Row indices for batches drawing equally from each non-empty cell (cycling shuffles)."""

    def __init__(self, cells: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.generator = generator
        self.pools = [(cells == c).nonzero().flatten() for c in range(4)]
        self.pools = [p for p in self.pools if len(p)]
        self.per_cell = max(1, batch_size // len(self.pools))
        self._orders = [self._shuffle(p) for p in self.pools]
        self._cursor = [0] * len(self.pools)

    def _shuffle(self, pool: torch.Tensor) -> torch.Tensor:
        return pool[torch.randperm(len(pool), generator=self.generator)]

    def sample(self) -> torch.Tensor:
        """The next balanced batch of row indices."""
        rows = []
        for i, pool in enumerate(self.pools):
            taken: list[torch.Tensor] = []
            need = self.per_cell
            while need > 0:
                order, cursor = self._orders[i], self._cursor[i]
                chunk = order[cursor : cursor + need]
                taken.append(chunk)
                need -= len(chunk)
                self._cursor[i] = cursor + len(chunk)
                if self._cursor[i] >= len(order):
                    self._orders[i], self._cursor[i] = self._shuffle(pool), 0
            rows.append(torch.cat(taken))
        return torch.cat(rows)


def _standardise(
    states: torch.Tensor, layers: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs = states[:, layers, :].float().transpose(0, 1).contiguous()  # [G, n, H]
    mean = xs.mean(dim=1)
    std = xs.std(dim=1).clamp_min(1e-6) if xs.shape[1] > 1 else torch.ones_like(mean)
    return (xs - mean[:, None]) / std[:, None], mean, std

