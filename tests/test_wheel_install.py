"""The newcomer path, as a new user meets it: the wheel built from this checkout, installed into
a fresh virtual environment, its commands, and the README's Python snippet run end to end on
SmolLM2 (the README names the Qwen policy; the snippet is run with the SmolLM2 one).

By default the fresh environment borrows this one's dependencies through a ``.pth`` line (the
wheel itself is installed with ``--no-deps``, and ``guardrail`` is imported from it, which the
test checks), so the test takes a minute. ``GUARDRAIL_WHEEL_TEST_FULL=1`` (``make
test-wheel``) resolves every dependency from the package index instead, CPU torch first as the
README says, and checks that no CUDA build came along.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOL_POLICY = "eds-smollm2-135m"
README_POLICY = '"eds-qwen2.5-coder-0.5b"'
FULL = os.environ.get("GUARDRAIL_WHEEL_TEST_FULL") == "1"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.integration


def readme_snippet() -> str:
    """The README's Python snippet, on the SmolLM2 policy."""
    section = (ROOT / "README.md").read_text().split("## Use it from Python", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert snippet.count(README_POLICY) == 1, "the README snippet names its policy once"
    return snippet.replace(README_POLICY, f'"{SMOL_POLICY}"')


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 600
         ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}: {done.returncode}\n{done.stdout[-2000:]}\n" \
                                 f"{done.stderr[-4000:]}"
    return done


def _fresh_venv(tmp_path: Path, wheel: Path, env: dict[str, str]) -> Path:
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    if FULL:
        _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
        torch_version = __import__("torch").__version__.split("+")[0]
        _run([str(python), "-m", "pip", "install", "--quiet", f"torch=={torch_version}",
              "--index-url", CPU_INDEX], tmp_path, env, timeout=1800)
        _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], tmp_path, env,
             timeout=1800)
        listed = _run([str(python), "-m", "pip", "list", "--format=freeze"], tmp_path, env)
        cuda = [line for line in listed.stdout.splitlines() if line.startswith("nvidia-")]
        assert not cuda, f"a CUDA build came along: {cuda}"
        assert "+cpu" in _run([str(python), "-c", "import torch; print(torch.__version__)"],
                              tmp_path, env).stdout
        return venv
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
          "--no-deps", "--no-index", str(wheel)], tmp_path, env)
    # This environment's packages as the fresh one's dependencies (a .pth line adds a path;
    # the .pth files in it, this checkout's editable install among them, are not run).
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                    "['purelib'])"], tmp_path, env).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "outer-dependencies.pth").write_text("\n".join(sorted(outer)) + "\n")
    return venv


def test_the_wheel_in_a_fresh_venv_fetches_validates_and_runs_the_readme_snippet(
        tmp_path: Path) -> None:
    from guardrail.models import is_installed

    if not FULL and not is_installed("smollm2-135m-instruct"):
        pytest.skip("smollm2-135m-instruct is not installed (guardrail models fetch "
                    "--policy eds-smollm2-135m)")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("VIRTUAL_ENV", "PYTHONPATH", "GUARDRAIL_DISABLE"))}
    env.update(PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--wheel-dir", str(dist), str(ROOT)], tmp_path, env)
    [wheel] = dist.glob("guardrail_eds-*-py3-none-any.whl")
    venv = _fresh_venv(tmp_path, wheel, env)
    python, guardrail = str(venv / "bin" / "python"), str(venv / "bin" / "guardrail")
    work = tmp_path / "work"  # not the checkout: nothing may import from it
    work.mkdir()

    where = _run([python, "-c", "import guardrail, guardrail_plugins; "
                  "print(guardrail.__file__); print(guardrail_plugins.__file__)"], work, env)
    assert all(line.startswith(str(venv)) for line in where.stdout.split()), where.stdout
    assert _run([guardrail, "--version"], work, env).stdout.startswith("guardrail 0.")
    # The README's newcomer commands: fetch everything the policy needs, then list and check.
    _run([guardrail, "models", "fetch", "--policy", SMOL_POLICY], work, env, timeout=1800)
    assert SMOL_POLICY in _run([guardrail, "policy", "list"], work, env).stdout
    _run([guardrail, "validate", SMOL_POLICY], work, env)

    (work / "snippet.py").write_text(readme_snippet())
    done = _run([python, "snippet.py"], work, env, timeout=900)
    summary = next(line for line in done.stdout.splitlines() if line.startswith("{'steered'"))
    assert "'gates': [{'rail': 'eds', 'score':" in summary, summary
    assert re.search(r"'mean_energy_before': ", summary)

    # The own-model example, from the installed wheel, with the command its docstring gives:
    # it loads the GGUF file itself (the policy alone is satisfied by a filled cache).
    _run([guardrail, "models", "fetch", "smollm2-135m-instruct"], work, env, timeout=1800)
    example = _run([python, str(ROOT / "docs" / "examples" / "own_model.py"),
                    "--max-new-tokens", "8"], work, env, timeout=900)
    assert "steered:" in example.stdout
