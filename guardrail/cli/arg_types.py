"""argparse ``type=`` functions: a bad value is an argparse error naming the option and value.

``guardrail generate --max-new-tokens -5`` then ends with ``argument --max-new-tokens: got
'-5'; expected an integer >= 1`` and exit status 2, before any model is loaded, instead of a
traceback from deep inside generation.
"""

from __future__ import annotations

import argparse
import math

from guardrail.policy.checks import device_problem, seed_problem


def _number(text: str, kind: type[int] | type[float], expected: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected {expected}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"got {text!r}; expected {expected}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(_number(text, int, "an integer >= 1"))
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected an integer >= 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = int(_number(text, int, "an integer >= 0"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected an integer >= 0")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(text, float, "a finite number > 0")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected a finite number > 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _number(text, float, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected a finite number >= 0")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (``top_p``)."""
    value = _number(text, float, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected a number in (0, 1]")
    return value


def port(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port)."""
    value = int(_number(text, int, "0..65535"))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected 0..65535")
    return value


def seed(text: str) -> int:
    """An integer torch accepts as a seed (-2**63 .. 2**64-1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected an integer") from None
    problem = seed_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem.replace(repr(value), repr(text), 1))
    return value


def device(text: str) -> str:
    """A device a model can generate on: auto, cpu, mps, cuda or cuda:N."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def grid_param(text: str) -> tuple[str, list[bool | int | float | str]]:
    """``NAME=V1,V2,...``: one steerer param of a sweep grid and its values (integers,
    numbers, true/false, else text; the steerers' ``Params`` check them)."""
    name, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not name.strip().isidentifier() or not items:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected NAME=V1,V2,... (a steerer "
                                         "param and its values, e.g. NAME=0.1,1)")
    return name.strip(), [_grid_value(v) for v in items]


def _grid_value(text: str) -> bool | int | float | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    return text


def grid_of(items: list[tuple[str, list[bool | int | float | str]]] | None
            ) -> dict[str, list[bool | int | float | str]]:
    """Repeated ``--grid`` options as one grid; a param given twice is an error."""
    grid: dict[str, list[bool | int | float | str]] = {}
    for name, values in items or []:
        if name in grid:
            raise argparse.ArgumentTypeError(f"--grid {name}: given twice; list its values "
                                             f"once, {name}=V1,V2,...")
        grid[name] = values
    return grid
