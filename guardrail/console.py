"""Text for a terminal: control characters escaped, expanded secrets hidden.

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

import re
from typing import Any

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
