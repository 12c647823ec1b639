"""``guardrail plugins``: installed plugins as JSON."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from guardrail import __version__
from guardrail.plugin.defaults import DEFAULT_PLUGINS
from guardrail.plugin.manager import PluginManager, get_plugin_manager
from guardrail.plugin.registry import KINDS, Registry


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``plugins`` command."""
    parser = subparsers.add_parser("plugins", help="list installed plugins as JSON")
    parser.add_argument("--all", action="store_true", help="include the built-in plugins")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print name, version, hooks and components of each plugin."""
    print(json.dumps(plugin_report(get_plugin_manager(), include_builtins=args.all), indent=2))
    return 0


def plugin_report(pm: PluginManager, *, include_builtins: bool = False) -> list[dict[str, Any]]:
    """What ``guardrail plugins`` prints: name, version, hooks and components per plugin,
    then each installed plugin that failed, with its entry point, distribution and error."""
    builtin_names = {name for name, _ in DEFAULT_PLUGINS}
    registry = Registry.from_plugin_manager(pm, warn=False)
    installed = pm.installed
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:
            continue
        builtin = name in builtin_names
        if builtin and not include_builtins:
            continue
        origin = installed.get(name)
        version = __version__ if builtin else (origin.version if origin is not None else None)
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        components = {
            kind: [e.name for e in registry.registrations(kind) if e.plugin == name]
            for kind in KINDS
        }
        row: dict[str, Any] = {"name": name, "version": version, "builtin": builtin}
        if origin is not None:
            row.update(distribution=origin.distribution, entry_point=origin.entry_point)
        row.update(hooks=hooks, components={k: v for k, v in components.items() if v})
        rows.append(row)
    for failed in sorted(installed.values(), key=lambda p: p.name):
        if failed.error is not None:
            rows.append({**asdict(failed), "builtin": False, "hooks": [], "components": {}})
    return rows
