"""Every hookspec is documented and tested; the telemetry hooks fire with real values."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from guardrail import hookimpl, hookspecs
from guardrail.guard import Guardrail

from .test_steering import CONVERSATIONS, _artifact, _policy

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
        assert all(
            p.annotation is not inspect.Parameter.empty
            for p in inspect.signature(fn).parameters.values()
        ), name


@pytest.mark.parametrize("name", SPECS)
def test_every_hookspec_is_documented(name: str) -> None:
    assert f"`{name}(" in (ROOT / "docs" / "plugins.md").read_text(), (
        f"{name} missing from docs/plugins.md"
    )


@pytest.mark.parametrize("name", SPECS)
def test_every_hookspec_has_a_test(name: str) -> None:
    mine = Path(__file__).name
    used = [
        p.name
        for p in (ROOT / "tests").rglob("test_*.py")
        if p.name != mine and name in p.read_text()
    ]
    used += [mine] if f"def {name}(" in Path(__file__).read_text() else []
    assert used, f"no test exercises {name}"


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
    path = _artifact(tiny_loaded).save(tmp_path / "a.safetensors")
    guard = Guardrail.from_policy(_policy(path), loaded=tiny_loaded)  # type: ignore[arg-type]
    results = guard.generate(CONVERSATIONS[:2], batch_size=2, max_new_tokens=4)
    prefill = [e for e in recorder.steps if e.phase == "prefill"]
    assert {(e.rail, e.layer) for e in prefill} == {("eds", 1), ("eds", 2)}
    assert all(len(e.energy_before) == 2 and all(s == 3 for s in e.steps) for e in prefill)
    assert any(e.phase == "decode" for e in recorder.steps)
    assert len(recorder.generations) == 2
    assert recorder.generations[0][1] == {"policy": "tiny"}
    assert recorder.generations[0][0] is results[0].telemetry
