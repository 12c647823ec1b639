"""``guardrail validate`` and ``guardrail policy schema | list | show | init``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from guardrail.console import printable
from guardrail.errors import GuardrailError
from guardrail.plugin.defaults import DEFAULT_POLICY
from guardrail.plugin.manager import get_plugin_manager
from guardrail.plugin.registry import Registry
from guardrail.policy.artifacts import missing_artifacts, validate_policy_file
from guardrail.policy.files import read_policy_text, resolved
from guardrail.policy.model import load_policy, load_raw
from guardrail.policy.shipped import resolve_policy, shipped_policies

POLICY_HELP = "a policy file, or a shipped policy's name (guardrail policy list)"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``validate`` and ``policy``."""
    validate = subparsers.add_parser("validate", help="check policy files (schema and plugins)")
    validate.add_argument("policies", nargs="+", metavar="POLICY", help=POLICY_HELP)
    validate.set_defaults(func=run_validate)
    policy = subparsers.add_parser("policy", help="policy-file tools: schema, list, show, init")
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    schema = policy_sub.add_parser("schema", help="print the policy JSON Schema (with the "
                                   "registered plugins' parameters)")
    schema.set_defaults(func=run_schema)
    listing = policy_sub.add_parser("list", help="the shipped policies as JSON")
    listing.set_defaults(func=run_list)
    show = policy_sub.add_parser("show", help="print a policy as loaded (extends merged, paths "
                                 "resolved)")
    show.add_argument("policy", metavar="POLICY", help=POLICY_HELP)
    show.add_argument("--source", action="store_true", help="print the file as written instead")
    show.set_defaults(func=run_show)
    init = policy_sub.add_parser("init", help="write a starter policy that extends a shipped one")
    init.add_argument("path", nargs="?", default="my-policy.yaml",
                      help="file to write (default my-policy.yaml)")
    init.add_argument("--extends", default=DEFAULT_POLICY, metavar="POLICY",
                      help=f"the shipped policy (or file) to start from (default {DEFAULT_POLICY})")
    init.add_argument("--name", help="the new policy's name (default: the file name)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=run_init)


def run_validate(args: argparse.Namespace) -> int:
    """Validate every file; report every problem of every file; non-zero if any failed.

    A broken file never stops the files after it from being checked.
    """
    registry = Registry.from_plugin_manager(get_plugin_manager())
    failed = 0
    for path in args.policies:
        try:
            policy = validate_policy_file(path, registry)
        except GuardrailError as exc:
            failed += 1
            print(printable(exc), file=sys.stderr)
            continue
        rails = ", ".join(repr(r.name) for r in policy.rails) or "none"
        print(printable(f"ok {path}: policy {policy.name!r}, model {policy.model.source!r}, "
                        f"rails: {rails}", newlines=False))
        for note in missing_artifacts(policy, registry):
            print(printable(f"   note: {note}", newlines=False))
    return 1 if failed else 0


def run_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of a policy file, plugin sections typed by the registry."""
    from guardrail.policy.json_schema import policy_json_schema

    print(policy_json_schema(Registry.from_plugin_manager(get_plugin_manager())))
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Name, description, parent, file and artifacts of each shipped policy, as JSON."""
    rows = []
    for name, path in shipped_policies().items():
        parent = yaml.safe_load(path.read_text(encoding="utf-8")).get("extends")
        policy = load_policy(path)
        artifacts = [
            {"rail": rail.name, "path": rail.energy_model.artifact,
             "exists": Path(rail.energy_model.artifact).is_file()}
            for rail in policy.rails
            if rail.energy_model is not None and rail.energy_model.artifact is not None
        ]
        rows.append({"name": name, "description": policy.description,
                     "extends": Path(parent).stem if isinstance(parent, str) else None,
                     "model": policy.model.source, "rails": [r.name for r in policy.rails],
                     "artifacts": artifacts, "path": str(path)})
    print(json.dumps(rows, indent=2))
    return 0


def run_show(args: argparse.Namespace) -> int:
    """Print the policy as loaded, or with ``--source`` the file as written."""
    path = resolved(resolve_policy(args.policy))
    if args.source:
        # Read as validate reads it (size-bounded, UTF-8 text), printed with control
        # characters escaped: the file may be a download.
        text = read_policy_text(path)
        print(printable(f"# {path}", newlines=False))
        print(printable(text), end="" if text.endswith("\n") else "\n")
        return 0
    load_policy(path)  # the schema's errors, if any, before printing
    print(printable(f"# {path}, extends merged and paths resolved ", newlines=False)
          + "(`guardrail policy show --source` prints the file as written)")
    print(printable(yaml.safe_dump(load_raw(path), sort_keys=False, width=100)), end="")
    return 0


def run_init(args: argparse.Namespace) -> int:
    """Write a starter policy extending ``--extends`` and check that it validates."""
    target = Path(args.path)
    if target.exists() and not args.force:
        raise GuardrailError(f"{target} exists; pass --force to overwrite it")
    parent = load_policy(args.extends)
    assert parent.path is not None
    extends = parent.path.stem if resolve_policy(args.extends) in shipped_policies().values() \
        else _relative(parent.path, resolved(target).parent)
    name = args.name or target.stem
    target.write_text(starter_policy(name, extends, parent.rails[0].name if parent.rails
                                     else None), encoding="utf-8")
    validate_policy_file(target, Registry.from_plugin_manager(get_plugin_manager()))
    print(printable(f"wrote {target}: policy {name!r} extends {extends!r}", newlines=False))
    print(printable(f"next: guardrail validate {target}; guardrail policy show {target}; "
                    f"guardrail generate --policy {target} --compare \"...\"", newlines=False))
    return 0


def starter_policy(name: str, extends: str, rail: str | None) -> str:
    """The text ``guardrail policy init`` writes: the parent by name, and what to change."""
    rail = rail or "my-rail"
    return f"""\
# Written by `guardrail policy init`. It starts from {extends!r} (see the whole of it with
# `guardrail policy show {extends}`) and changes only what this file says (docs/policies.md):
# mappings merge key by key; rails merge by name (a rail named like one of the parent's
# changes that rail, a new name adds a rail, `enabled: false` removes one); any other list
# replaces the parent's.
extends: {extends}
name: {name}
description: My policy, starting from {extends}.

# Answer length and batching for this policy:
# generation:
#   max_new_tokens: 64

# Steer harder or softer (only the keys given change; the rest of the rail stays):
# rails:
#   - name: {rail}
#     steerer:
#       params: {{eta: 0.5}}

# Train your own energy model (`guardrail train --policy THIS_FILE`): give the rail an
# artifact path of your own and a training: section (docs/training.md), e.g.
# rails:
#   - name: {rail}
#     energy_model: {{artifact: artifacts/{name}.safetensors}}
"""


def _relative(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:  # another drive on Windows
        return str(path)
