"""Capture speed: one forward pass per batch for every layer vs one pass per layer.

Runs both ways on the same prompts in one process, alternating, and writes bench/capture.md
(and .json): forward passes per batch, prompts/s, and the ratio (expect about the number of
layers). Also times a short labelling generation with capture in its prefill, the way
`guardrail train` captures.

    python bench/capture.py                       # SmolLM2 (30 layers), 32 prompts
    python bench/capture.py --model qwen2.5-coder-0.5b-instruct --prompts 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from guardrail_plugins.residual_stream import ResidualStreamSource
from torch import nn

from guardrail.models import load_model
from guardrail.policy.model import parse_policy
from guardrail.policy.training import LabelSettings
from guardrail.prompts import load_prompts
from guardrail.steering.capture import read_states
from guardrail.steering.generation import user_turns
from guardrail.steering.guard import Guardrail
from guardrail.training.labelling import _label_batch

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "or_bench_hard_train.json"


class PassCounter:
    """Counts forward calls of the whole model (not of its sub-modules)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: Any) -> None:
        self.calls += 1


def one_pass(model: nn.Module, source: ResidualStreamSource, batches: list[dict]) -> torch.Tensor:
    """Every layer's last-token states from one forward pass per batch."""
    found = [read_states(model, source, enc) for enc in batches]
    return torch.cat([torch.stack([f[layer] for layer in sorted(f)], dim=1) for f in found])


def pass_per_layer(model: nn.Module, source: ResidualStreamSource, batches: list[dict]
                   ) -> torch.Tensor:
    """The naive loop: a full forward pass per layer, hooking only that layer."""
    out = []
    for enc in batches:
        per_layer = []
        for module in source.modules(model):
            kept: list[torch.Tensor] = []

            def hook(module: nn.Module, args: Any, output: Any, kept: list = kept) -> None:
                kept.append(source.read(output)[:, -1, :].float().cpu())

            handle = module.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    model(**enc, use_cache=False)
            finally:
                handle.remove()
            per_layer.append(kept[0])
        out.append(torch.stack(per_layer, dim=1))
    return torch.cat(out)


def main() -> None:
    """Measure and write bench/capture.md and bench/capture.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "capture"))
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu")
    guard = Guardrail.from_policy(parse_policy({"name": "bench", "model": {"source": args.model}}),
                                  loaded=loaded)
    source = ResidualStreamSource()
    num_layers = len(source.modules(guard.model))
    prompts = [r.text for r in load_prompts(DATA, sample=args.prompts, seed=0)]
    texts = guard.render(user_turns(prompts), steer=False)
    batches = [guard.encode(texts[i : i + args.batch_size])
               for i in range(0, len(texts), args.batch_size)]

    counter = PassCounter(guard.model)
    times: dict[str, list[float]] = {"one_pass": [], "pass_per_layer": []}
    passes: dict[str, int] = {}
    results: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):  # alternate so machine load hits both alike
        for name, fn in (("one_pass", one_pass), ("pass_per_layer", pass_per_layer)):
            counter.calls = 0
            started = time.perf_counter()
            results[name] = fn(guard.model, source, batches)
            times[name].append(time.perf_counter() - started)
            passes[name] = counter.calls
    same = torch.allclose(results["one_pass"], results["pass_per_layer"], atol=1e-4)

    # Labelling as `guardrail train` runs it: greedy generation, states from its prefill.
    counter.calls = 0
    settings = LabelSettings(max_new_tokens=16, batch_size=args.batch_size)
    started = time.perf_counter()
    prefills = 0
    for i in range(0, len(texts), args.batch_size):
        _, states, _, n = _label_batch(guard, source, texts[i : i + args.batch_size], settings,
                                       "last")
        prefills += n
    label_seconds = time.perf_counter() - started
    counter.handle.remove()

    one, loop = statistics.median(times["one_pass"]), statistics.median(times["pass_per_layer"])
    report = {
        "model": loaded.name, "layers": num_layers, "prompts": len(prompts),
        "batch_size": args.batch_size, "batches": len(batches), "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "forward_passes_per_batch": {k: v / len(batches) for k, v in passes.items()},
        "seconds_median": {"one_pass": round(one, 3), "pass_per_layer": round(loop, 3)},
        "prompts_per_s": {"one_pass": round(len(prompts) / one, 2),
                          "pass_per_layer": round(len(prompts) / loop, 2)},
        "speedup": round(loop / one, 2),
        "states_identical": same,
        "labelling_with_capture": {
            "max_new_tokens": 16, "prefill_passes_per_batch": prefills / len(batches),
            "prompts_per_s": round(len(prompts) / label_seconds, 2),
        },
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(_markdown(report))
    print(_markdown(report))


def _markdown(r: dict[str, Any]) -> str:
    fp, ps, sec = r["forward_passes_per_batch"], r["prompts_per_s"], r["seconds_median"]
    lab = r["labelling_with_capture"]
    rows = "\n".join(
        f"| {label} | {fp[key]:g} | {sec[key]} | {ps[key]} |"
        for key, label in (("one_pass", "one pass, hooks on every layer (`guardrail train`)"),
                           ("pass_per_layer", "one full pass per layer (naive loop)"))
    )
    return f"""# Capture benchmark (`python bench/capture.py`)

{r['model']}, {r['layers']} layers, {r['prompts']} prompts in batches of {r['batch_size']},
last prompt token, CPU ({r['torch_threads']} torch threads), median of {r['repeats']}
alternating runs.

| method | forward passes per batch | seconds | prompts/s |
|---|---|---|---|
{rows}

Speed-up: **{r['speedup']}x** (expected about the number of layers, {r['layers']}).
States identical between the two: {r['states_identical']}.

Labelling as `guardrail train` runs it (greedy, {lab['max_new_tokens']} new tokens, states
taken from the generation's own prefill): {lab['prefill_passes_per_batch']:g} prefill pass per
batch, {lab['prompts_per_s']} prompts/s including generation.
"""


if __name__ == "__main__":
    main()
