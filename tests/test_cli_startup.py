"""The command line starts without torch: --help, --version, validate, plugins, policy tools."""

from __future__ import annotations

import subprocess
import sys

import pytest

from guardrail import __version__

PROBE = """
import sys
from guardrail.cli import main
try:
    code = main({argv!r})
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "transformers", "safetensors", "numpy") if m in sys.modules)
print("EXIT", code, "HEAVY", ",".join(heavy) or "-", file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["--version"],
    # A policy that names an artifact loads it to check it (torch); these name none.
    ["validate", "system-prompt-qwen2.5-coder-0.5b", "base-qwen2.5-coder-0.5b"],
    ["plugins", "--all"],
    ["policy", "list"],
    ["policy", "schema"],
    ["generate", "--help"],
])
def test_command_imports_no_torch(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True,
                          text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("EXIT 0 "), done.stderr
    assert last.endswith("HEAVY -"), f"{argv} imported {last.split('HEAVY ')[1]}"


def test_version() -> None:
    done = subprocess.run([sys.executable, "-m", "guardrail", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"guardrail {__version__}"
    from importlib.metadata import version

    assert version("guardrail-eds") == __version__  # one version, read from the package
