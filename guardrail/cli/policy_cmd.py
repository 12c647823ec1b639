"""``guardrail validate`` and ``guardrail policy schema``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from guardrail.errors import GuardrailError
from guardrail.plugins import Registry, get_plugin_manager
from guardrail.policy import missing_artifacts, policy_json_schema, validate_policy_file


def add_parser(subparsers: Any) -> None:
    """Register ``validate`` and ``policy``."""
    validate = subparsers.add_parser("validate", help="check policy files (schema and plugins)")
    validate.add_argument("policies", nargs="+", metavar="POLICY")
    validate.set_defaults(func=run_validate)
    policy = subparsers.add_parser("policy", help="policy-file tools")
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    schema = policy_sub.add_parser("schema", help="print the policy JSON Schema")
    schema.set_defaults(func=run_schema)


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
            print(str(exc), file=sys.stderr)
            continue
        rails = ", ".join(r.name for r in policy.rails) or "none"
        print(f"ok {path}: policy {policy.name!r}, model {policy.model.source!r}, rails: {rails}")
        for note in missing_artifacts(policy, registry):
            print(f"   note: {note}")
    return 1 if failed else 0


def run_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of a policy file."""
    print(policy_json_schema())
    return 0
