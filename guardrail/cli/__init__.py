"""The ``guardrail`` command line: one module per command group, wired here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from guardrail.errors import GuardrailError
from guardrail.telemetry import configure_logging

# Each module has ``add_parser(subparsers)``; a sub-parser sets ``func(args) -> int``.
COMMAND_MODULES: tuple[str, ...] = (
    "guardrail.cli.plugins_cmd",
    "guardrail.cli.policy_cmd",
    "guardrail.cli.generate_cmd",
    "guardrail.cli.models_cmd",
    "guardrail.cli.train_cmd",
    "guardrail.cli.eval_cmd",
    "guardrail.cli.serve_cmd",
    "guardrail.cli.demo_cmd",
)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected one of {', '.join(LOG_LEVELS)}")
    return level


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available command."""
    parser = argparse.ArgumentParser(
        prog="guardrail",
        description="Steer a local chat model's hidden states to cut false refusals.",
    )
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    parser.add_argument("--log-level", default="INFO", type=_log_level,
                        help=", ".join(LOG_LEVELS) + " (default INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a command group not built yet
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``guardrail`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(json=args.log_json, level=args.log_level)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GuardrailError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
