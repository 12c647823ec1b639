"""The executor options of ``guardrail train``, ``calibrate`` and ``eval``.

The command line wins over the policy's ``training.executor`` section, which wins over the
default (``local``). Importing this module imports neither Ray nor torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from guardrail.cli.arg_types import (
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from guardrail.distributed import open_executor
from guardrail.policy.executor import EXECUTORS, ExecutorSettings

#: Command-line option -> ExecutorSettings field.
OPTIONS = {"executor": "kind", "ray_address": "address", "ray_workers": "workers",
           "ray_cpus_per_worker": "cpus_per_worker", "ray_gpus_per_worker": "gpus_per_worker",
           "ray_max_retries": "max_retries"}


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--executor`` and the ``--ray-*`` options (all default to the policy's values)."""
    group = parser.add_argument_group(
        "executor", "where the per-prompt work runs (default: the policy's training.executor, "
        "else local; docs/scaling.md)")
    group.add_argument("--executor", choices=EXECUTORS,
                       help="local: this process; ray: shards on Ray actors, one model each")
    group.add_argument("--ray-address", metavar="ADDR",
                       help="Ray cluster to join ('auto', host:6379, ray://host:10001); "
                       "default: start Ray on this machine for the run")
    group.add_argument("--ray-workers", type=positive_int, metavar="N",
                       help="actors, each with one model replica (default 2)")
    group.add_argument("--ray-cpus-per-worker", type=positive_float, metavar="C",
                       help="CPUs (and torch threads) per actor (default 1)")
    group.add_argument("--ray-gpus-per-worker", type=non_negative_float, metavar="G",
                       help="GPUs per actor (default 0; fractions share a GPU)")
    group.add_argument("--ray-max-retries", type=non_negative_int, metavar="R",
                       help="restarts of a lost actor and retries of its shard (default 3)")


def executor_settings(args: argparse.Namespace, policy: Any = None) -> ExecutorSettings:
    """The policy's ``training.executor`` (if any) with the command line's options on top."""
    training = getattr(policy, "training", None)
    settings = training.executor if training is not None else ExecutorSettings()
    given = {field: getattr(args, option) for option, field in OPTIONS.items()
             if getattr(args, option, None) is not None}
    if given:
        settings = ExecutorSettings.model_validate({**settings.model_dump(), **given})
    return settings


@contextmanager
def executor_from(args: argparse.Namespace, policy: Any = None) -> Iterator[Any]:
    """The executor the options and policy ask for, current for the block, closed after."""
    from guardrail.distributed.executor import using

    with using(open_executor(executor_settings(args, policy))) as executor:
        yield executor


