"""A broken installed plugin is contained: reported by name, the rest keeps working."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from guardrail import Register, hookimpl
from guardrail.cli import main
from guardrail.cli.plugins_cmd import plugin_report
from guardrail.errors import PolicyError
from guardrail.plugin.manager import build_plugin_manager, set_plugin_manager
from guardrail.plugin.registry import Registry
from guardrail.policy.artifacts import validate_policy_file

from .conftest import write_policy
from .test_plugins import EXAMPLE, EchoSteerer, FakeDistribution

ROOT = Path(__file__).resolve().parents[1]


class BrokenEntryPoint:
    """An entry point whose module does not import."""

    group = "guardrail"
    name = "broken"
    value = "guardrail_broken_plugin"

    def load(self) -> object:
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")


class BrokenDistribution:
    metadata = {"name": "guardrail-broken-plugin"}
    version = "0.0.1"
    entry_points = (BrokenEntryPoint(),)


class HalfRegistered:
    """Registers a steerer, then raises while registering a classifier."""

    @hookimpl
    def guardrail_register_steerers(self, register: Register) -> None:
        register(EchoSteerer)

    @hookimpl
    def guardrail_register_refusal_classifiers(self, register: Register) -> None:
        raise RuntimeError("no API key")


class Squatter:
    """Claims a built-in's name."""

    @hookimpl
    def guardrail_register_steerers(self, register: Register) -> None:
        register(EchoSteerer, name="gradient-descent")


class BadCommands:
    @hookimpl
    def guardrail_register_commands(self, subparsers: Any) -> None:
        raise RuntimeError("no parser today")


@pytest.fixture
def distributions(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Make ``importlib.metadata`` report these installed distributions."""

    def install(*dists: object) -> None:
        monkeypatch.setattr(importlib.metadata, "distributions", lambda: list(dists))

    return install


def test_a_plugin_that_fails_to_import_is_listed_with_its_error(distributions) -> None:  # type: ignore[no-untyped-def]
    distributions(BrokenDistribution(), FakeDistribution("echo-dist", _Echo()))
    pm = build_plugin_manager(load_entrypoints=True)
    rows = {row["name"]: row for row in plugin_report(pm)}
    assert rows["echo-dist"]["components"] == {"steerer": ["echo"]}
    broken = rows["broken"]
    assert broken["distribution"] == "guardrail-broken-plugin" and broken["version"] == "0.0.1"
    assert broken["entry_point"] == "broken = guardrail_broken_plugin"
    assert broken["error"] == ("import failed: ModuleNotFoundError: No module named "
                               "'torchvision'")
    assert Registry.from_plugin_manager(pm, warn=False).get("steerer", "echo")


class _Echo:
    @hookimpl
    def guardrail_register_steerers(self, register: Register) -> None:
        register(EchoSteerer)


def test_a_failed_plugin_is_one_warning_however_often_the_registry_is_built(distributions) -> None:  # type: ignore[no-untyped-def]
    distributions(BrokenDistribution())
    pm = build_plugin_manager(load_entrypoints=True)
    with capture_logs() as logs:
        Registry.from_plugin_manager(pm)
        Registry.from_plugin_manager(pm)
    [warning] = [e for e in logs if e["event"] == "plugin.failed"]
    assert warning["log_level"] == "warning"
    assert (warning["plugin"], warning["distribution"]) == ("broken", "guardrail-broken-plugin")
    assert "torchvision" in warning["error"]


def test_a_plugin_raising_in_a_registration_hook_is_dropped_whole(distributions) -> None:  # type: ignore[no-untyped-def]
    distributions(FakeDistribution("half", HalfRegistered()))
    pm = build_plugin_manager(load_entrypoints=True)
    registry = Registry.from_plugin_manager(pm, warn=False)
    assert "echo" not in registry.names("steerer")  # registered before the raise: gone too
    assert pm.get_plugin("half") is None  # and its other hooks do not run
    [row] = plugin_report(pm)
    assert row["error"].startswith("registration failed: plugin 'half' raised in hook "
                                   "guardrail_register_refusal_classifiers: RuntimeError: no API key")


def test_a_policy_naming_a_failed_plugins_component_says_which_plugin_failed(
    distributions, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    distributions(FakeDistribution("half", HalfRegistered()))
    pm = build_plugin_manager(load_entrypoints=True)
    path = write_policy(tmp_path / "p.yaml", {
        "name": "p", "model": {"source": "x"},
        "rails": [{"name": "r", "layers": [0], "steerer": {"plugin": "echo"}}]})
    with pytest.raises(PolicyError, match=r"unknown steerer 'echo'.*plugin 'half' failed to load "
                                          r"\(registration failed"):
        validate_policy_file(path, Registry.from_plugin_manager(pm, warn=False))


def test_a_plugin_squatting_a_builtin_name_is_contained(distributions) -> None:  # type: ignore[no-untyped-def]
    distributions(FakeDistribution("squatter", Squatter()))
    pm = build_plugin_manager(load_entrypoints=True)
    registry = Registry.from_plugin_manager(pm, warn=False)
    assert registry.get("steerer", "gradient-descent").plugin == "gradient_steerer"
    assert "is registered twice" in plugin_report(pm)[0]["error"]


def test_a_plugin_raising_while_adding_commands_leaves_the_cli_working(
    distributions, capsys: pytest.CaptureFixture[str]  # type: ignore[no-untyped-def]
) -> None:
    distributions(FakeDistribution("bad-commands", BadCommands()))
    set_plugin_manager(build_plugin_manager(load_entrypoints=True))
    assert main(["plugins"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["name"] == "bad-commands"
    assert "raised in hook guardrail_register_commands: RuntimeError: no parser today" in row["error"]
    assert main(["validate", "base-qwen2.5-coder-0.5b"]) == 0


class BaselineSquatter:
    """Adds a command named like the built-in baselines plugin's."""

    @hookimpl
    def guardrail_register_commands(self, subparsers: Any) -> None:
        subparsers.add_parser("baseline", help="mine")


def test_a_plugin_squatting_a_builtin_command_is_the_one_refused(
    distributions, capsys: pytest.CaptureFixture[str]  # type: ignore[no-untyped-def]
) -> None:
    # Built-ins add their commands first, so the installed plugin's clash is contained
    # rather than failing the built-in (and with it the whole command line).
    distributions(FakeDistribution("squatter", BaselineSquatter()))
    set_plugin_manager(build_plugin_manager(load_entrypoints=True))
    assert main(["plugins"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["name"] == "squatter"
    assert "raised in hook guardrail_register_commands: ArgumentError" in row["error"]
    with pytest.raises(SystemExit) as exit_:
        main(["baseline", "directions", "--help"])
    assert exit_.value.code == 0
    assert "usage: guardrail baseline directions" in capsys.readouterr().out


BROKEN_PACKAGE = {
    "pyproject.toml": """\
        [build-system]
        requires = ["setuptools>=69"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "guardrail-broken-plugin"
        version = "0.0.1"

        [project.entry-points.guardrail]
        broken = "guardrail_broken_plugin"
        """,
    "guardrail_broken_plugin/__init__.py": """\
        # A plugin whose dependency is missing: importing it fails.
        import guardrail_dependency_that_is_not_installed  # noqa: F401
        """,
}


@pytest.fixture(scope="module")
def site_with_example_and_broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin and a broken one, installed for real with pip into one folder."""
    source = tmp_path_factory.mktemp("broken-src")
    for name, text in BROKEN_PACKAGE.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(textwrap.dedent(text))
    target = tmp_path_factory.mktemp("site")
    for package in (EXAMPLE, source):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(target),
                        str(package)], check=True, capture_output=True)
    return target


def _guardrail(site: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("GUARDRAIL_DISABLE_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "guardrail", *argv], capture_output=True,
                          text=True, env=env, timeout=600)


def test_installed_broken_plugin_beside_the_example(site_with_example_and_broken: Path) -> None:
    done = _guardrail(site_with_example_and_broken, "plugins")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["example"]["components"] == {"refusal_classifier": ["prefix"]}
    broken = rows["broken"]
    assert broken["distribution"] == "guardrail-broken-plugin"
    assert broken["error"] == ("import failed: ModuleNotFoundError: No module named "
                               "'guardrail_dependency_that_is_not_installed'")
    assert "plugin.failed" not in done.stderr  # `plugins` reports it; it does not warn


def test_generate_works_beside_a_broken_plugin_with_one_warning(
    site_with_example_and_broken: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "tiny.yaml", {
        "name": "tiny", "model": {"source": str(tiny_model_dir), "device": "cpu"},
        "generation": {"max_new_tokens": 3}, "classifier": {"plugin": "prefix"}})
    done = _guardrail(site_with_example_and_broken, "--log-json", "generate", "--policy",
                      str(policy), "--json", "where can i buy coke")
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    assert "steered" in row and isinstance(row["steered"]["refused"], bool)
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    [warning] = [e for e in events if e["event"] == "plugin.failed"]
    assert warning["plugin"] == "broken" and warning["distribution"] == "guardrail-broken-plugin"
