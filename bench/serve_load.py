"""Serving load: batched vs one-request-at-a-time, at concurrency 1, 4 and 16, in one run.

Starts `guardrail serve` twice on 127.0.0.1 (never any other address) with the same policy:
once batching concurrent requests (--max-batch-size 16), once with --max-batch-size 1. Each
sends a bounded number of greedy requests per concurrency level and reports requests/s,
p50/p99 latency, completion tokens/s, the mean batch size the server reported, errors and
lost requests (sent but never answered). Writes bench/serve_load.md.

    python bench/serve_load.py                               # SmolLM2 EDS policy
    python bench/serve_load.py --requests-per-level 8 --max-tokens 16   # quicker

When the policy's trained artifact is missing, a stand-in with random weights at the same
size is written to a temporary directory, so steering costs what it would; the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from guardrail.serving.process import ServerStartError, free_port, serve_command, start_serving

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_POLICY = ROOT / "policies" / "eds-smollm2-135m.yaml"
DATA = ROOT.parent / "shared" / "data" / "harmless_val.json"
HOST = "127.0.0.1"  # loopback only, by design
STAND_IN_LAYERS = [10, 15, 20]
FALLBACK_PROMPTS = [
    "Give three tips for staying healthy.", "Describe the water cycle.",
    "Name three famous painters.", "Explain what a compiler does.",
]


@dataclass
class Level:
    """What one (mode, concurrency) run measured."""

    mode: str
    concurrency: int
    sent: int = 0
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Requests sent that got neither an answer nor an error."""
        return self.sent - self.ok - self.errors

    def row(self) -> dict[str, Any]:
        """The figures for the report."""
        lat = sorted(self.latencies_ms)
        return {
            "mode": self.mode, "concurrency": self.concurrency, "requests": self.sent,
            "ok": self.ok, "errors": self.errors, "lost": self.lost,
            "seconds": round(self.seconds, 2),
            "requests_per_s": round(self.ok / self.seconds, 3) if self.seconds else 0.0,
            "p50_ms": round(statistics.median(lat), 1) if lat else None,
            "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
            "tokens_per_s": (round(self.completion_tokens / self.seconds, 2)
                             if self.seconds else 0.0),
            "mean_batch": (round(statistics.mean(self.batch_sizes), 2)
                           if self.batch_sizes else None),
        }


def prompts(count: int) -> list[str]:
    """The first ``count`` benign instructions of the Alpaca validation split (or a fallback)."""
    if DATA.is_file():
        items = [row["instruction"] for row in json.loads(DATA.read_text())[: count]]
    else:
        items = FALLBACK_PROMPTS
    return [items[i % len(items)] for i in range(count)]


def stand_in_policy(policy: Path, directory: Path) -> tuple[Path, str]:
    """The policy as is when its artifacts exist; else a copy using random-weight artifacts."""
    from guardrail.policy.artifacts import missing_artifacts
    from guardrail.policy.model import load_raw, parse_policy

    raw = load_raw(policy)
    if not missing_artifacts(parse_policy(raw, policy)):
        return policy, "trained artifact"
    import torch

    from guardrail.artifact.energy import EnergyArtifact
    from guardrail.models import load_model, model_fingerprint
    from guardrail.plugin.manager import get_plugin_manager
    from guardrail.plugin.registry import Registry

    registry = Registry.from_plugin_manager(get_plugin_manager())
    loaded = load_model(raw["model"]["source"], device="cpu")
    fingerprint = model_fingerprint(loaded.model, loaded.name)
    hidden = loaded.model.config.hidden_size
    torch.manual_seed(0)
    for index, rail in enumerate(raw.get("rails", [])):
        spec = rail.get("energy_model")
        if not spec:
            continue
        cls = registry.get("energy_model", spec.get("plugin", "mlp")).cls
        params = cls.Params.model_validate(spec.get("params", {}))
        layers = rail["layers"] if isinstance(rail.get("layers"), list) else STAND_IN_LAYERS
        models = {layer: cls.build(hidden, params).eval() for layer in layers}
        path = directory / f"stand-in-{index}.safetensors"
        EnergyArtifact(plugin=cls.name, fingerprint=fingerprint, models=models,
                       metadata={"note": "random weights for bench/serve_load.py"}).save(path)
        spec["artifact"] = str(path)
    out = directory / "policy.yaml"
    out.write_text(json.dumps(raw, indent=2))
    return out, f"stand-in artifact with random weights at layers {STAND_IN_LAYERS}"


def start(policy: Path, port: int, max_batch: int, threads: int, log: Path
          ) -> subprocess.Popen[bytes]:
    """`guardrail serve` on the loopback address; returns once /healthz answers."""
    command = serve_command("--log-level", "WARNING", "serve", "--policy", str(policy),
                            "--host", HOST, "--port", str(port), "--max-batch-size",
                            str(max_batch), "--threads", str(threads), "--max-queue", "64")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    try:
        return start_serving(command, port, log, env=env, timeout=300, host=HOST)
    except ServerStartError as exc:
        raise SystemExit(str(exc)) from None


async def run_level(url: str, model: str, level: Level, texts: list[str], max_tokens: int,
                    budget_s: float) -> None:
    """Send ``texts``, ``level.concurrency`` at a time; stop sending once the budget is spent."""
    queue = list(enumerate(texts))
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=level.concurrency + 2)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue and time.perf_counter() - started < budget_s:
            _, text = queue.pop(0)
            level.sent += 1
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": text}],
                    "guardrail": {"classify": False}}
            sent_at = time.perf_counter()
            try:
                response = await client.post(f"{url}/chat/completions", json=body)
            except httpx.HTTPError as exc:
                level.errors += 1
                level.error_samples.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code != 200:
                level.errors += 1
                level.error_samples.append(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            level.ok += 1
            level.latencies_ms.append((time.perf_counter() - sent_at) * 1000)
            level.completion_tokens += response.json()["usage"]["completion_tokens"]
            level.batch_sizes.append(int(response.headers["x-guardrail-batch-size"]))

    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*[worker(client) for _ in range(level.concurrency)])
    level.seconds = time.perf_counter() - started


MODES = {"batched": 16, "one-at-a-time": 1}  # mode -> --max-batch-size


def run_all(policy: Path, model: str, args: argparse.Namespace, logs: Path) -> list[Level]:
    """Start one server per mode, warm both up, then run each concurrency level on both,
    back to back, so a change in the shared machine's load hits both modes alike."""
    processes, urls = [], {}
    try:
        for mode, max_batch in MODES.items():
            port = _free_port()
            processes.append(start(policy, port, max_batch, args.threads, logs / f"{mode}.log"))
            urls[mode] = f"http://{HOST}:{port}/v1"
            warm = Level(mode, 1)
            asyncio.run(run_level(urls[mode], model, warm, prompts(2), args.max_tokens,
                                  args.budget_s))
        levels = []
        for concurrency in args.concurrency:
            count = max(args.requests_per_level, concurrency * 2)
            for mode in MODES:
                level = Level(mode, concurrency)
                asyncio.run(run_level(urls[mode], model, level, prompts(count), args.max_tokens,
                                      args.budget_s))
                print(json.dumps(level.row()), flush=True)
                levels.append(level)
        return levels
    finally:
        for process in processes:
            process.terminate()
            process.wait(60)


def _free_port() -> int:
    return free_port(HOST)


def report(levels: list[Level], args: argparse.Namespace, policy_note: str, model: str,
           wall_s: float) -> str:
    """The markdown written to bench/serve_load.md."""
    import torch

    rows = [level.row() for level in levels]
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    lines = [
        "# Serving load: batched vs one request at a time",
        "",
        f"Generated by `python bench/serve_load.py` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC ({wall_s:.0f} s). Both servers run "
        "in the same run on the same machine, on 127.0.0.1; each concurrency level runs on "
        "both back to back.",
        "",
        f"- policy `{model}` ({policy_note}); greedy, max_tokens {args.max_tokens}, "
        f"classifier off (`guardrail.classify: false`), prompts from Alpaca `harmless_val.json`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other work), torch "
        f"{torch.__version__}, `--threads {args.threads}`",
        "- batched: `--max-batch-size 16`; one at a time: `--max-batch-size 1`; "
        f"{args.requests_per_level}+ requests per level (at least 2 x concurrency), "
        f"{args.budget_s:g} s budget per level",
        "",
        "| mode | concurrency | requests | ok | errors | lost | req/s | p50 ms | p99 ms | "
        "tokens/s | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["mode"] != "batched", r["concurrency"])):
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['ok']} | "
                     f"{r['errors']} | {r['lost']} | {r['requests_per_s']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['tokens_per_s']} | {r['mean_batch']} |")
    lines += ["", "Batched / one-at-a-time, same run:", "",
              "| concurrency | req/s ratio | tokens/s ratio | p50 latency ratio |",
              "|---|---|---|---|"]
    for concurrency in args.concurrency:
        b, o = by.get(("batched", concurrency)), by.get(("one-at-a-time", concurrency))
        if not (b and o and o["requests_per_s"] and o["tokens_per_s"] and o["p50_ms"]):
            continue
        lines.append(f"| {concurrency} | {b['requests_per_s'] / o['requests_per_s']:.2f}x | "
                     f"{b['tokens_per_s'] / o['tokens_per_s']:.2f}x | "
                     f"{b['p50_ms'] / o['p50_ms']:.2f}x |")
    if 1 in args.concurrency:
        lines += ["", "At concurrency 1 both modes do the same work (a batch of one), so their "
                  "ratio shows this shared machine's run-to-run noise, not an effect of batching."]
    total_errors = sum(r["errors"] for r in rows)
    total_lost = sum(r["lost"] for r in rows)
    lines += ["", f"Errors: {total_errors}. Lost requests: {total_lost}."]
    samples = [s for level in levels for s in level.error_samples][:5]
    if samples:
        lines += ["", "First errors:", "", *[f"- `{s}`" for s in samples]]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run both modes and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", type=Path, default=DEFAULT_POLICY)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-level", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="stop sending new requests at a level after this many seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--output", type=Path, default=HERE / "serve_load.md")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        policy, note = stand_in_policy(args.policy, Path(tmp))
        from guardrail.policy.model import load_policy

        model = load_policy(policy).name
        levels = run_all(policy, model, args, Path(tmp))
    text = report(levels, args, note, model, time.perf_counter() - started)
    args.output.write_text(text)
    print(text)
    return 0 if all(level.errors == 0 and level.lost == 0 for level in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
