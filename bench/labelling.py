"""Labelling throughput: prompts/s of `guardrail train`'s labelling pass, against the
machine's matmul peak, and on 1 vs 2 local Ray workers, in one run.

Every variant labels the same prompts (the policy's training sources, seeded sample) into a
fresh state cache with the policy's label settings, after a warm-up batch on a disjoint set
of prompts (models loaded, actors started), so the timed part is generation and capture:

- ``local``: the single-process path, torch with every core (and with 1 thread: on a
  machine another process keeps busy, one thread per process is often faster);
- ``ray x1`` and ``ray x2``: the ``ray`` executor with one and two actors of one CPU each
  (the ratio a user can expect from N workers where the work is CPU bound is this one).

The matmul peak is a float32 ``torch.mm`` of two 2048 x 2048 matrices with every core, best of
10. The model's achieved FLOP/s counts 2 x (parameters used per token) per processed token:
every padded prompt position in the prefill and every row at every decoding step (rows that
stopped still run), attention scores left out (short prompts), the tied output projection
counted, the embedding lookup not.

    python bench/labelling.py                                 # SmolLM2 EDS policy, 64 prompts
    python bench/labelling.py --prompts 32 --max-new-tokens 8 # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """Best float32 matmul FLOP/s with ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def flops_per_token(model: Any) -> float:
    """2 x the parameters a token's forward pass multiplies by (tied output projection in)."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    used = total - embedding.numel() + (embedding.numel() if tied else 0)
    return 2.0 * used


def processed_tokens(guard: Any, texts: list[str], batch_size: int, new_tokens: int) -> int:
    """Positions the labelling pass computes: padded prefills, then every row per step."""
    from guardrail.training.cache import prompt_key

    lengths = {prompt_key(t): len(guard.tokenizer(t, add_special_tokens=False)["input_ids"])
               for t in texts}
    order = sorted(lengths, key=lambda k: (-lengths[k], k))
    total = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        total += len(batch) * (max(lengths[k] for k in batch) + new_tokens)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="eds-smollm2-135m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(HERE / "labelling"))
    args = parser.parse_args()
    started_all = time.perf_counter()

    from guardrail.distributed import open_executor
    from guardrail.distributed.executor import LocalExecutor, using
    from guardrail.policy.executor import ExecutorSettings
    from guardrail.policy.model import load_policy
    from guardrail.training.cache import StateCache, weights_digest
    from guardrail.training.labelling import generate_and_capture
    from guardrail.training.pipeline import Session
    from guardrail.training.sources import load_prompt_sets

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    peak = matmul_peak(cores)
    policy = load_policy(args.policy)
    assert policy.training is not None
    section = policy.training.model_copy(update={"labels": policy.training.labels.model_copy(
        update={"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size})})
    policy = policy.model_copy(update={"training": section})
    sets = load_prompt_sets(section, train_total=args.prompts + 2 * args.batch_size)
    everything = [*sets.train, *sets.val]
    warm, timed = everything[: 2 * args.batch_size], everything[2 * args.batch_size :]
    timed = timed[: args.prompts]
    session = Session(policy, next(r for r in policy.rails if r.energy_model is not None))
    guard, source = session.guard, session.source
    texts = guard.render([[{"role": "user", "content": p.text}] for p in timed], steer=False)
    tokens = processed_tokens(guard, texts, args.batch_size, args.max_new_tokens)
    per_token = flops_per_token(guard.model)

    rows: list[dict[str, Any]] = []
    variants: list[tuple[str, Any]] = [
        ("local", LocalExecutor()),
        ("local, 1 thread", LocalExecutor()),
        ("ray x1", open_executor(ExecutorSettings(kind="ray", workers=1))),
        ("ray x2", open_executor(ExecutorSettings(kind="ray", workers=2))),
    ]
    for name, executor in variants:
        torch.set_num_threads(1 if name == "local, 1 thread" else cores)
        with tempfile.TemporaryDirectory() as tmp, using(executor):
            def cache(sub: str) -> StateCache:
                return StateCache(Path(tmp) / sub, session.fingerprint,
                                  weights_digest(guard.model), positions="last",
                                  max_new_tokens=args.max_new_tokens,
                                  mean_states=session.cache.mean_states)
            generate_and_capture(guard, source, warm, cache("warm"), section.labels)
            began = time.perf_counter()
            stats = generate_and_capture(guard, source, timed, cache("timed"), section.labels)
            seconds = time.perf_counter() - began
        achieved = tokens * per_token / seconds
        rows.append({"variant": name, "prompts": stats.generated, "seconds": round(seconds, 2),
                     "prompts_per_s": round(stats.generated / seconds, 3),
                     "model_gflops": round(achieved / 1e9, 2),
                     "of_matmul_peak": round(achieved / peak, 3)})
        print(rows[-1], flush=True)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    by = {r["variant"]: r for r in rows}
    report = {
        "policy": policy.name, "model": guard.loaded.name, "prompts": len(timed),
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "processed_tokens": tokens, "gflop_per_token": round(per_token / 1e9, 3),
        "matmul_peak_gflops": round(peak / 1e9, 1), "cores": cores,
        "machine": f"{platform.machine()} with {cores} CPUs, torch {torch.__version__}",
        "load_average": round(load, 2), "rows": rows,
        "ray_x2_over_x1": round(by["ray x2"]["prompts_per_s"] / by["ray x1"]["prompts_per_s"], 3),
        "ray_x2_over_local": round(by["ray x2"]["prompts_per_s"] / by["local"]["prompts_per_s"],
                                   3),
        "seconds": round(time.perf_counter() - started_all, 1),
    }
    write(report, Path(args.out))


def write(report: dict[str, Any], out: Path) -> None:
    """``out.json`` and ``out.md``."""
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Labelling throughput (`python bench/labelling.py`)", "",
        f"{report['policy']} on {report['model']}: {report['prompts']} training prompts, "
        f"{report['max_new_tokens']} new tokens, batches of {report['batch_size']} "
        f"({report['processed_tokens']} processed positions, "
        f"{report['gflop_per_token']} GFLOP each); {report['machine']}; 1-minute load average "
        f"{report['load_average']} at the start; {report['seconds']} s in all. Matmul peak "
        f"(float32 2048^2 torch.mm, every core): {report['matmul_peak_gflops']} GFLOP/s.", "",
        "| variant | seconds | prompts/s | model GFLOP/s | of matmul peak |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['variant']} | {r['seconds']} | {r['prompts_per_s']} | {r['model_gflops']} "
              f"| {r['of_matmul_peak']} |" for r in report["rows"]]
    lines += ["", f"2 Ray workers / 1 Ray worker: **{report['ray_x2_over_x1']}**; "
              f"2 Ray workers / local: {report['ray_x2_over_local']}.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
