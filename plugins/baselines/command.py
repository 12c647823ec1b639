"""``guardrail baseline directions``: the command this plugin adds to the command line."""

from __future__ import annotations

import argparse

DATA_HELP = "data folder (default $GUARDRAIL_DATA, else ../shared/data from here or the checkout)"
CACHE_HELP = "cache root (default $GUARDRAIL_CACHE_DIR or ~/.cache/guardrail)"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``baseline`` with its ``directions`` subcommand."""
    base = subparsers.add_parser("baseline", help="build artifacts for the linear baselines")
    sub = base.add_subparsers(dest="baseline_command", metavar="SUBCOMMAND", required=True)
    di = sub.add_parser("directions", help="difference-of-means refusal directions (all layers)")
    di.add_argument("--policy", required=True, help="policy whose model (and rail) to use")
    di.add_argument("--out", help="artifact path (default: the policy's linear rail artifact)")
    di.add_argument("--harmful", action="append", metavar="FILE",
                    help="harmful prompt file(s) (default DATA/harmful_train.json)")
    di.add_argument("--benign", action="append", metavar="FILE",
                    help="benign prompt file(s) (default DATA/harmless_train.json)")
    di.add_argument("--limit", type=int, default=256, help="prompts sampled per side (seeded)")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--layers", type=_ints, help="comma-separated layers (default: all)")
    di.add_argument("--direction-layer", type=int,
                    help="use this layer's direction at every layer (Arditi et al.)")
    di.add_argument("--batch-size", type=int, default=16)
    di.add_argument("--data-dir", help=DATA_HELP)
    di.add_argument("--cache-dir", help=CACHE_HELP)
    di.add_argument("--no-cache", action="store_true", help="recompute cached states")
    di.add_argument("--device", help="auto, cpu, cuda (overrides the policy)")
    di.set_defaults(func=run_directions)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def run_directions(args: argparse.Namespace) -> int:
    """Compute difference-of-means directions and save them as a ``linear`` energy artifact."""
    from guardrail_plugins.baselines.directions import build_directions

    path, stats = build_directions(
        args.policy, out=args.out, harmful=args.harmful, benign=args.benign, limit=args.limit,
        seed=args.seed, layers=args.layers, direction_layer=args.direction_layer,
        batch_size=args.batch_size, data_dir=args.data_dir, cache_dir=args.cache_dir,
        use_cache=not args.no_cache, device=args.device, progress=True,
    )
    best = max(stats, key=lambda s: s["balanced_accuracy"])
    for s in stats:
        print(f"layer {s['layer']:>3}  separation {s['separation']:>9.3f}  "
              f"balanced acc {s['balanced_accuracy']:.3f}  mean ||h|| {s['mean_norm']:.1f}")
    print(f"wrote {path} (best separating layer {best['layer']}, "
          f"balanced accuracy {best['balanced_accuracy']:.3f})")
    return 0
