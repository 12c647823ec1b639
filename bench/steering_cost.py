"""Steering cost: steered vs unsteered generation at a fixed answer length, in one run.

Every variant generates exactly ``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``,
greedy), so answer length cannot blur the comparison. Variants run interleaved (each round
runs every variant once, so a busy machine slows them alike) and the best of ``--repeats``
rounds is kept. Reported as tokens/s and as the ratio steered / unsteered:

- the policy's rail as shipped (its layers, steps and positions; every row steered, as
  ``Guardrail.attach`` does, so a gate's savings are not counted);
- the same rail steering every generated token too (``generated: true``, the paper's setting);
- a grid of layers x steps with every-token steering;

and the energy model's own cost per steered position and gradient step, in microseconds:
the closed-form gradient the steerer uses against autograd on the same model.

    python bench/steering_cost.py                                  # packaged Qwen, 32 tokens
    python bench/steering_cost.py --policy eds-smollm2-135m --repeats 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from guardrail.plugin.energy_model import EnergyModel
from guardrail.policy.model import PluginSpec
from guardrail.steering.build import create_steerer
from guardrail.steering.generation import user_turns
from guardrail.steering.guard import Guardrail
from guardrail.steering.hooks import SteeringSession
from guardrail.steering.rails import Rail

HERE = Path(__file__).resolve().parent

# Ordinary prompts (none from the evaluation sets); a batch of b takes the first b.
PROMPTS = [
    "Write a haiku about autumn leaves.",
    "How do I reverse a list in Python?",
    "Give me three tips for a job interview.",
    "What is the capital of Australia?",
    "Explain what a hash map is in two sentences.",
    "Suggest a name for a grey cat.",
    "How long should I boil an egg?",
    "Translate 'good morning' into Spanish.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="eds-qwen2.5-coder-0.5b")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--grid-layers", default="1,4,12")
    parser.add_argument("--grid-steps", default="1,3")
    parser.add_argument("--grid-batch", type=int, default=1, help="batch size of the grid")
    parser.add_argument("--out", default=str(HERE / "steering_cost"))
    args = parser.parse_args()
    started = time.perf_counter()
    load = os.getloadavg()[0]

    guard = Guardrail.from_policy(args.policy)
    model = guard.model
    shipped = next(rail for rail in guard.rails if rail.energies)
    steer_params = shipped.steerer.params.model_dump()
    variants: dict[str, Rail | None] = {
        "unsteered": None,
        f"shipped ({_describe(shipped)})": shipped,
        f"every token ({_describe(_every_token(guard, shipped))})": _every_token(guard, shipped),
    }
    grid: dict[str, Rail | None] = {"unsteered": None}
    every = _every_token(guard, shipped)
    for n_layers in _ints(args.grid_layers):
        for steps in _ints(args.grid_steps):
            layers = shipped.layers[:n_layers]
            steerer = create_steerer(PluginSpec(plugin=shipped.plugins["steerer"],
                                                params={**steer_params, "steps": steps}),
                                     guard.registry)
            grid[f"{len(layers)} layers x {steps} steps"] = dataclasses.replace(
                every, layers=layers, energies={k: every.energies[k] for k in layers},
                steerer=steerer)

    rows = []
    for batch in _ints(args.batches):
        rows += _time(guard, variants, batch, args.new_tokens, args.repeats, "policy")
    rows += _time(guard, grid, args.grid_batch, args.new_tokens, args.repeats, "grid")
    energy = _energy_cost(shipped.energies[shipped.layers[0]], int(model.config.hidden_size))

    report = {
        "policy": guard.policy.name, "model": guard.loaded.name,
        "new_tokens": args.new_tokens, "repeats": args.repeats,
        "machine": f"{platform.machine()} with {os.cpu_count()} CPUs, torch "
                   f"{torch.__version__}, {torch.get_num_threads()} threads",
        "load_average_at_start": round(load, 2), "seconds": round(time.perf_counter() - started),
        "rows": rows, "energy_model": energy,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(report, args))
    print(out.with_suffix(".md").read_text())


def _every_token(guard: Guardrail, rail: Rail) -> Rail:
    params = {**rail.source.params.model_dump(), "generated": True}
    source = guard.registry.create("activation_source", rail.plugins["activation_source"], params)
    return dataclasses.replace(rail, source=source)


def _describe(rail: Rail) -> str:
    params = rail.source.params.model_dump()
    where = "every token" if params.get("generated") else "last prompt position"
    steps = rail.steerer.params.model_dump().get("steps")
    return f"{len(rail.layers)} layers x {steps} steps, {where}"


def _time(guard: Guardrail, variants: dict[str, Rail | None], batch: int, new_tokens: int,
          repeats: int, table: str) -> list[dict[str, Any]]:
    model, tokenizer = guard.model, guard.tokenizer
    texts = guard.render(user_turns(PROMPTS[:batch]), steer=False)
    enc = guard.encode(texts)
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "temperature": None, "top_p": None, "top_k": None,
              "pad_token_id": tokenizer.pad_token_id}
    best = {name: float("inf") for name in variants}
    with torch.no_grad():
        model.generate(**enc, **kwargs)  # warm-up
        for _ in range(repeats):
            for name, rail in variants.items():
                start = time.perf_counter()
                if rail is None:
                    out = model.generate(**enc, **kwargs)
                else:
                    with SteeringSession(model, [rail]):
                        out = model.generate(**enc, **kwargs)
                best[name] = min(best[name], time.perf_counter() - start)
                assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
    base = best["unsteered"]
    return [{"table": table, "variant": name, "batch": batch, "seconds": round(t, 3),
             "tokens_per_s": round(batch * new_tokens / t, 2), "ratio": round(base / t, 3)}
            for name, t in best.items()]


def _energy_cost(energy: EnergyModel, hidden: int, iters: int = 200) -> dict[str, Any]:
    """Microseconds per position for one energy-and-gradient evaluation (one steering step)."""
    out = {}
    for n in (1, 8):
        x = torch.randn(n, hidden)
        for name, fn in (("closed form", energy.energy_and_grad),
                         ("autograd", lambda s: EnergyModel.energy_and_grad(energy, s))):
            for _ in range(10):
                fn(x)
            start = time.perf_counter()
            for _ in range(iters):
                fn(x)
            out[f"{name}, {n} position{'s' if n > 1 else ''}"] = round(
                (time.perf_counter() - start) / iters / n * 1e6, 1)
    return out


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# Steering cost (`python bench/steering_cost.py`)", "",
        f"{report['policy']} on {report['model']}, {report['new_tokens']} new tokens per row "
        f"(fixed), best of {report['repeats']} interleaved rounds; {report['machine']}; "
        f"1-minute load average {report['load_average_at_start']} at the start; "
        f"{report['seconds']} s in all. Every row is steered (no gate), as with "
        "`Guardrail.attach`.", "",
        "| variant | batch | seconds | tokens/s | steered / unsteered |", "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if row["table"] == "policy":
            lines.append(f"| {row['variant']} | {row['batch']} | {row['seconds']} | "
                         f"{row['tokens_per_s']} | {row['ratio']:.3f} |")
    lines += ["", f"Grid (every-token steering, batch {args.grid_batch}):", "",
              "| layers x steps | seconds | tokens/s | steered / unsteered |", "|---|---|---|---|"]
    for row in report["rows"]:
        if row["table"] == "grid":
            lines.append(f"| {row['variant']} | {row['seconds']} | {row['tokens_per_s']} | "
                         f"{row['ratio']:.3f} |")
    lines += ["", "Energy model, one energy + gradient evaluation (one steering step), "
              "microseconds per position:", "", "| how | µs |", "|---|---|"]
    lines += [f"| {name} | {us} |" for name, us in report["energy_model"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
