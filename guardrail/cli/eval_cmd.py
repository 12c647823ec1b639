"""``guardrail eval``, ``sweep``, ``report`` and ``suites``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from guardrail.cli.arg_types import (
    device,
    grid_of,
    grid_param,
    non_negative_int,
    positive_int,
    seed,
)
from guardrail.cli.executor_options import add_executor_arguments, executor_from
from guardrail.errors import GuardrailError
from guardrail.plugin.defaults import CAPABILITY_SUITE, EVAL_SUITES, FILE_SUITE, SWEEP_SUITES

DATA_HELP = "data folder (default $GUARDRAIL_DATA, else ../shared/data from here or the checkout)"
CACHE_HELP = "cache root (default $GUARDRAIL_CACHE_DIR or ~/.cache/guardrail)"


def add_parser(subparsers: Any) -> None:
    """Register ``eval``, ``sweep``, ``report`` and ``suites``."""
    ev = subparsers.add_parser("eval", help="compare policies with the base model on suites")
    _common(ev)
    ev.add_argument("--no-base", action="store_true", help="leave the unsteered base model out")
    ev.add_argument("--save-generations", action="store_true",
                    help="write every prompt/answer pair to OUT/generations/SUITE/POLICY.jsonl")
    ev.add_argument("--kl-prompts", type=non_negative_int, default=0, metavar="N",
                    help=f"capability guard: KL on N {CAPABILITY_SUITE} prompts (0: off)")
    ev.add_argument("--kl-max-new-tokens", type=positive_int, default=32)
    add_executor_arguments(ev)
    ev.set_defaults(func=run_eval, out="reports/eval")

    sw = subparsers.add_parser("sweep", help="trade-off curve over the steerers' tunable params")
    _common(sw, suites=SWEEP_SUITES)
    sw.add_argument("--grid", type=grid_param, action="append", metavar="NAME=V1,V2",
                    help="a steerer param and the values to sweep, e.g. NAME=0.1,1; repeatable "
                    "(every combination is a point; each policy's steerers take the params "
                    "they declare tunable; none: each policy is one point)")
    sw.set_defaults(func=run_sweep, out="reports/sweep")

    rep = subparsers.add_parser("report", help="regenerate a results page from a config file")
    rep.add_argument("--config", required=True, help="YAML config, e.g. bench/results.yaml")
    rep.add_argument("--limit", type=positive_int, help="override the config's per-suite limit")
    rep.add_argument("--kl-prompts", type=non_negative_int,
                     help="override the config's KL prompt count")
    rep.add_argument("--grid", type=grid_param, action="append", metavar="NAME=V1,V2",
                     help="override the config's sweep values of one param, e.g. NAME=0.1,1; "
                     "repeatable")
    rep.add_argument("--progress", action="store_true", help="show progress bars")
    rep.set_defaults(func=run_report)

    su = subparsers.add_parser("suites", help="list registered evaluation suites as JSON")
    su.add_argument("--data-dir", help=DATA_HELP)
    su.set_defaults(func=run_suites)


def _common(parser: argparse.ArgumentParser, suites: tuple[str, ...] = EVAL_SUITES) -> None:
    parser.add_argument("--policy", action="append", required=True, metavar="POLICY",
                        help="policy file or shipped policy name; repeat to compare several")
    parser.add_argument("--suite", action="append", metavar="SUITE",
                        help=f"suite name or PATH[:benign|:harmful]; repeatable "
                             f"(default {' '.join(suites)})")
    parser.set_defaults(default_suites=list(suites))
    parser.add_argument("--limit", type=positive_int, help="seeded sample of N items per suite")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--data-dir", help=DATA_HELP)
    parser.add_argument("--max-new-tokens", type=positive_int, default=48,
                        help="answer length (default 48; refusals show early)")
    parser.add_argument("--batch-size", type=positive_int, help="override the policy's batch size")
    parser.add_argument("--classifier", help="score every policy with this refusal classifier")
    parser.add_argument("--out", help="output folder (eval: reports/eval, sweep: reports/sweep)")
    parser.add_argument("--cache-dir", help=CACHE_HELP)
    parser.add_argument("--no-cache", action="store_true", help="generate everything afresh")
    parser.add_argument("--device", type=device, help="auto, cpu, cuda (overrides the policies)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def _grid(args: argparse.Namespace) -> dict[str, list[Any]]:
    try:
        return dict(grid_of(args.grid))
    except argparse.ArgumentTypeError as exc:
        raise GuardrailError(str(exc)) from None


def _command() -> str:
    return "guardrail " + shlex.join(sys.argv[1:])


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    """Suites first (bad names fail before a model loads), then guards, settings, cache."""
    from guardrail.evaluation.cache import GenerationCache, default_cache_path
    from guardrail.evaluation.runner import load_guards
    from guardrail.evaluation.suites import load_suite
    from guardrail.plugin.manager import get_plugin_manager
    from guardrail.plugin.registry import Registry
    from guardrail.prompts import resolve_data_dir

    registry = Registry.from_plugin_manager(get_plugin_manager())
    data_dir = resolve_data_dir(args.data_dir)
    suites = [load_suite(name, registry, data_dir=data_dir, limit=args.limit, seed=args.seed)
              for name in (args.suite or args.default_suites)]
    classifier = None
    if args.classifier:
        classifier = registry.create("refusal_classifier", args.classifier, {})
    guards = load_guards(args.policy, device=args.device)
    updates: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.batch_size:
        updates["batch_size"] = args.batch_size
    settings = guards[0].policy.generation.model_copy(update=updates)
    cache = GenerationCache(None if args.no_cache else default_cache_path(args.cache_dir))
    return {"registry": registry, "data_dir": data_dir, "suites": suites, "guards": guards,
            "settings": settings, "cache": cache, "classifier": classifier}


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, print the side-by-side table, write report.json/report.md (and generations)."""
    from guardrail.evaluation.kl import capability_guard
    from guardrail.evaluation.report import (
        build_report,
        console,
        write_generations,
        write_report,
    )
    from guardrail.evaluation.runner import contenders_for, evaluate
    from guardrail.evaluation.suites import load_suite

    env = _setup(args)
    contenders = contenders_for(env["guards"], base=not args.no_base)
    with executor_from(args, env["guards"][0].policy):
        results = evaluate(contenders, env["suites"], env["settings"], env["cache"],
                           classifier=env["classifier"], progress=args.progress)
    kl = None
    if args.kl_prompts:
        harmless = load_suite(CAPABILITY_SUITE, env["registry"], data_dir=env["data_dir"],
                              limit=args.kl_prompts, seed=args.seed)
        kl_settings = env["settings"].model_copy(update={"max_new_tokens": args.kl_max_new_tokens})
        kl = capability_guard(contenders, [i.prompt for i in harmless.items], kl_settings,
                              env["cache"], progress=args.progress)
    report = build_report(results, contenders, settings=_settings(args, env), command=_command(),
                          kl=kl)
    json_path, md_path = write_report(report, args.out)
    print(console(report))
    print(f"wrote {json_path} and {md_path}")
    roc = _gate_roc(results, Path(args.out) / "gate_roc.png")
    if roc is not None:
        print(f"gate ROC: {roc}")
    if args.save_generations:
        paths = write_generations(results, args.out)
        print(f"wrote {len(paths)} generation files under {Path(args.out) / 'generations'}")
    return 0


def _gate_roc(results: Any, path: Path) -> Path | None:
    """The gated policies' ROC per suite (None without matplotlib or without a gate)."""
    from guardrail.errors import GuardrailError
    from guardrail.evaluation.plots import plot_gate_roc

    suites = [{"name": r.suite.name, "rows": [row.to_dict(records=True) for row in r.rows]}
              for r in results]
    try:
        return plot_gate_roc({"suites": suites}, path)
    except GuardrailError:
        return None


def _settings(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    return {**env["settings"].model_dump(), "limit": args.limit, "seed": args.seed,
            "data_dir": str(env["data_dir"]),
            "classifier": args.classifier or env["guards"][0].policy.classifier.plugin}


def run_sweep(args: argparse.Namespace) -> int:
    """Sweep the grid for every policy; write sweep.json, sweep.md and sweep.png."""
    from guardrail.evaluation.report import write_sweep
    from guardrail.evaluation.sweep import run_sweep as sweep
    from guardrail.evaluation.sweep import sweep_table

    env = _setup(args)
    points, _ = sweep(env["guards"], env["suites"], env["settings"], env["cache"],
                      grid=_grid(args), progress=args.progress)
    paths = write_sweep(points, args.out)
    print(sweep_table(points))
    print(f"wrote {paths['table']}, {paths['json']} and {paths['plot']}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Run everything a results config asks for and write its Markdown page and figures."""
    from guardrail.evaluation.results import build_results

    page = build_results(args.config, limit=args.limit, kl_prompts=args.kl_prompts,
                         sweep_grid=_grid(args), invocation=_command(),
                         progress=args.progress)
    print(f"wrote {page}")
    return 0


def run_suites(args: argparse.Namespace) -> int:
    """Print each registered suite with its item counts (or the error loading it)."""
    from guardrail.evaluation.suites import load_suite
    from guardrail.plugin.manager import get_plugin_manager
    from guardrail.plugin.registry import Registry

    registry = Registry.from_plugin_manager(get_plugin_manager())
    rows = []
    for name in registry.names("suite"):
        entry = registry.get("suite", name)
        row: dict[str, Any] = {"name": name, "plugin": entry.plugin, "aliases": list(entry.aliases)}
        if name != FILE_SUITE:
            try:
                suite = load_suite(name, registry, data_dir=args.data_dir)
                row.update(items=len(suite.items), benign=suite.benign, harmful=suite.harmful)
            except GuardrailError as exc:
                row["error"] = str(exc)
        rows.append(row)
    print(json.dumps(rows, indent=2))
    return 0

