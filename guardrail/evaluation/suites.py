"""Resolving suite names (or user files) to loaded, optionally sampled, lists of items."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from guardrail.errors import DataError, PluginError
from guardrail.plugin.components import Suite, SuiteItem
from guardrail.plugin.defaults import FILE_SUITE
from guardrail.plugin.registry import Registry

log = structlog.get_logger("guardrail.evaluation")

FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv")
LABELS = ("benign", "harmful")


@dataclass(frozen=True)
class SuiteSpec:
    """A suite as named on the command line: a registered name or a user file (``PATH[:label]``)."""

    name: str
    plugin: str
    params: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> SuiteSpec:
        """``xstest``: a registered suite; ``my.jsonl`` or ``my.csv:harmful``: the file suite."""
        path_text, label = text, None
        head, sep, tail = text.rpartition(":")
        if sep and tail in LABELS:
            path_text, label = head, tail
        if path_text.lower().endswith(FILE_SUFFIXES) or os.sep in path_text:
            params: dict[str, Any] = {"path": str(Path(path_text).expanduser())}
            if label is not None:
                params["label"] = label
            return cls(name=Path(path_text).stem, plugin=FILE_SUITE, params=params)
        return cls(name=text, plugin=text, params={})


@dataclass
class LoadedSuite:
    """A suite's (sampled) items and where they came from."""

    name: str
    plugin: str
    items: list[SuiteItem]
    total: int

    @property
    def benign(self) -> int:
        """Number of benign items."""
        return sum(not item.harmful for item in self.items)

    @property
    def harmful(self) -> int:
        """Number of harmful items."""
        return sum(item.harmful for item in self.items)


def create_suite(spec: SuiteSpec, registry: Registry, data_dir: str | Path | None) -> Suite:
    """Instantiate a suite; ``data_dir`` is passed to suites whose parameters take one."""
    entry = registry.get("suite", spec.plugin)
    values = dict(spec.params)
    if data_dir is not None and "data_dir" in entry.Params.model_fields:
        values.setdefault("data_dir", str(data_dir))
    suite = registry.create("suite", spec.plugin, values)
    assert isinstance(suite, Suite)
    return suite


def load_suite(
    spec: SuiteSpec | str,
    registry: Registry,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> LoadedSuite:
    """Load a suite and, with ``limit``, keep a seeded sample stratified by label."""
    if isinstance(spec, str):
        spec = SuiteSpec.parse(spec)
    suite = create_suite(spec, registry, data_dir)
    try:
        items = suite.load()
    except (DataError, PluginError):
        raise
    except Exception as exc:
        raise PluginError(
            f"suite {spec.plugin!r} (plugin {registry.get('suite', spec.plugin).plugin!r}) raised "
            f"in load: {type(exc).__name__}: {exc}"
        ) from exc
    if not items:
        raise DataError(f"suite {spec.name!r} has no items")
    total = len(items)
    if limit is not None:
        items = stratified_sample(items, limit, seed)
    log.info("eval.suite_loaded", suite=spec.name, items=len(items), total=total)
    return LoadedSuite(name=spec.name, plugin=spec.plugin, items=items, total=total)


def stratified_sample(items: list[SuiteItem], limit: int, seed: int) -> list[SuiteItem]:
    """``limit`` items, benign/harmful in the suite's proportions, file order kept."""
    if limit < 1:
        raise DataError(f"--limit is {limit}; expected a positive number of prompts per suite")
    if limit >= len(items):
        return list(items)
    groups = [[i for i, item in enumerate(items) if item.harmful == flag] for flag in (False, True)]
    groups = [g for g in groups if g]
    shares = [limit * len(g) / len(items) for g in groups]
    counts = [int(s) for s in shares]
    # Largest remainders get the leftover slots; every present label keeps at least one item.
    for i in sorted(range(len(groups)), key=lambda i: shares[i] - counts[i], reverse=True):
        if sum(counts) < limit:
            counts[i] += 1
    for i in range(len(groups)):
        if counts[i] == 0 and limit >= len(groups):
            donor = max(range(len(groups)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] = 1
    rng = random.Random(seed)
    picks = zip(groups, counts, strict=True)
    chosen = sorted(i for group, n in picks for i in rng.sample(group, n))
    return [items[i] for i in chosen]
