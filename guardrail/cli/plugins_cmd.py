"""``guardrail plugins``: installed plugins as JSON."""

from __future__ import annotations

import argparse
import json

from guardrail.plugin.manager import get_plugin_manager, plugin_report


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``plugins`` command."""
    parser = subparsers.add_parser("plugins", help="list installed plugins as JSON")
    parser.add_argument("--all", action="store_true", help="include the built-in plugins")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print name, version, hooks and components of each plugin."""
    print(json.dumps(plugin_report(get_plugin_manager(), include_builtins=args.all), indent=2))
    return 0
