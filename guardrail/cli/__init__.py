"""The ``guardrail`` command line: one module per command group, wired here.

Plugins add their own commands through the ``guardrail_register_commands`` hook. Building
the parser imports no torch (command modules import it inside the commands that load a
model), so ``guardrail --help``, ``validate`` and ``plugins`` start quickly
(``bench/cli_startup.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from guardrail import __version__
from guardrail.console import EscapingWriter, configure_logging, printable
from guardrail.errors import GuardrailError, PluginError
from guardrail.prompts import DATA_ENV

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
    parser.add_argument("--version", action="version", version=f"guardrail {__version__}")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    parser.add_argument("--log-level", default="INFO", type=_log_level,
                        help=", ".join(LOG_LEVELS) + " (default INFO)")
    parser.add_argument("--data-dir", metavar="DIR", dest="global_data_dir",
                        help=f"folder of the prompt sets (sets ${DATA_ENV} for this run: the "
                        "shipped policies' training data and the evaluation suites)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    _plugin_commands(subparsers)
    return parser


def _plugin_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Let each plugin add its commands; an installed plugin that raises is left out
    (``guardrail plugins`` shows why), any other plugin's error stops the command line."""
    from guardrail.plugin.manager import get_plugin_manager

    get_plugin_manager().call_contained(
        "guardrail_register_commands", lambda plugin, hook: hook(subparsers=subparsers)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``guardrail`` script."""
    try:
        parser = build_parser()
    except PluginError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    configure_logging(json=args.log_json, level=args.log_level)
    if args.global_data_dir:
        os.environ[DATA_ENV] = os.path.abspath(os.path.expanduser(args.global_data_dir))
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    if args.command != "plugins":  # which lists them itself
        _warn_failed_plugins()
    stdout = sys.stdout
    sys.stdout = EscapingWriter(stdout)
    try:
        return int(args.func(args) or 0)
    except GuardrailError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `guardrail plugins | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stdout.fileno())
        return 0
    finally:
        if isinstance(sys.stdout, EscapingWriter):
            sys.stdout = stdout


def _warn_failed_plugins() -> None:
    from guardrail.plugin.manager import get_plugin_manager

    get_plugin_manager().warn_failed()


if __name__ == "__main__":
    sys.exit(main())
