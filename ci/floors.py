"""Print the declared minimum versions as pip constraints (``name==floor``), one a line.

``make test-floors`` installs the project under them and runs the fast suite, so a floor in
``pyproject.toml`` is a version that was tested, not a guess. Every ``name>=X`` of the runtime
dependencies and of the extras (but ``dev``, and ``integrations``, whose libraries move too
fast for an old release to mean anything) becomes ``name==X``; what the project does not
declare resolves as it would for a user. ``--skip NAME`` leaves a package out (torch, which
the Makefile installs first from the CPU index).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def floors(skip: set[str]) -> list[str]:
    """``name==floor`` for every declared ``name>=floor`` (first declaration wins)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra, requirements in project.get("optional-dependencies", {}).items():
        if extra not in ("dev", "integrations"):
            declared += requirements
    out: dict[str, str] = {}
    for text in declared:
        requirement = Requirement(text)
        name = requirement.name.lower()
        if name == project["name"] or name in skip or name in out:
            continue
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        if lower:
            out[name] = f"{name}=={lower[0]}"
    return sorted(out.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", action="append", default=[], metavar="NAME")
    args = parser.parse_args()
    print("\n".join(floors({name.lower() for name in args.skip})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
