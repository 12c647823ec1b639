"""Reading a policy file safely: bounded size, nesting and alias expansion; plain data only.

A policy file is untrusted input (a download, a pull request, a typo). Whatever it holds,
:func:`read_policy_file` returns a plain mapping (``dict``/``list``/``str``/``int``/``float``/
``bool``/``None``) or raises :class:`PolicyError` naming the file and the line, and it does
so quickly and in bounded memory:

- at most :data:`MAX_BYTES` bytes, UTF-8 text;
- at most :data:`MAX_DEPTH` levels of nesting and :data:`MAX_NODES` nodes, counting every
  node an alias stands for (so a "billion laughs" alias bomb is refused after a few
  thousand nodes, and the message never echoes the value);
- no recursive aliases, no duplicate keys, only string keys, no NUL or other control
  characters (tab and newlines are fine) or lone surrogates in strings, no tags beyond
  YAML's plain data types (timestamps stay strings).

Events come from libyaml when PyYAML has it (fast), else from PyYAML's pure-Python parser;
the composer that turns them into nodes is PyYAML's, with the limits added.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, ScalarEvent
from yaml.nodes import MappingNode, Node
from yaml.resolver import Resolver

from guardrail.errors import PolicyError

MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 20_000
# Longest YAML error message passed on (an undefined alias name could be a megabyte long).
MAX_MESSAGE = 300

try:  # libyaml parses about five times faster; fall back to PyYAML's own parser
    from yaml.cyaml import CParser as _Parser
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)

# NUL (no path may hold one), other C0 controls but tab and newlines (terminal escapes in a
# policy name would reach the terminal), DEL, and lone surrogates (not encodable text).
_BAD_CHARACTER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    """The document breaks one of the limits; ``mark`` says where."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


class _LimitedComposer(Composer):
    """PyYAML's composer with depth, node-count, alias and string checks.

    Depth is counted after alias expansion: an alias stands for its anchor's whole subtree,
    so ``*a`` at depth 3 of an anchor 40 levels deep nests the document 43 levels deep.
    """

    def _setup_limits(self) -> None:
        self._depth = 0
        self._nodes = 0
        self._sizes: dict[str, int] = {}
        self._heights: dict[str, int] = {}
        self._deepest = 0  # the deepest level reached inside the node being composed
        self._aliased = 0

    def _reach(self, depth: int, mark: Any, aliased: bool = False) -> None:
        if depth > MAX_DEPTH:
            how = " once aliases are expanded" if aliased else ""
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep{how}", mark)
        self._deepest = max(self._deepest, depth)

    def _count(self, nodes: int, mark: Any) -> None:
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            why = (f"; aliases stand for {self._aliased} of them (an alias bomb?)"
                   if self._aliased else "")
            raise _Refused(f"the document expands to more than {MAX_NODES} nodes{why}; "
                           "policy files are far smaller", mark)

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            if event.anchor in self.anchors and event.anchor not in self._sizes:
                raise _Refused(f"alias *{_short(event.anchor)} refers to a node that contains "
                               "it; recursive structures are not allowed", event.start_mark)
            size = self._sizes.get(event.anchor, 1)
            self._aliased += size
            self._count(size, event.start_mark)
            self._reach(self._depth + self._heights.get(event.anchor, 1), event.start_mark,
                        aliased=True)
            return super().compose_node(parent, index)
        if isinstance(event, ScalarEvent) and _BAD_CHARACTER.search(event.value):
            raise _Refused(_bad_character_message(event.value), event.start_mark)
        self._depth = depth = self._depth + 1
        if depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        before, outer = self._nodes, self._deepest
        self._deepest = depth
        self._nodes += 1
        if self._nodes > MAX_NODES:
            self._count(0, event.start_mark)
        node: Node = super().compose_node(parent, index)
        if event.anchor is not None:
            self._sizes[event.anchor] = self._nodes - before
            self._heights[event.anchor] = self._deepest - depth + 1
        if outer > self._deepest:
            self._deepest = outer
        self._depth = depth - 1
        return node


class _PlainDataConstructor(SafeConstructor):
    """JSON-like values only: string keys, no duplicates, timestamps left as strings."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise _Refused(f"mapping key {_short(repr(key))} ({type(key).__name__}) is "
                                   "not a string; quote it", key_node.start_mark)
                if key in seen:
                    raise _Refused(f"duplicate key {_short(repr(key))} (first at line "
                                   f"{seen[key].line + 1}); each key may appear once",
                                   key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Node) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise _Refused("integer too large", node.start_mark) from None

    def construct_timestamp_text(self, node: Node) -> str:
        return str(self.construct_scalar(node))

    def construct_refused(self, node: Node) -> Any:
        tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
        raise _Refused(f"tag {_short(tag)!r} is not allowed in a policy file (plain data only)",
                       node.start_mark)


_PlainDataConstructor.add_constructor(
    "tag:yaml.org,2002:int", _PlainDataConstructor.construct_yaml_int)
_PlainDataConstructor.add_constructor(
    "tag:yaml.org,2002:timestamp", _PlainDataConstructor.construct_timestamp_text)
for _tag in ("binary", "set", "omap", "pairs"):
    _PlainDataConstructor.add_constructor(
        f"tag:yaml.org,2002:{_tag}", _PlainDataConstructor.construct_refused)
_PlainDataConstructor.add_constructor(None, _PlainDataConstructor.construct_refused)


class PolicyLoader(_LimitedComposer, _Parser, _PlainDataConstructor, Resolver):
    """A YAML loader for untrusted policy files (see the module docstring for the limits)."""

    def __init__(self, stream: str) -> None:
        _Parser.__init__(self, stream)
        Composer.__init__(self)
        _PlainDataConstructor.__init__(self)
        Resolver.__init__(self)
        self._setup_limits()


def read_policy_file(path: Path) -> dict[str, Any]:
    """The top-level mapping of the policy file at ``path``; :class:`PolicyError` otherwise."""
    text = _read_text(path)
    loader = PolicyLoader(text)
    try:
        data = loader.get_single_data()
    except _Refused as exc:
        raise PolicyError(str(path), [f"{_where(exc.mark)}{exc.message}"]) from None
    except yaml.YAMLError as exc:
        message = str(exc)
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + " [...]"
        raise PolicyError(str(path), [f"not valid YAML: {message}"]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise PolicyError(str(path), [f"top level: expected a mapping, got {type(data).__name__}"])
    return data


def resolved(path: Path) -> Path:
    """``path`` made absolute with symlinks followed; a symlink loop (or a path the system
    cannot follow) is a :class:`PolicyError` naming it, not a traceback."""
    try:
        return path.expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: a loop, on Python < 3.13
        why = "a symlink loop" if isinstance(exc, RuntimeError) or getattr(
            exc, "errno", None) == errno.ELOOP else f"not usable ({exc.__class__.__name__})"
        raise PolicyError(str(path), [f"the path is {why}; expected a file"]) from None


def read_policy_text(path: Path) -> str:
    """The text of a policy file, with the limits of :func:`read_policy_file` on size and
    encoding (``guardrail policy show --source``)."""
    return _read_text(path)


def _read_text(path: Path) -> str:
    try:
        if not path.exists():
            raise PolicyError(str(path), ["file not found"])
        if not path.is_file():
            raise PolicyError(str(path), ["not a regular file"])
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise PolicyError(str(path), [f"the file is {size} bytes; policy files may be at "
                                          f"most {MAX_BYTES} bytes"])
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise PolicyError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_BYTES:  # it grew since stat, or is not what stat said
        raise PolicyError(str(path), [f"the file is over {MAX_BYTES} bytes; policy files may "
                                      f"be at most {MAX_BYTES} bytes"])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PolicyError(str(path), [
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} cannot be "
            "decoded; policy files must be UTF-8 encoded YAML"]) from None


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _bad_character_message(value: str) -> str:
    found = _BAD_CHARACTER.search(value)
    assert found is not None
    char = found.group()
    if char == "\x00":
        what = "a NUL character"
    elif "\ud800" <= char <= "\udfff":
        what = f"a lone surrogate ({char!r})"
    else:
        what = f"a control character (U+{ord(char):04X})"
    return f"a string contains {what} at position {found.start()}; expected plain text"
