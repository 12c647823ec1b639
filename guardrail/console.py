"""Text for a terminal: control characters escaped, expanded secrets hidden; log
configuration and progress bars.

Request paths, model names, policy strings and file names reach the console from untrusted
sources (a client, a downloaded policy, a file name). Written raw, an ESC or OSC sequence
rewrites the terminal's title or colours, moves the cursor over earlier lines, or (on some
terminals) writes to the clipboard; a C1 control such as U+009B is a one-byte CSI; bidi
controls (U+202E) make text read differently from what it is. :func:`printable` escapes all
of them (as ``\\x1b``, ``\\u202e``), keeping tabs and, where asked, newlines.

A policy may name ``${VAR}`` in a path; :func:`remember_expansion` records each value taken
from the environment, and :func:`printable` shows it as ``${VAR}`` again, so a secret put in
a path is never echoed to a terminal or a log.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Any

import structlog

# C0 controls but tab and newline, DEL, C1 controls, the bidi embeddings, overrides and
# isolates, the bidi marks, and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029"
                       "\u202a-\u202e\u2066-\u2069]")
_NEWLINES = re.compile("[\t\n]")
#: Values shorter than this are not hidden (they would hide every occurrence of "1" or "ab").
MIN_SECRET = 4
_EXPANDED: dict[str, str] = {}


def remember_expansion(name: str, value: str) -> None:
    """Record that ``${name}`` was replaced by ``value`` (from the environment)."""
    if len(value) >= MIN_SECRET:
        _EXPANDED[value] = name


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: Any, *, newlines: bool = True) -> str:
    """``text`` safe for a terminal: controls escaped (tab and newline kept with
    ``newlines``), environment values a policy expanded shown as ``${VAR}``."""
    text = _CONTROLS.sub(_escape, redact(str(text)))
    return text if newlines else _NEWLINES.sub(_escape, text)


def redact(text: str) -> str:
    """``text`` with every environment value a policy expanded shown as ``${VAR}``."""
    for value in sorted(_EXPANDED, key=len, reverse=True):
        if value in text:
            text = text.replace(value, "${" + _EXPANDED[value] + "}")
    return text


def escape_event(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """A structlog processor for the console renderer: every string field printable and on
    one line (a traceback keeps its newlines); strings inside lists and mappings, which the
    renderer shows with ``repr`` (itself escaping controls), have secrets hidden."""
    return {key: printable(value, newlines=key == "exception") if isinstance(value, str)
            else _redacted(value) for key, value in event.items()}


def redact_event(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """A structlog processor for the JSON renderer (which escapes controls itself): secrets
    hidden in every string."""
    return {key: _redacted(value) for key, value in event.items()}


def _redacted(value: Any) -> Any:
    if not _EXPANDED:
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {_redacted(k): _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redacted(v) for v in value)
    return value


class EscapingWriter:
    """A text stream that writes :func:`printable` text (tabs and newlines kept) to another:
    the command line's stdout, so no command prints a control sequence it was handed."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(printable(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


# --- logs and progress bars ----------------------------------------------------------------
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
