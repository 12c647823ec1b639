"""`guardrail serve` against plain `model.generate` on the same batches, in one run.

For each concurrency c (1, 4, 16) the same 2c prompts (at least 4) are answered twice:

- by `guardrail serve` (the policy's rails and gate on, batching up to 16 concurrent
  requests), c requests in flight at a time from an HTTP client on the loopback address;
- by the policy's model alone in this process: chat template, left padding, greedy
  `model.generate` on batches of c prompts, no steering, no gate, no HTTP.

tokens/s counts the completion tokens each answer returned (up to the end-of-sequence
token) per second of wall time; the ratio is served / plain. The server runs first, then is
stopped, then the plain model runs with the same number of torch threads, so the two never
compete for the CPU.

    python bench/serve_vs_generate.py                       # SmolLM2 EDS policy, 32 tokens
    python bench/serve_vs_generate.py --max-tokens 16 --concurrency 1,4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_load import Level, _free_port, prompts, run_level, start  # noqa: E402


def plain_generate(policy: str, texts: list[str], batch: int, max_tokens: int, threads: int
                   ) -> tuple[float, int]:
    """Seconds and completion tokens for ``texts`` in batches of ``batch`` (greedy)."""
    import torch

    from guardrail.steering.generation import cut_at_eos, eos_ids, user_turns

    torch.set_num_threads(threads)
    guard = _guard(policy)
    model, tokenizer = guard.model, guard.tokenizer
    eos = eos_ids(model, tokenizer)
    rendered = guard.render(user_turns(texts), steer=False)
    tokens = 0
    began = time.perf_counter()
    for start_at in range(0, len(rendered), batch):
        enc = guard.encode(rendered[start_at : start_at + batch])
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            tokens += len(cut_at_eos(row, eos)[0])
    return time.perf_counter() - began, tokens


_guards: dict[str, Any] = {}


def _guard(policy: str) -> Any:
    from guardrail.steering.guard import Guardrail

    if policy not in _guards:
        _guards[policy] = Guardrail.from_policy(policy)
    return _guards[policy]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="eds-smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(HERE / "serve_vs_generate"))
    args = parser.parse_args()
    started = time.perf_counter()
    load = os.getloadavg()[0]
    levels = [int(c) for c in args.concurrency.split(",")]
    served: dict[int, Level] = {}
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        process = start(Path(args.policy), port, 16, args.threads, Path(tmp) / "serve.log")
        url = f"http://127.0.0.1:{port}/v1"
        try:
            asyncio.run(run_level(url, args.policy, Level("warm", 1), prompts(2),
                                  args.max_tokens, 600))
            for c in levels:
                level = Level("served", c)
                asyncio.run(run_level(url, args.policy, level, prompts(max(4, 2 * c)),
                                      args.max_tokens, 3600))
                served[c] = level
                print(json.dumps(level.row()), flush=True)
        finally:
            process.terminate()
            process.wait(60)
    plain_generate(args.policy, prompts(2), 1, args.max_tokens, args.threads)  # warm-up
    rows = []
    for c in levels:
        seconds, tokens = plain_generate(args.policy, prompts(max(4, 2 * c)), c, args.max_tokens,
                                         args.threads)
        level = served[c]
        served_rate = level.completion_tokens / level.seconds
        plain_rate = tokens / seconds
        rows.append({"concurrency": c, "prompts": max(4, 2 * c),
                     "served_seconds": round(level.seconds, 2),
                     "served_tokens": level.completion_tokens,
                     "served_tokens_per_s": round(served_rate, 2),
                     "served_mean_batch": round(sum(level.batch_sizes) /
                                                max(len(level.batch_sizes), 1), 2),
                     "served_errors": level.errors,
                     "plain_seconds": round(seconds, 2), "plain_tokens": tokens,
                     "plain_tokens_per_s": round(plain_rate, 2),
                     "ratio": round(served_rate / plain_rate, 3)})
        print(rows[-1], flush=True)
    import torch

    report = {"policy": args.policy, "max_tokens": args.max_tokens, "threads": args.threads,
              "machine": f"{platform.machine()} with {os.cpu_count()} CPUs, torch "
                         f"{torch.__version__}",
              "load_average_at_start": round(load, 2),
              "seconds": round(time.perf_counter() - started), "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# `guardrail serve` against plain `model.generate` (`python bench/serve_vs_generate.py`)",
        "",
        f"{report['policy']}, {report['max_tokens']} tokens at most, greedy, {args.threads} "
        f"torch threads; {report['machine']}; 1-minute load average "
        f"{report['load_average_at_start']} at the start; {report['seconds']} s in all. Served: "
        "rails and gate on, HTTP on the loopback address, batches up to 16. Plain: the model's "
        "`generate` on batches of c, no steering.", "",
        "| concurrency | prompts | served tokens/s | mean batch | plain tokens/s | "
        "served / plain |", "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['concurrency']} | {r['prompts']} | {r['served_tokens_per_s']} | "
              f"{r['served_mean_batch']} | {r['plain_tokens_per_s']} | {r['ratio']} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
