"""Energy-model training speed on cached states: all layers vmapped vs one layer at a time.

Loads a policy's training and validation states from the state cache (run `guardrail train`
first; no model is loaded), then trains every layer for a few epochs both ways in one run
(alternating), and the full run (early stopping as configured) once. Writes
bench/train_layers.md and .json.

    python bench/train_layers.py --policy policies/eds-qwen2.5-coder-0.5b.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from guardrail.plugin.energy_model import EnergyModel
from guardrail.policy.model import load_policy
from guardrail.steering.generation import user_turns
from guardrail.training import stacking, trainer
from guardrail.training.pipeline import Session, TrainOptions, load_sets, pick_rail
from guardrail.training.trainer import train_layers

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Measure and write bench/train_layers.md and .json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=str(HERE.parent / "policies"
                                                / "eds-qwen2.5-coder-0.5b.yaml"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed comparison run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "train_layers"))
    args = parser.parse_args()

    policy = load_policy(args.policy)
    assert policy.training is not None
    _, rail = pick_rail(policy, policy.training.rail)
    session = Session(policy, rail, options=TrainOptions(progress=False))
    sets = load_sets(policy.training, TrainOptions())
    if session.cache.missing(_keys(session, [*sets.train, *sets.val])):
        raise SystemExit("states not cached yet: run `guardrail train --policy ...` first")
    train, val, _ = session.label(sets)
    del session  # the model is not needed any more
    spec = rail.energy_model
    assert spec is not None
    from guardrail.plugin.manager import get_plugin_manager
    from guardrail.plugin.registry import Registry

    registry = Registry.from_plugin_manager(get_plugin_manager())
    model_cls = registry.get("energy_model", spec.plugin).cls
    assert issubclass(model_cls, EnergyModel)
    params = registry.params("energy_model", spec.plugin, spec.params)
    hidden, layers = int(train.states.shape[2]), list(range(int(train.states.shape[1])))
    settings = policy.training.trainer.model_copy(update={"epochs": args.epochs,
                                                          "patience": 10_000})

    def run(vectorised: bool) -> float:
        original = trainer.stack_models
        if not vectorised:
            trainer.stack_models = lambda models, probe: stacking.Looped(models)
        try:
            started = time.perf_counter()
            train_layers(train.states, train.cells, val.states, val.cells, layers,
                         lambda: model_cls.build(hidden, params), settings, seed=0)
            return time.perf_counter() - started
        finally:
            trainer.stack_models = original

    times: dict[str, list[float]] = {"vmapped": [], "looped": []}
    for _ in range(args.repeats):
        times["vmapped"].append(run(True))
        times["looped"].append(run(False))
    started = time.perf_counter()
    full = train_layers(train.states, train.cells, val.states, val.cells, layers,
                        lambda: model_cls.build(hidden, params), policy.training.trainer, seed=0)
    full_seconds = time.perf_counter() - started
    vm, lp = statistics.median(times["vmapped"]), statistics.median(times["looped"])
    report: dict[str, Any] = {
        "policy": policy.name, "layers": len(layers), "hidden": hidden,
        "energy_model": {"plugin": spec.plugin, "params": params.model_dump()},
        "train_rows": int(train.states.shape[0]), "val_rows": int(val.states.shape[0]),
        "torch_threads": 1, "epochs_timed": args.epochs, "repeats": args.repeats,
        "seconds_per_epoch": {"vmapped": round(vm / args.epochs, 2),
                              "looped": round(lp / args.epochs, 2)},
        "speedup": round(lp / vm, 2),
        "full_run": {"epochs": full.epochs, "seconds": round(full_seconds, 1),
                     "max_epochs": policy.training.trainer.epochs},
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(_markdown(report))
    print(_markdown(report))


def _keys(session: Session, prompts: list[Any]) -> list[str]:
    from guardrail.training.cache import prompt_key

    texts = session.guard.render(user_turns(p.text for p in prompts), steer=False)
    return [prompt_key(t) for t in texts]


def _markdown(r: dict[str, Any]) -> str:
    spe, full = r["seconds_per_epoch"], r["full_run"]
    return f"""# Energy-model training benchmark (`python bench/train_layers.py`)

{r['policy']}: {r['layers']} layers, hidden {r['hidden']}, energy model {r['energy_model']}.
{r['train_rows']} training and {r['val_rows']} validation states from the state cache,
CPU, {r['torch_threads']} torch thread, median of {r['repeats']} alternating runs of
{r['epochs_timed']} epochs.

| all layers | seconds per epoch |
|---|---|
| stacked, one vmapped step for every layer (`guardrail train`) | {spe['vmapped']} |
| one layer at a time | {spe['looped']} |

Speed-up: **{r['speedup']}x**.

The full run as configured (early stopping): {full['epochs']} of at most {full['max_epochs']}
epochs, **{full['seconds']} s** for all {r['layers']} layers.
"""


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
