"""The per-layer trainer: InfoNCE learns within-context separations, balanced, reproducible."""

from __future__ import annotations

import pytest
import torch
from guardrail_plugins.mlp_energy import MLPEnergyModel, MLPEnergyParams

from guardrail.evaluation.metrics import auroc
from guardrail.plugin.energy_model import EnergyModel
from guardrail.policy.training import TrainerSettings
from guardrail.training.metrics import youden_threshold
from guardrail.training.trainer import CellSampler, energy_loss, train_layers

HIDDEN = 8


def toy_states(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three layers: 0 is noise; 1 encodes refusal and harmfulness (desirable iff they agree,
    an XOR a "refusal is bad" model gets wrong on harmful prompts); 2 encodes only refusal."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 4, (n,), generator=g)
    refuse = ((cells == 1) | (cells == 2)).float()
    harmful = (cells >= 2).float()
    states = torch.randn(n, 3, HIDDEN, generator=g) * 0.5 + 3.0
    states[:, 1, 0] += 3 * refuse
    states[:, 1, 1] += 3 * harmful
    states[:, 2, 0] += 3 * refuse
    return states.half(), cells


def build() -> EnergyModel:
    return MLPEnergyModel(HIDDEN, MLPEnergyParams(hidden=[32, 16], dropout=0.0))


SETTINGS = TrainerSettings(epochs=40, batch_size=32, lr=3e-3, patience=10)


@pytest.fixture(scope="module")
def trained():  # type: ignore[no-untyped-def]
    xt, ct = toy_states(400, 0)
    xv, cv = toy_states(200, 1)
    return train_layers(xt, ct, xv, cv, [0, 1, 2], build, SETTINGS, seed=0), (xv, cv)


def test_learns_the_separable_layer_and_only_that_one(trained) -> None:  # type: ignore[no-untyped-def]
    result, _ = trained
    good, noise, refusal_only = result.metrics[1], result.metrics[0], result.metrics[2]
    assert good.benign_auroc > 0.95 and good.harmful_auroc > 0.95
    assert good.val_accuracy > 0.9  # the anchor puts the boundary at E = 0
    assert good.energy_gap > 0.5
    assert 0.3 < noise.balanced_auroc < 0.7
    # Refusal alone cannot tell a justified refusal from an unjustified one.
    assert refusal_only.balanced_auroc < 0.75
    assert result.vectorised


def test_models_standardise_raw_states_and_carry_their_threshold(trained) -> None:  # type: ignore[no-untyped-def]
    result, (xv, cv) = trained
    model = result.models[1]
    xt, _ = toy_states(400, 0)
    assert torch.allclose(model.input_mean, xt[:, 1].float().mean(0), atol=1e-4)
    assert model.threshold == result.metrics[1].threshold
    energies = model.energy(xv[:, 1].float())
    desirable = (cv == 0) | (cv == 2)
    flagged = energies > model.threshold
    assert float((flagged == ~desirable).float().mean()) > 0.9


def test_training_is_reproducible_with_a_seed() -> None:
    xt, ct = toy_states(120, 0)
    xv, cv = toy_states(60, 1)
    settings = TrainerSettings(epochs=3, batch_size=16)
    dropout = lambda: MLPEnergyModel(HIDDEN, MLPEnergyParams(hidden=[16], dropout=0.2))  # noqa: E731
    runs = [train_layers(xt, ct, xv, cv, [0, 1], dropout, settings, seed=s) for s in (7, 7, 8)]
    first, again, other = (r.models[1].state_dict() for r in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


class LoopOnlyEnergy(MLPEnergyModel):
    """A plugin model torch.func cannot vmap (it reads a Python number from a tensor)."""

    def energy(self, states: torch.Tensor) -> torch.Tensor:
        scale = float(self.input_std.mean().item())
        return super().energy(states) * scale


def test_models_that_cannot_be_vmapped_train_layer_by_layer() -> None:
    xt, ct = toy_states(400, 0)
    xv, cv = toy_states(200, 1)
    result = train_layers(
        xt, ct, xv, cv, [1],
        lambda: LoopOnlyEnergy(HIDDEN, MLPEnergyParams(hidden=[32, 16], dropout=0.0)),
        SETTINGS, seed=0,
    )
    assert not result.vectorised
    assert result.metrics[1].balanced_auroc > 0.95


def test_batches_draw_equally_from_each_cell_however_skewed() -> None:
    cells = torch.tensor([0] * 100 + [1] * 5 + [2] * 50 + [3] * 3)
    sampler = CellSampler(cells, 32, torch.Generator().manual_seed(0))
    seen = torch.zeros(len(cells))
    for _ in range(20):
        rows = sampler.sample()
        assert torch.bincount(cells[rows], minlength=4).tolist() == [8, 8, 8, 8]
        seen[rows] += 1
    assert bool((seen[:100] > 0).all())  # cycling shuffles reach every row of a big cell


def test_sampler_skips_empty_cells() -> None:
    cells = torch.tensor([0] * 10 + [3] * 10)
    rows = CellSampler(cells, 16, torch.Generator().manual_seed(0)).sample()
    assert torch.bincount(cells[rows], minlength=4).tolist() == [8, 0, 0, 8]


def test_infonce_ignores_shifts_and_the_anchor_does_not() -> None:
    cells = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    energies = torch.randn(2, 8)
    plain = energy_loss(energies, cells, 0.1, 0.0)
    assert torch.allclose(plain, energy_loss(energies + 5.0, cells, 0.1, 0.0), atol=1e-5)
    anchored = energy_loss(energies, cells, 0.1, 0.1)
    assert not torch.allclose(anchored, energy_loss(energies + 5.0, cells, 0.1, 0.1))
    # Lower energy for the desirable rows lowers the loss.
    better = energies - 1.0 * ((cells == 0) | (cells == 2)).float()
    assert bool((energy_loss(better, cells, 0.1, 0.1) < anchored).all())


def test_context_contrast_only_compares_answers_within_a_context() -> None:
    cells = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    energies = torch.randn(1, 8)
    harmful = ((cells == 2) | (cells == 3)).float()
    # Raising every harmful prompt's energy (the "looks harmful" feature) leaves the in-context
    # objective unchanged; the paper's objective rewards it as separating desirable from not.
    shifted = energies + 3.0 * harmful
    context = energy_loss(energies, cells, 0.1, 0.0, "context")
    assert torch.allclose(context, energy_loss(shifted, cells, 0.1, 0.0, "context"), atol=1e-5)
    assert not torch.allclose(energy_loss(energies, cells, 0.1, 0.0, "all"),
                              energy_loss(shifted, cells, 0.1, 0.0, "all"))
    # Within a context, ranking the right answer lower still lowers the loss.
    better = energies - 1.0 * (cells == 2).float()
    assert bool((energy_loss(better, cells, 0.1, 0.0, "context") < context).all())


def test_auroc_and_youden_threshold() -> None:
    high = torch.tensor([2.0, 3.0, 4.0])
    low = torch.tensor([-1.0, 0.0, 1.0, 2.5])
    assert auroc(high, low) == pytest.approx(11 / 12)
    assert auroc(high, torch.tensor([])) is None
    threshold = youden_threshold(low, high)
    assert 1.0 <= threshold < 2.0  # everything above it is high, one low row excepted
