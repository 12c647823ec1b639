"""The ``guardrail`` command line: one module per command group, wired here.

Plugins add their own commands through the ``guardrail_register_commands`` hook.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from guardrail.errors import GuardrailError, PluginError
from guardrail.telemetry import configure_logging

# Each module has ``add_parser(subparsers)``; a sub-parser sets ``func(args) -> int``.
COMMAND_MODULES: tuple[str, ...] = (
    "guardrail.cli.plugins_cmd",
    "guardrail.cli.policy_cmd",
    "guardrail.cli.generate_cmd",
    "guardrail.cli.models_cmd",
    "guardrail.cli.train_cmd",
    "guardrail.cli.calibrate_cmd",
    "guardrail.cli.eval_cmd",
    "guardrail.cli.serve_cmd",
    "guardrail.cli.demo_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available command."""
    parser = argparse.ArgumentParser(
        prog="guardrail",
        description="Steer a local chat model's hidden states to cut false refusals.",
    )
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a command group not built yet
            raise
        module.add_parser(subparsers)
    _plugin_commands(subparsers)
    return parser


def _plugin_commands(subparsers: Any) -> None:
    """Let each plugin add its commands, one implementation at a time, so errors name it."""
    from guardrail.plugins import get_plugin_manager

    hook = get_plugin_manager().hook.guardrail_register_commands
    for impl in reversed(hook.get_hookimpls()):
        try:
            impl.function(subparsers=subparsers)
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r} raised in hook guardrail_register_commands: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``guardrail`` script."""
    try:
        parser = build_parser()
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    configure_logging(json=args.log_json, level=args.log_level.upper())
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
