"""The gated path's cost: steered / unsteered tokens/s of the shipped gated policy through the
public API, with the gate's own cost broken out, in one run.

``Guardrail.from_policy(POLICY).generate(prompts, steer=...)`` at batch 1 and 8, greedy:

- ``unsteered``: ``steer=False`` (no gate, no hooks);
- ``gated (shipped)``: ``steer=True``: the gate scores the batch, then generation runs with
  the steering hooks on the rows the gate lets through;
- ``steered, no gate``: ``gates=False``: every row steered on the rail's default side, no
  gate scoring (the steering cost alone);
- ``gate alone``: ``Guardrail.gate`` on the encoded batch: its members' encoder passes and,
  for members that read the model's own states, the partial prefill up to the deepest layer
  they read (the shipped gate's only member is text-only: no partial prefill).

Variants run interleaved (each round runs every variant once, so a busy machine slows them
alike) and the best of ``--repeats`` rounds is kept. tokens/s counts the tokens each call
returned (answers may end early at end of sequence; the same prompts, greedy, give the same
lengths unless steering changes an answer, which the table shows).

    python bench/gated_path.py                                   # packaged Qwen, 32 tokens
    python bench/gated_path.py --policy eds-smollm2-135m --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from guardrail.steering.generation import last_user, user_turns
from guardrail.steering.guard import Guardrail

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# The prompts of bench/steering_cost.py (ordinary, none from the evaluation sets).
from steering_cost import PROMPTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="eds-qwen2.5-coder-0.5b")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", default=str(HERE / "gated_path"))
    args = parser.parse_args()
    started = time.perf_counter()
    load = os.getloadavg()[0]
    guard = Guardrail.from_policy(args.policy)
    gated = [r for r in guard.rails if r.gate is not None]
    if not gated:
        raise SystemExit(f"{args.policy}: no rail has a gate; nothing to measure")
    num_layers = int(guard.fingerprint.get("num_layers") or 0)
    state_layers = sorted({layer for rail in gated
                           for layer in rail.gate.state_layers(num_layers)})  # type: ignore[union-attr]

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        convs = user_turns(PROMPTS[:batch])
        enc = guard.encode(guard.render(convs, steer=True))
        prompts = [last_user(c) for c in convs]
        calls = {
            "unsteered": lambda c=convs: guard.generate(c, steer=False,
                                                        max_new_tokens=args.new_tokens),
            "gated (shipped)": lambda c=convs: guard.generate(c, steer=True,
                                                              max_new_tokens=args.new_tokens),
            "steered, no gate": lambda c=convs: guard.generate(c, steer=True, gates=False,
                                                               max_new_tokens=args.new_tokens),
        }
        best: dict[str, tuple[float, Any]] = {}
        gate_best = float("inf")
        for call in calls.values():  # warm-up
            call()
        for _ in range(args.repeats):
            for name, call in calls.items():
                began = time.perf_counter()
                out = call()
                seconds = time.perf_counter() - began
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, out)
            began = time.perf_counter()
            with torch.no_grad():
                decisions = guard.gate(prompts, enc)
            gate_best = min(gate_best, time.perf_counter() - began)
        base_seconds, base_out = best["unsteered"]
        base_tokens = sum(len(r.token_ids) for r in base_out)
        for name, (seconds, out) in best.items():
            tokens = sum(len(r.token_ids) for r in out)
            rows.append({
                "batch": batch, "variant": name, "seconds": round(seconds, 3),
                "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
                "ratio": round((tokens / seconds) / (base_tokens / base_seconds), 3),
                "rows_steered": sum(bool(r.telemetry.steered) for r in out),
                "answers_changed": sum(a.text != b.text for a, b in zip(out, base_out,
                                                                         strict=True)),
            })
        sides = {name: {side: int(mask.sum()) for side, mask in d[1].items()}
                 for name, d in decisions.items()}
        rows.append({"batch": batch, "variant": "gate alone", "seconds": round(gate_best, 3),
                     "share_of_unsteered_call": round(gate_best / base_seconds, 3),
                     "sides": sides})
        print(rows[-4:], flush=True)

    report = {
        "policy": guard.policy.name, "model": guard.loaded.name, "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "gate_members": [m.plugin for r in gated for m in r.gate.members],  # type: ignore[union-attr]
        "gate_state_layers": state_layers,
        "machine": f"{platform.machine()} with {os.cpu_count()} CPUs, torch "
                   f"{torch.__version__}, {torch.get_num_threads()} threads",
        "load_average_at_start": round(load, 2), "seconds": round(time.perf_counter() - started),
        "rows": rows,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(out.with_suffix(".md").read_text())


def markdown(report: dict[str, Any]) -> str:
    """The committed table."""
    prefill = ("none (no member reads the model's states)" if not report["gate_state_layers"]
               else f"layers up to {max(report['gate_state_layers'])}")
    lines = [
        "# The gated path's cost (`python bench/gated_path.py`)", "",
        f"{report['policy']} on {report['model']} through `Guardrail.generate`, "
        f"{report['new_tokens']} new tokens at most, greedy, best of {report['repeats']} "
        f"interleaved rounds; {report['machine']}; 1-minute load average "
        f"{report['load_average_at_start']} at the start; {report['seconds']} s in all. Gate "
        f"members: {', '.join(report['gate_members'])}; partial prefill: {prefill}.", "",
        "| batch | variant | seconds | tokens | tokens/s | / unsteered | rows steered | "
        "answers changed |", "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["variant"] == "gate alone":
            lines.append(f"| {r['batch']} | gate alone (`Guardrail.gate`) | {r['seconds']} | | | "
                         f"{r['share_of_unsteered_call']} of the unsteered call | "
                         f"sides {r['sides']} | |")
        else:
            lines.append(f"| {r['batch']} | {r['variant']} | {r['seconds']} | {r['tokens']} | "
                         f"{r['tokens_per_s']} | {r['ratio']} | {r['rows_steered']} | "
                         f"{r['answers_changed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
