"""``guardrail train``: turn a policy's prompt sets into its rail's energy-model artifact."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

import yaml

from guardrail.cli.arg_types import device, non_negative_int, positive_int
from guardrail.cli.executor_options import add_executor_arguments, executor_from
from guardrail.errors import GuardrailError
from guardrail.policy.model import Policy, load_policy


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``train``."""
    train = subparsers.add_parser(
        "train", help="train a policy's energy model from its training: section",
        description="Label the policy's prompts with the frozen model, capture their states at "
        "every layer (cached), train an energy model per layer and keep the best layers.",
    )
    train.add_argument("--policy", required=True,
                       help="policy file or shipped policy name, with a training: section")
    train.add_argument("--rail", help="rail to train (default: training.rail or the first rail "
                       "with an energy model)")
    train.add_argument("--output", help="artifact path (default: the rail's energy_model.artifact)")
    train.add_argument("--cache-dir", help="state cache (default: training.capture.cache_dir or "
                       "<guardrail cache>/states)")
    train.add_argument("--device", type=device, help="auto, cpu, cuda (overrides the policy)")
    train.add_argument("--top-k", type=positive_int,
                       help="layers to keep (overrides selection.top_k)")
    train.add_argument("--threads", type=non_negative_int, default=1,
                       help="CPU threads while training the energy models (default 1; 0 = torch's)")
    train.add_argument("--emit-policy", metavar="PATH",
                       help="also write a policy file using the new artifact ('-' prints it)")
    train.add_argument("--report", metavar="PATH", help="write the run's report as JSON "
                       "(default: next to the artifact, .json)")
    train.add_argument("--plot", metavar="PATH",
                       help="per-layer AUROC plot (default: next to the artifact, .layers.png)")
    train.add_argument("--json", action="store_true", help="print the report as JSON")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_executor_arguments(train)
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train, print the cell counts and per-layer table, write the artifact (and extras)."""
    from guardrail.training.pipeline import TrainOptions, train_policy
    from guardrail.training.report import plot_layers, report_dict, summary_text

    policy = load_policy(args.policy)
    if args.output is None:
        _refuse_installed_artifact(policy, args.rail)
    options = TrainOptions(output=args.output, cache_dir=args.cache_dir, device=args.device,
                           progress=not args.no_progress, top_k=args.top_k,
                           threads=args.threads or None)
    with executor_from(args, policy):
        report = train_policy(policy, rail=args.rail, options=options)
    assert report.artifact is not None
    plot = plot_layers(report, args.plot or report.artifact.with_suffix(".layers.png"))
    assert policy.training is not None
    data = report_dict(report, command=_command(args), seed=policy.training.seed)
    destination = Path(args.report) if args.report else report.artifact.with_suffix(".json")
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(json.dumps(data, indent=2) + "\n")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(summary_text(report))
        if plot is not None:
            print(f"plot: {plot}")
    if args.emit_policy:
        text = policy_using(policy, report.rail, report.artifact, args.emit_policy)
        if args.emit_policy == "-":
            print(text)
        else:
            Path(args.emit_policy).write_text(text)
            print(f"policy: {args.emit_policy} uses {report.artifact}")
    elif not args.json:
        print(f"use it: guardrail generate --policy {args.policy} --compare \"...\"")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The ``guardrail train`` invocation that made this artifact (the policy as given)."""
    parts = ["guardrail train --policy", shlex.quote(str(args.policy))]
    if args.rail:
        parts += ["--rail", shlex.quote(args.rail)]
    if args.top_k:
        parts += ["--top-k", str(args.top_k)]
    return " ".join(parts)
def _refuse_installed_artifact(policy: Policy, rail: str | None) -> None:
    """An installed wheel's shipped artifacts are not overwritten by default."""
    from guardrail.policy.shipped import artifacts_dir, is_checkout
    from guardrail.training.pipeline import pick_rail

    if is_checkout() or policy.training is None:
        return
    _, spec = pick_rail(policy, rail or policy.training.rail)
    assert spec.energy_model is not None and spec.energy_model.artifact is not None
    artifact = Path(spec.energy_model.artifact).resolve()
    if artifact.is_relative_to(artifacts_dir().resolve()):
        raise GuardrailError(
            f"rail {spec.name!r} writes {artifact}, a shipped artifact of the installed "
            "guardrail package; pass --output FILE, or start a policy of your own with "
            "`guardrail policy init` and give its rail an artifact path"
        )


def policy_using(policy: Policy, rail: str, artifact: Path, destination: str) -> str:
    """A standalone policy file (YAML) whose rail ``rail`` uses ``artifact``.

    Paths are written relative to the destination file so the pair can move together.
    """
    base = Path.cwd() if destination == "-" else Path(destination).resolve().parent
    data = policy.model_dump(mode="json", exclude_none=True, exclude={"training"})
    for spec in data["rails"]:
        if spec["name"] == rail:
            spec["energy_model"]["artifact"] = _relative(artifact.resolve(), base)
            spec["layers"] = "auto"
    header = f"# Written by `guardrail train` from {policy.path or policy.name}.\n"
    return header + yaml.safe_dump(data, sort_keys=False)


def _relative(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:  # another drive on Windows
        return str(path)
