"""The wheel: shipped policies and artifacts inside, side by side; dependencies as declared."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    [path] = out.glob("guardrail_eds-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_ships_every_policy_and_artifact_beside_each_other(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for policy in (ROOT / "policies").glob("*.yaml"):
        assert f"guardrail/policies/{policy.name}" in names, policy.name
    for artifact in [*(ROOT / "artifacts").glob("*.safetensors"),
                     *(ROOT / "artifacts").glob("*.json")]:
        assert f"guardrail/artifacts/{artifact.name}" in names, artifact.name
    assert "guardrail/artifacts/__init__.py" in names and "guardrail/policies/__init__.py" in names
    assert "guardrail_plugins/mlp_energy/model.py" in names
    # Every source module of the checkout is in the wheel (a sub-package setup.py did not
    # find would install a guardrail that cannot import its built-ins).
    for folder, package in ((ROOT / "guardrail", "guardrail"), (ROOT / "plugins", "guardrail_plugins")):
        for module in folder.rglob("*.py"):
            assert f"{package}/{module.relative_to(folder).as_posix()}" in names, module
    assert not [n for n in names if n.startswith(("tests/", "docs/", "bench/"))]


def test_wheel_metadata_keeps_test_tools_in_extras(wheel: zipfile.ZipFile) -> None:
    [meta_name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    meta = Parser().parsestr(wheel.read(meta_name).decode())
    requires = meta.get_all("Requires-Dist") or []
    runtime = [r for r in requires if "extra ==" not in r]
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in runtime}
    assert not names & {"pytest", "pytest-timeout", "ruff", "mypy", "openai"}
    assert "accelerate" in names  # transformers' GGUF loading needs it
    assert "transformers>=4.56" in runtime
    assert {"serve", "test", "dev"} <= set(meta.get_all("Provides-Extra") or [])
    assert any("pytest" in r and 'extra == "test"' in r for r in requires)
    assert meta["Version"] == __import__("guardrail").__version__
    # Its own name on PyPI (`guardrail` there is another project); `import guardrail` stays.
    assert meta["Name"] == "guardrail-eds"
    assert any(r.startswith("guardrail-eds[") and "test" in r.split(";")[0]
               and 'extra == "dev"' in r for r in requires)
