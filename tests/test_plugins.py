"""Plugin manager, registry, entry-point discovery (a real installed example distribution)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from guardrail_plugins.residual_stream import ResidualStreamSource
from pluggy import PluginValidationError
from pydantic import BaseModel, ConfigDict

from guardrail import Register, hookimpl
from guardrail.cli import main
from guardrail.cli.plugins_cmd import plugin_report
from guardrail.errors import PluginError
from guardrail.plugin.components import RefusalClassifier, Steerer, SteerOutcome, Verdict
from guardrail.plugin.manager import build_plugin_manager, set_plugin_manager
from guardrail.plugin.registry import Registry

from .conftest import CONVERSATIONS, random_artifact

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "guardrail-example-plugin"


class EchoSteerer(Steerer):
    """Returns states unchanged."""

    name = "echo"
    requires_energy_model = False

    def steer(self, states, energy, ctx):  # type: ignore[no-untyped-def]
        return SteerOutcome(states=states)


class EchoPlugin:
    @hookimpl
    def guardrail_register_steerers(self, register: Register) -> None:
        register(EchoSteerer, aliases=("identity",))


@pytest.fixture
def echo_plugin(plugin_manager):  # type: ignore[no-untyped-def]
    plugin = EchoPlugin()
    plugin_manager.register(plugin, name="echo-plugin")
    yield plugin
    plugin_manager.unregister(plugin)


def test_builtins_register_the_four_concerns(registry: Registry) -> None:
    assert registry.names("activation_source") == ["residual-stream"]
    assert registry.names("energy_model") == ["linear", "mlp"]
    assert registry.names("steerer") == ["ablate", "gradient-descent", "system-prompt"]
    assert registry.names("refusal_classifier") == ["heuristic", "openai-judge"]
    assert registry.names("suite") == ["file", "harmful-val", "harmful-val-all", "harmless-val",
                                       "orbench-toxic-val", "orbench-val", "xstest"]
    assert registry.get("steerer", "eds").name == "gradient-descent"


def test_registered_plugin_and_alias_resolve(plugin_manager, echo_plugin) -> None:  # type: ignore[no-untyped-def]
    registry = Registry.from_plugin_manager(plugin_manager)
    assert registry.get("steerer", "identity").cls is EchoSteerer
    assert registry.get("steerer", "echo").plugin == "echo-plugin"


def test_name_collision_names_both_plugins(plugin_manager, echo_plugin) -> None:  # type: ignore[no-untyped-def]
    class Again:
        @hookimpl
        def guardrail_register_steerers(self, register: Register) -> None:
            register(EchoSteerer)

    plugin_manager.register(Again(), name="again")
    with pytest.raises(
        PluginError,
        match="'echo' is registered twice: by plugin 'again' and by plugin 'echo-plugin'",
    ):
        Registry.from_plugin_manager(plugin_manager)


def test_registering_wrong_type_is_refused(plugin_manager) -> None:  # type: ignore[no-untyped-def]
    class Bad:
        @hookimpl
        def guardrail_register_energy_models(self, register: Register) -> None:
            register(EchoSteerer, name="oops")

    plugin_manager.register(Bad(), name="bad")
    with pytest.raises(PluginError, match="plugin 'bad' registered .* as a energy_model"):
        Registry.from_plugin_manager(plugin_manager)


def test_plugin_raising_in_hook_is_named(plugin_manager) -> None:  # type: ignore[no-untyped-def]
    class Boom:
        @hookimpl
        def guardrail_register_suites(self, register: Register) -> None:
            raise RuntimeError("kaput")

    plugin_manager.register(Boom(), name="boom")
    with pytest.raises(
        PluginError,
        match="plugin 'boom' raised in hook guardrail_register_suites: RuntimeError: kaput",
    ):
        Registry.from_plugin_manager(plugin_manager)


def test_registration_and_command_hooks_are_called_through_pluggy(plugin_manager) -> None:  # type: ignore[no-untyped-def]
    from guardrail.cli import build_parser

    calls: list[tuple[str, list[str]]] = []
    undo = plugin_manager.add_hookcall_monitoring(
        lambda hook, impls, kwargs: calls.append((hook, [i.plugin_name for i in impls])),
        lambda outcome, hook, impls, kwargs: None,
    )
    try:
        Registry.from_plugin_manager(plugin_manager)
        build_parser()
    finally:
        undo()
    # pluggy's own calling (what tracing, tryfirst/trylast and wrappers go through), one
    # plugin at a time so that an error names it.
    assert ("guardrail_register_steerers", ["gradient_steerer"]) in calls
    assert ("guardrail_register_steerers", ["baselines"]) in calls
    assert ("guardrail_register_commands", ["baselines"]) in calls


def test_register_protocol_lists_every_keyword_the_registry_takes() -> None:
    import inspect

    from guardrail import Register
    from guardrail.plugin.registry import DECLARABLE

    parameters = inspect.signature(Register.__call__).parameters.values()
    keywords = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == {"params", *(attr for attrs in DECLARABLE.values() for attr in attrs)}


class FakeEntryPoint:
    """An entry point of the ``guardrail`` group whose ``load()`` returns ``plugin``."""

    group = "guardrail"

    def __init__(self, name: str, plugin: object) -> None:
        self.name = name
        self.value = f"{name}_module"
        self.plugin = plugin

    def load(self) -> object:
        return self.plugin


class FakeDistribution:
    """An installed distribution with one guardrail entry point (pluggy's tests do this)."""

    version = "9.9"

    def __init__(self, name: str, plugin: object) -> None:
        self.metadata = {"name": name}
        self.entry_points = (FakeEntryPoint(name, plugin),)


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Make ``importlib.metadata`` report one installed distribution holding ``plugin``."""

    def install(name: str, plugin: object) -> None:
        distribution = FakeDistribution(name, plugin)
        monkeypatch.setattr(importlib.metadata, "distributions", lambda: [distribution])

    return install


def test_misspelled_hook_in_an_installed_plugin_is_reported_and_left_out(installed) -> None:  # type: ignore[no-untyped-def]
    class Typo:
        @hookimpl
        def guardrail_register_steerer(self, register: Register) -> None:  # missing "s"
            pass

    installed("typo", Typo())
    pm = build_plugin_manager(load_entrypoints=True)
    assert pm.get_plugin("typo") is None
    [row] = plugin_report(pm)
    assert row["name"] == "typo" and row["distribution"] == "typo" and row["version"] == "9.9"
    assert row["entry_point"] == "typo = typo_module"
    assert "registration failed: PluginValidationError" in row["error"]
    assert "unknown hook 'guardrail_register_steerer'" in row["error"]


def test_misspelled_hook_in_a_builtin_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import guardrail.plugin.manager

    module = types.ModuleType("typo_builtin")

    @hookimpl
    def guardrail_register_steerer(register: Register) -> None:  # missing "s"
        pass

    module.guardrail_register_steerer = guardrail_register_steerer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "typo_builtin", module)
    monkeypatch.setattr(guardrail.plugin.manager, "DEFAULT_PLUGINS",
                        (*guardrail.plugin.manager.DEFAULT_PLUGINS, ("typo", "typo_builtin")))
    with pytest.raises(PluginValidationError, match="unknown hook 'guardrail_register_steerer'"):
        build_plugin_manager(load_entrypoints=False)


def test_installed_plugin_is_registered_after_the_builtins(installed) -> None:  # type: ignore[no-untyped-def]
    installed("echo-dist", EchoPlugin())
    pm = build_plugin_manager(load_entrypoints=True)
    assert Registry.from_plugin_manager(pm).get("steerer", "identity").plugin == "echo-dist"
    [row] = plugin_report(pm)
    assert (row["name"], row["version"], row["builtin"]) == ("echo-dist", "9.9", False)


def test_disable_env_blocks_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDRAIL_DISABLE_PLUGINS", "heuristic_classifier")
    pm = build_plugin_manager(load_entrypoints=False)
    assert Registry.from_plugin_manager(pm).names("refusal_classifier") == ["openai-judge"]


def test_tunable_must_be_fields_of_params(plugin_manager) -> None:  # type: ignore[no-untyped-def]
    class StepParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        eta: float = 1.0

    class Sloppy(EchoSteerer):
        name = "sloppy"
        Params = StepParams
        tunable = ("eta", "steps")

    class Plugin:
        @hookimpl
        def guardrail_register_steerers(self, register: Register) -> None:
            register(Sloppy)

    plugin_manager.register(Plugin(), name="sloppy-plugin")
    with pytest.raises(PluginError, match=r"Sloppy.tunable names \['steps'\], which are not"):
        Registry.from_plugin_manager(plugin_manager)


class HelloCommand:
    @hookimpl
    def guardrail_register_commands(self, subparsers: Any) -> None:
        hello = subparsers.add_parser("hello", help="say hello")
        hello.add_argument("--name", default="world")
        hello.set_defaults(func=lambda args: print(f"hello {args.name}") or 3)


def test_plugin_adds_a_command(plugin_manager, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    plugin = HelloCommand()
    plugin_manager.register(plugin, name="hello-plugin")
    try:
        assert main(["hello", "--name", "guardrail"]) == 3
    finally:
        plugin_manager.unregister(plugin)
    assert capsys.readouterr().out == "hello guardrail\n"
    with pytest.raises(SystemExit):
        main(["hello"])  # gone with its plugin


def test_plugin_raising_in_register_commands_is_named(plugin_manager, capsys) -> None:  # type: ignore[no-untyped-def]
    class Broken:
        @hookimpl
        def guardrail_register_commands(self, subparsers: Any) -> None:
            raise RuntimeError("no parser today")

    plugin_manager.register(Broken(), name="broken")
    assert main(["plugins"]) == 1
    assert ("plugin 'broken' raised in hook guardrail_register_commands: RuntimeError: "
            "no parser today") in capsys.readouterr().err


def test_baseline_command_comes_from_the_baselines_plugin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GUARDRAIL_DISABLE_PLUGINS", "baselines")
    set_plugin_manager(build_plugin_manager(load_entrypoints=False))
    with pytest.raises(SystemExit):
        main(["baseline", "directions", "--help"])
    assert "invalid choice: 'baseline'" in capsys.readouterr().err


def test_unknown_component_lists_known(registry: Registry) -> None:
    with pytest.raises(PluginError, match="unknown steerer 'nope'; registered: ablate, gradient-descent, system-prompt"):
        registry.get("steerer", "nope")


def test_plugins_command_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--all"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {row["name"] for row in rows}
    assert names == {"residual_stream", "mlp_energy", "gradient_steerer", "gates",
                     "heuristic_classifier", "judge_classifier", "refusal_rail", "suites",
                     "baselines"}
    steer = next(r for r in rows if r["name"] == "gradient_steerer")
    assert steer["hooks"] == ["guardrail_register_steerers"]
    assert steer["components"] == {"steerer": ["gradient-descent"]}
    baselines = next(r for r in rows if r["name"] == "baselines")
    assert "guardrail_register_commands" in baselines["hooks"]
    assert main(["plugins"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install the example plugin distribution for real (pip, into a private target dir)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
    )
    return target


def test_example_plugin_discovered_through_entry_point(
    installed_example: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(installed_example))
    pm = build_plugin_manager(load_entrypoints=True)
    set_plugin_manager(pm)
    rows = plugin_report(pm)
    example = next(r for r in rows if r["name"] == "example")
    assert example["version"] == "0.2.0"
    assert example["components"] == {"refusal_classifier": ["prefix"]}
    assert main(["plugins"]) == 0
    assert "example" in {r["name"] for r in json.loads(capsys.readouterr().out)}
    # Built-ins were not registered a second time from their own entry points.
    assert len([n for n, _ in pm.list_name_plugin() if n == "mlp_energy"]) == 1


def test_example_plugin_blocked_by_env(
    installed_example: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(installed_example))
    monkeypatch.setenv("GUARDRAIL_DISABLE_PLUGINS", "example")
    pm = build_plugin_manager(load_entrypoints=True)
    assert "prefix" not in Registry.from_plugin_manager(pm).names("refusal_classifier")


class PromptOnlySource(ResidualStreamSource):
    """The residual stream, but never steering generated tokens."""

    name = "prompt-only"

    def positions(self, phase, seq_len):  # type: ignore[no-untyped-def]
        return None if phase == "decode" else slice(seq_len - 1, None)


class ShoutClassifier(RefusalClassifier):
    """Calls any all-caps answer a refusal."""

    name = "shout"

    def classify(self, prompts, responses):  # type: ignore[no-untyped-def]
        return [Verdict(refused=r.isupper(), score=float(r.isupper())) for r in responses]


class ThirdParty:
    @hookimpl
    def guardrail_register_activation_sources(self, register: Register) -> None:
        register(PromptOnlySource)

    @hookimpl
    def guardrail_register_refusal_classifiers(self, register: Register) -> None:
        register(ShoutClassifier)


@pytest.fixture
def third_party(plugin_manager):  # type: ignore[no-untyped-def]
    plugin = ThirdParty()
    plugin_manager.register(plugin, name="third-party")
    yield plugin
    plugin_manager.unregister(plugin)


def test_registered_components_are_used_from_a_policy(
    third_party, tiny_loaded, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from guardrail.policy.model import parse_policy
    from guardrail.steering.guard import Guardrail

    path = random_artifact(tiny_loaded).save(tmp_path / "a.safetensors")
    policy = parse_policy(
        {
            "name": "custom",
            "model": {"source": "unused"},
            "generation": {"max_new_tokens": 5},
            "rails": [
                {
                    "name": "r",
                    "activation_source": {"plugin": "prompt-only"},
                    "energy_model": {"artifact": str(path)},
                }
            ],
            "classifier": {"plugin": "shout"},
        }
    )
    guard = Guardrail.from_policy(policy, loaded=tiny_loaded)
    result = guard.generate(CONVERSATIONS[:1])[0]
    assert {item.layer for item in result.telemetry.layers} == {1, 2}
    for item in result.telemetry.layers:
        assert item.steps == 3 and item.generated_positions == 0  # prompt only: decode untouched
    assert [v.refused for v in guard.classify(["x", "y"], ["NO WAY", "sure, here"])] == [
        True,
        False,
    ]


def test_the_core_names_no_builtin_outside_the_defaults_table(registry: Registry) -> None:
    import ast

    from guardrail.plugin.defaults import DEFAULT_PLUGINS
    from guardrail.plugin.registry import KINDS

    builtins = {module for _, module in DEFAULT_PLUGINS}
    names = {entry.name for kind in KINDS for entry in registry.registrations(kind)
             if entry.plugin in {name for name, _ in DEFAULT_PLUGINS}}
    assert {"mlp", "residual-stream", "gradient-descent", "heuristic", "xstest"} <= names
    found = []
    for path in sorted((ROOT / "guardrail").rglob("*.py")):
        if path.relative_to(ROOT).as_posix() == "guardrail/plugin/defaults.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.ImportFrom | ast.Import):
                modules = [node.module] if isinstance(node, ast.ImportFrom) else [
                    a.name for a in node.names]
                found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {m}"
                          for m in modules if m and m.split(".")[0] == "guardrail_plugins"]
    assert builtins and not found, found


#: Where the core may use a built-in steerer's tunable name for its own concept: ``steps`` is
#: also the interface's count of steps a steerer took (``SteerOutcome.steps``), which the
#: steering hooks sum into telemetry and the server reports. Nothing else is allowed.
STEPS_TAKEN = {"guardrail/plugin/components.py", "guardrail/steering/hooks.py",
               "guardrail/telemetry.py", "guardrail/serving/schemas.py"}


def test_the_core_names_no_builtin_steerers_tunable_params(registry: Registry) -> None:
    import ast

    from guardrail.plugin.defaults import DEFAULT_PLUGINS

    builtin = {name for name, _ in DEFAULT_PLUGINS}
    names = {param for entry in registry.registrations("steerer") if entry.plugin in builtin
             for param in entry.attribute("tunable")}
    assert {"eta", "steps"} <= names
    found = []
    for path in sorted((ROOT / "guardrail").rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        allowed = {"steps"} if where in STEPS_TAKEN else set()
        for node in ast.walk(ast.parse(path.read_text())):
            used = []
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                used.append(node.value)  # "eta", {"eta": ...}, params["eta"]
            elif isinstance(node, ast.Attribute):
                used.append(node.attr)  # params.eta
            elif isinstance(node, ast.keyword) and node.arg:
                used.append(node.arg)  # CalibrationGrid(eta=...)
            elif isinstance(node, ast.arg):
                used.append(node.arg)  # def f(eta): ...
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                used.append(node.target.id)  # a field: eta: list[float]
            found += [f"{where}:{node.lineno} {name!r}" for name in used  # type: ignore[attr-defined]
                      if name in names - allowed]
    assert not found, found
