"""``guardrail calibrate``: choose the steering strength and gate thresholds under the policy's
safety budget, and store them in the rail's artifact."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from guardrail.cli.arg_types import device
from guardrail.cli.executor_options import add_executor_arguments, executor_from
from guardrail.policy.model import load_policy


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``calibrate``."""
    cal = subparsers.add_parser(
        "calibrate", help="choose the steerer's tunable params and the gate thresholds under "
        "the safety budget",
        description="Answer the policy's validation prompts with the base model and with every "
        "row steered at each grid strength, then pick the strength and gate thresholds that "
        "answer the most benign prompts while every harmful source keeps its refusal within "
        "calibration.max_refusal_drop of the base model's and no source has more than "
        "calibration.max_wrong_way of its prompts flipped the wrong way. Writes the choice into "
        "the rail's artifact (the rail reads it at load time).",
    )
    cal.add_argument("--policy", required=True, help="policy with a gated, trained rail")
    cal.add_argument("--dry-run", action="store_true", help="report, but leave the artifact")
    cal.add_argument("--limit", type=int, metavar="N",
                     help="at most N prompts per validation source (a quick look)")
    cal.add_argument("--cache-dir", help="cache root (default $GUARDRAIL_CACHE_DIR or "
                     "~/.cache/guardrail)")
    cal.add_argument("--device", type=device, help="auto, cpu, cuda (overrides the policy)")
    cal.add_argument("--plot", metavar="PATH", help="trade-off plot (default: next to the "
                     "artifact, .calibration.png)")
    cal.add_argument("--json", action="store_true", help="print the chosen setting as JSON")
    cal.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_executor_arguments(cal)
    cal.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Calibrate, print the evidence table, write the artifact's calibration."""
    from guardrail.training.calibrate import (
        CalibrateOptions,
        calibrate_policy,
        plot_calibration,
        summary_text,
        write_calibration,
    )

    policy = load_policy(args.policy)
    options = CalibrateOptions(cache_dir=args.cache_dir, device=args.device,
                               progress=not args.no_progress, limit=args.limit)
    with executor_from(args, policy):
        report = calibrate_policy(policy, options=options)
    command = "guardrail calibrate --policy " + shlex.quote(str(args.policy))
    plot = plot_calibration(report, Path(args.plot) if args.plot else
                            report.artifact.with_suffix(".calibration.png"))
    if args.json:
        print(json.dumps(report.metadata(command) if report.chosen else
                         {"chosen": None, "settings": len(report.settings)}, indent=2))
    else:
        print(summary_text(report))
        if plot is not None:
            print(f"plot: {plot}")
    if report.chosen is None:
        return 1
    if not args.dry_run and args.limit is None:
        write_calibration(report.artifact, report, command)
        print(f"wrote the calibration into {report.artifact}")
    elif not args.json:
        print("dry run (or --limit): the artifact is unchanged")
    return 0
