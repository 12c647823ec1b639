"""Every hookspec is documented and tested; the telemetry hooks fire with real values."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guardrail import hookimpl
from guardrail.plugin import hookspecs
from guardrail.steering.guard import Guardrail

from .conftest import CONVERSATIONS, random_artifact, tiny_policy

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(
    name
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("guardrail_")
)


def test_hookspecs_follow_conventions() -> None:
    assert SPECS, "no hookspecs found"
    for name in SPECS:
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and len(fn.__doc__) > 40, f"{name} needs a docstring"
        assert "return" in fn.__doc__.lower(), f"{name}'s docstring must say what it returns"
        firstresult = bool(fn.guardrail_spec["firstresult"])
        said = "firstresult" in fn.__doc__ and ("not firstresult" in fn.__doc__) != firstresult
        assert said, f"{name}'s docstring must say whether it is firstresult ({firstresult})"
        assert all(
            p.annotation is not inspect.Parameter.empty
            for p in inspect.signature(fn).parameters.values()
        ), name


def _argnames(fn: Callable[..., Any]) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("name", SPECS)
def test_every_hookspec_is_documented(name: str) -> None:
    # A row of the hook table in docs/plugins.md: `name(args)` | kind | what it receives.
    args = ", ".join(_argnames(getattr(hookspecs, name)))
    row = re.compile(rf"^\| `{name}\({re.escape(args)}\)` \| \w+ \| .{{20,}} \|$", re.MULTILINE)
    assert row.search((ROOT / "docs" / "plugins.md").read_text()), (
        f"docs/plugins.md has no hook-table row for `{name}({args})`"
    )


def _test_hookimpls() -> Iterator[tuple[str, ast.FunctionDef]]:
    """(test file, function) for every ``@hookimpl``-decorated function in a test module,
    nested ones (throwaway plugin classes inside a test) included."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Name) and d.id == "hookimpl" for d in node.decorator_list
            ):
                yield path.name, node


@pytest.mark.parametrize("name", SPECS)
def test_every_hookspec_has_a_test(name: str) -> None:
    # A real implementation in a test: decorated with @hookimpl, named after the spec, taking
    # only arguments the spec passes (what pluggy checks when the plugin is registered).
    spec_args = set(_argnames(getattr(hookspecs, name)))
    impls = [(file, fn) for file, fn in _test_hookimpls() if fn.name == name]
    assert impls, f"no test implements {name} with @hookimpl"
    for file, fn in impls:
        args = [a.arg for a in fn.args.args if a.arg != "self"]
        assert set(args) <= spec_args, f"{file}:{fn.lineno} {name} takes {args}"


class Recorder:
    """Records the telemetry hooks."""

    def __init__(self) -> None:
        self.steps: list[Any] = []
        self.generations: list[tuple[Any, dict[str, Any]]] = []

    @hookimpl
    def guardrail_on_step(self, event: Any) -> None:
        self.steps.append(event)

    @hookimpl
    def guardrail_on_generation(self, telemetry: Any, extra: dict[str, Any]) -> None:
        self.generations.append((telemetry, extra))


@pytest.fixture
def recorder(plugin_manager):  # type: ignore[no-untyped-def]
    rec = Recorder()
    plugin_manager.register(rec, name="recorder")
    yield rec
    plugin_manager.unregister(rec)


def test_telemetry_hooks_fire(recorder: Recorder, tiny_loaded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = random_artifact(tiny_loaded).save(tmp_path / "a.safetensors")
    guard = Guardrail.from_policy(tiny_policy(path), loaded=tiny_loaded)  # type: ignore[arg-type]
    results = guard.generate(CONVERSATIONS[:2], batch_size=2, max_new_tokens=4)
    prefill = [e for e in recorder.steps if e.phase == "prefill"]
    assert {(e.rail, e.layer) for e in prefill} == {("eds", 1), ("eds", 2)}
    assert all(len(e.energy_before) == 2 and all(s == 3 for s in e.steps) for e in prefill)
    assert any(e.phase == "decode" for e in recorder.steps)
    assert len(recorder.generations) == 2
    assert recorder.generations[0][1] == {"policy": "tiny"}
    assert recorder.generations[0][0] is results[0].telemetry
