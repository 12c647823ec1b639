"""Telemetry records for steered generation, structlog configuration and progress bars."""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from guardrail.console import escape_event, redact_event


@dataclass
class LayerTelemetry:
    """What steering did at one layer of one rail for one request.

    ``energy_before``/``energy_after`` are at the last prompt position; ``mean_*_generated``
    average over generated tokens that were steered. ``steps`` counts gradient steps in total.
    """

    rail: str
    layer: int
    #: The gate side the row was steered towards (``answer``, ``refuse``; ``shared`` for an
    #: ungated rail), None when the gate left it alone.
    side: str | None = None
    energy_before: float | None = None
    energy_after: float | None = None
    steps: int = 0
    steered_positions: int = 0
    gated_positions: int = 0
    nonfinite_positions: int = 0
    generated_positions: int = 0
    mean_energy_before_generated: float | None = None
    mean_energy_after_generated: float | None = None


@dataclass
class GateTelemetry:
    """A rail's gate decision for one request: the harm score, whether the rail steered and
    towards which side (``answer`` below ``below``, ``refuse`` above ``above``)."""

    rail: str
    score: float
    steered: bool
    below: float | None = None
    above: float | None = None
    side: str | None = None


@dataclass
class OutputRailTelemetry:
    """What an output rail did with one answer: ``kept`` it, or had it ``answered again``
    steered towards ``side``; ``first`` is the answer it replaced, with its verdict."""

    rail: str
    action: str
    side: str | None = None
    first: dict[str, Any] | None = None


@dataclass
class GenerationTelemetry:
    """Per-request telemetry: whether steering was on, and per rail and layer what it did."""

    steered: bool
    policy: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    layers: list[LayerTelemetry] = field(default_factory=list)
    gates: list[GateTelemetry] = field(default_factory=list)
    verdict: dict[str, Any] | None = None
    seconds: float | None = None
    #: The strength asked for: a multiplier on each rail's calibrated step size (None: 1, the
    #: calibrated strength).
    strength: float | None = None
    #: What the policy's output rails did with this answer, in order.
    output_rails: list[OutputRailTelemetry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary."""
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """A compact view for log events: mean energies before/after over steered layers."""
        before = [t.energy_before for t in self.layers if t.energy_before is not None]
        after = [t.energy_after for t in self.layers if t.energy_after is not None]
        return {
            "steered": self.steered,
            **({"strength": self.strength} if self.strength is not None else {}),
            **({"gates": [{"rail": g.rail, "score": g.score, "side": g.side}
                          for g in self.gates]} if self.gates else {}),
            **({"output_rails": [{"rail": o.rail, "action": o.action, "side": o.side}
                                 for o in self.output_rails]} if self.output_rails else {}),
            "layers": sorted({t.layer for t in self.layers}),
            "mean_energy_before": sum(before) / len(before) if before else None,
            "mean_energy_after": sum(after) / len(after) if after else None,
            "steps": sum(t.steps for t in self.layers),
            "nonfinite": sum(t.nonfinite_positions for t in self.layers),
        }


@dataclass
class StepEvent:
    """One generation step (prefill or a decoded token) at one steered layer, for a whole batch."""

    rail: str
    layer: int
    phase: str
    energy_before: list[float] | None
    energy_after: list[float] | None
    steps: list[int] | None
    steered: list[bool] | None


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at write time (it may be swapped after configuring)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(*, json: bool = False, level: str = "INFO") -> None:
    """Console logs by default, one JSON object per line with ``json=True`` (both to stderr).

    Every string a log line shows is escaped for the terminal (control characters, C1 and
    bidi controls; :mod:`guardrail.console`), and environment values a policy expanded are
    shown as ``${VAR}``. Warnings and errors of other libraries (uvicorn's, say) and
    uncaught exceptions of any thread go through the same renderer, so with ``json=True``
    each is one JSON line, its traceback a field, never lines of its own.
    """
    escape: Any = redact_event if json else escape_event
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            escape,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(json=json, level=level, escape=escape, renderer=renderer)
    _route_uncaught(json=json)


class _GuardrailHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """The root handler :func:`configure_logging` installs (replaced, never added twice)."""


def _route_stdlib_logging(*, json: bool, level: str, escape: Any, renderer: Any) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, escape,
                    renderer],
    )
    handler = _GuardrailHandler(_CurrentStderr())
    handler.setFormatter(formatter)
    # Other libraries' warnings and errors only: their INFO lines (a request log per HTTP
    # call, say) are not ours to print.
    handler.setLevel(max(logging.WARNING, logging.getLevelName(level)))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _GuardrailHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    if root.level > handler.level or root.level == logging.NOTSET:
        root.setLevel(handler.level)
    logging.captureWarnings(json)


def _route_uncaught(*, json: bool) -> None:
    """In JSON mode, an exception nothing caught (in any thread) is one ``uncaught`` event."""
    if not json:
        sys.excepthook = sys.__excepthook__
        threading.excepthook = threading.__excepthook__
        return

    def log_uncaught(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        structlog.get_logger("guardrail").error("uncaught", exc_info=(kind, exc, tb))

    def log_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        structlog.get_logger("guardrail").error(
            "uncaught", thread=getattr(args.thread, "name", None),
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = log_uncaught
    threading.excepthook = log_thread


def ensure_logging() -> None:
    """Configure console logging to stderr unless the application configured structlog itself."""
    if not structlog.is_configured():
        configure_logging()


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "prompt") -> Any:
    """A tqdm bar on stderr; a disabled one counts silently (it still has ``update``/``close``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
