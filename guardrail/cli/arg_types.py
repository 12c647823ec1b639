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
