"""Plugin manager, registry, entry-point discovery (a real installed example distribution)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from guardrail_plugins.residual_stream import ResidualStreamSource

from guardrail import hookimpl
from guardrail.cli import main
from guardrail.components import RefusalClassifier, Steerer, SteerOutcome, Verdict
from guardrail.errors import PluginError
from guardrail.plugins import Registry, build_plugin_manager, plugin_report, set_plugin_manager

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
    def guardrail_register_steerers(self, register: Any) -> None:
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
        def guardrail_register_steerers(self, register: Any) -> None:
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
        def guardrail_register_energy_models(self, register: Any) -> None:
            register(EchoSteerer, name="oops")

    plugin_manager.register(Bad(), name="bad")
    with pytest.raises(PluginError, match="plugin 'bad' registered .* as a energy_model"):
        Registry.from_plugin_manager(plugin_manager)


def test_plugin_raising_in_hook_is_named(plugin_manager) -> None:  # type: ignore[no-untyped-def]
    class Boom:
        @hookimpl
        def guardrail_register_suites(self, register: Any) -> None:
            raise RuntimeError("kaput")

    plugin_manager.register(Boom(), name="boom")
    with pytest.raises(
        PluginError,
        match="plugin 'boom' raised in hook guardrail_register_suites: RuntimeError: kaput",
    ):
        Registry.from_plugin_manager(plugin_manager)


def test_misspelled_hook_fails_loudly() -> None:
    class Typo:
        @hookimpl
        def guardrail_register_steerer(self, register: Any) -> None:  # missing "s"
            pass

    pm = build_plugin_manager(load_entrypoints=False)
    pm.register(Typo(), name="typo")
    with pytest.raises(Exception, match="unknown hook"):
        pm.check_pending()


def test_disable_env_blocks_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDRAIL_DISABLE_PLUGINS", "heuristic_classifier")
    pm = build_plugin_manager(load_entrypoints=False)
    assert Registry.from_plugin_manager(pm).names("refusal_classifier") == ["openai-judge"]


def test_unknown_component_lists_known(registry: Registry) -> None:
    with pytest.raises(PluginError, match="unknown steerer 'nope'; registered: ablate, gradient-descent, system-prompt"):
        registry.get("steerer", "nope")


def test_plugins_command_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--all"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {row["name"] for row in rows}
    assert names == {"residual_stream", "mlp_energy", "gradient_steerer", "heuristic_classifier",
                     "judge_classifier", "suites", "baselines"}
    steer = next(r for r in rows if r["name"] == "gradient_steerer")
    assert steer["hooks"] == ["guardrail_register_steerers"]
    assert steer["components"] == {"steerer": ["gradient-descent"]}
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
    def guardrail_register_activation_sources(self, register: Any) -> None:
        register(PromptOnlySource)

    @hookimpl
    def guardrail_register_refusal_classifiers(self, register: Any) -> None:
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
    from guardrail.guard import Guardrail
    from guardrail.policy import parse_policy

    from .test_steering import CONVERSATIONS, _artifact

    path = _artifact(tiny_loaded).save(tmp_path / "a.safetensors")
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
    for item in result.telemetry.layers:
        assert item.steps == 3 and item.generated_positions == 0  # prompt only: decode untouched
    assert [v.refused for v in guard.classify(["x", "y"], ["NO WAY", "sure, here"])] == [
        True,
        False,
    ]
