"""Prompt files: JSON, JSONL, CSV/TSV and plain text, with a field, a row filter and a sample.

Relative data file names (the built-in suites', the baselines' defaults) are looked up in
the data directory :func:`resolve_data_dir` names: ``--data-dir``, else ``$GUARDRAIL_DATA``
(which ``guardrail --data-dir DIR`` sets for a whole run, shipped policies' training data
included), else ``../shared/data`` from the current directory or from a source checkout.

Training (``guardrail train``) and evaluation suites read prompt sets through
:func:`load_prompts`. A *filter* keeps the rows whose columns match, one condition per
column, all conditions must hold::

    {"category": "illegal"}                     # equal
    {"category": ["illegal", "privacy"]}        # any of
    {"type": {"not_prefix": "contrast_"}}       # operators: not, prefix, not_prefix, regex
    {"instruction": {"regex": "(?i)\\bkill"}}   # re.search; a list means any of them
    {"category": null}                          # missing, null or empty

Every problem raises :class:`~guardrail.errors.DataError` naming the file, the key (field,
filter column, row) and the value found, and what was expected.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from guardrail.errors import DataError

log = structlog.get_logger("guardrail.prompts")

DATA_ENV = "GUARDRAIL_DATA"
# Where a source checkout keeps pyproject.toml (in an installed wheel there is none).
_CHECKOUT = Path(__file__).resolve().parents[1]
FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
           ".txt": "text"}
FILTER_OPERATORS = ("not", "prefix", "not_prefix", "regex")

Filter = Mapping[str, Any]


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``$GUARDRAIL_DATA``, else the first existing of ``../shared/data``
    from the current directory and from the source checkout guardrail runs from (if any).

    Raises :class:`DataError` naming every place it looked and how to point elsewhere.
    """
    if explicit is not None:
        candidates = [("--data-dir", Path(explicit))]
    elif os.environ.get(DATA_ENV):
        candidates = [(f"${DATA_ENV}", Path(os.environ[DATA_ENV]))]
    else:
        candidates = [("default: ../shared/data from the current directory",
                       Path.cwd().parent / "shared" / "data")]
        if (_CHECKOUT / "pyproject.toml").is_file():
            candidates.append(("default: ../shared/data from the checkout",
                               _CHECKOUT.parent / "shared" / "data"))
    looked = []
    for where, path in candidates:
        path = path.expanduser().resolve()
        if path.is_dir():
            return path
        looked.append(f"{path} ({where})")
    raise DataError(
        f"no data directory: looked at {'; '.join(dict.fromkeys(looked))}. Pass --data-dir DIR "
        f"or set {DATA_ENV} to the folder holding the prompt sets (xstest_v2_prompts.csv, "
        "the *_train.json and *_val.json files)"
    )


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: its text, the file and row it came from, and the row's other columns."""

    text: str
    source: str
    index: int
    category: str | None = None
    fields: dict[str, Any] = field(default_factory=dict, compare=False)


def load_prompts(
    path: str | Path,
    *,
    field: str = "instruction",
    filter: Filter | None = None,  # noqa: A002 - the policy key users write
    sample: int | None = None,
    seed: int = 0,
) -> list[PromptRecord]:
    """Read prompts from ``path``, keep rows matching ``filter``, then sample ``sample`` of them.

    ``field`` names the column holding the prompt text (ignored for ``.txt`` files, one prompt
    per line). Sampling is reproducible for a given ``seed`` and keeps file order. Asking for
    more prompts than match takes them all (and logs ``prompts.sample_short``).
    """
    path = Path(path).expanduser()
    rows = read_rows(path)
    if rows and filter:
        _check_filter(path, rows, filter)
    kept = [(i, row) for i, row in enumerate(rows) if not filter or matches(row, filter)]
    if not kept:
        detail = f" after filter {dict(filter)!r}" if filter else ""
        hint = _filter_hint(rows, filter) if filter else ""
        raise DataError(f"{path}: no prompts{detail} ({len(rows)} rows read){hint}")
    if sample is not None:
        if sample < 1:
            raise DataError(f"{path}: sample is {sample!r}; expected a positive number of prompts")
        if sample < len(kept):
            chosen = sorted(random.Random(seed).sample(range(len(kept)), sample))
            kept = [kept[i] for i in chosen]
        elif sample > len(kept):
            log.warning("prompts.sample_short", file=str(path), sample=sample, available=len(kept))
    if FORMATS.get(path.suffix.lower()) == "text":
        field = "text"
    records = []
    for index, row in kept:
        text = _text(path, row, index, field)
        category = row.get("category")
        records.append(PromptRecord(
            text=str(text), source=str(path), index=index,
            category=None if category in (None, "") else str(category), fields=dict(row),
        ))
    return records


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a prompt file as mappings (``.txt``: ``{"text": line}`` per non-empty line)."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unsupported prompt file type {path.suffix or '(none)'!r}; "
            f"expected one of {', '.join(sorted(FORMATS))}"
        )
    if not path.is_file():
        state = f"set to {os.environ[DATA_ENV]}" if os.environ.get(DATA_ENV) else "unset"
        raise DataError(
            f"{path}: prompt file not found (${DATA_ENV} is {state}; if this is one of the "
            f"prompt sets, point ${DATA_ENV} or `guardrail --data-dir DIR` at their folder)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read prompt file ({exc})") from exc
    if kind == "json":
        return _json_rows(path, text)
    if kind == "jsonl":
        return _jsonl_rows(path, text)
    if kind in ("csv", "tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if kind == "tsv" else ",")
        if not reader.fieldnames:
            raise DataError(f"{path}: CSV file has no header row; expected column names first")
        return [dict(row) for row in reader]
    return [{"text": line.strip()} for line in text.splitlines() if line.strip()]


def matches(row: Mapping[str, Any], filter: Filter) -> bool:  # noqa: A002
    """Whether ``row`` meets every condition of ``filter`` (see the module docstring)."""
    for column, condition in filter.items():
        value = row.get(column)
        if isinstance(condition, Mapping):
            for op, operand in condition.items():
                options = _as_list(operand)
                if op == "not" and any(_same(value, o) for o in options):
                    return False
                if op == "prefix" and not any(str(value or "").startswith(str(o)) for o in options):
                    return False
                if op == "not_prefix" and any(str(value or "").startswith(str(o)) for o in options):
                    return False
                if op == "regex" and not any(re.search(str(o), str(value or "")) for o in options):
                    return False
        elif not any(_same(value, o) for o in _as_list(condition)):
            return False
    return True


def _json_rows(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(data, list):
        raise DataError(
            f"{path}: top level is a {type(data).__name__}; expected a list of objects "
            '(e.g. [{"instruction": "...", "category": null}])'
        )
    return [_as_row(path, item, f"item [{i}]") for i, item in enumerate(data)]


def _jsonl_rows(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from exc
        rows.append(_as_row(path, item, f"line {lineno}"))
    return rows


def _as_row(path: Path, item: Any, where: str) -> dict[str, Any]:
    if isinstance(item, str):
        return {"text": item, "instruction": item, "prompt": item}
    if not isinstance(item, dict):
        raise DataError(f"{path}: {where} is {item!r}; expected an object or a string")
    return item


def _text(path: Path, row: Mapping[str, Any], index: int, field: str) -> str:
    if field not in row:
        raise DataError(
            f"{path}: row {index} has no field {field!r} (it has {sorted(row)}); "
            f"set `field:` to the column holding the prompt"
        )
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"{path}: row {index} field {field!r} is {value!r}; expected non-empty prompt text"
        )
    return value


def _check_filter(path: Path, rows: Sequence[Mapping[str, Any]], filter: Filter) -> None:  # noqa: A002
    columns = {key for row in rows for key in row}
    for column, condition in filter.items():
        if column not in columns:
            raise DataError(
                f"{path}: filter key {column!r} is not a column of this file "
                f"(columns: {sorted(columns)})"
            )
        if isinstance(condition, Mapping):
            bad = [op for op in condition if op not in FILTER_OPERATORS]
            if bad:
                raise DataError(
                    f"{path}: filter.{column}: unknown operator {bad[0]!r}; "
                    f"expected a value, a list of values, or one of {list(FILTER_OPERATORS)}"
                )
            for pattern in _as_list(condition.get("regex", [])):
                try:
                    re.compile(str(pattern))
                except re.error as exc:
                    raise DataError(
                        f"{path}: filter.{column}.regex: {pattern!r} is not a regular "
                        f"expression ({exc})"
                    ) from exc


def _filter_hint(rows: Sequence[Mapping[str, Any]], filter: Filter) -> str:  # noqa: A002
    hints = []
    for column in filter:
        seen = sorted({str(row.get(column)) for row in rows})
        shown = ", ".join(repr(s) for s in seen[:12]) + (", ..." if len(seen) > 12 else "")
        hints.append(f"values of {column!r}: {shown}")
    return "; " + "; ".join(hints) if hints else ""


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def _same(value: Any, expected: Any) -> bool:
    if expected is None:
        return value in (None, "")
    if value is None:
        return False
    # CSV cells are strings: compare `1` with "1" and `true` with "True" textually.
    return bool(value == expected or str(value).lower() == str(expected).lower())
