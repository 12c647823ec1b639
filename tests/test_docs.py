"""The documentation is true: links and cited files resolve, every shipped policy and command
is listed (the README's Python snippet runs in tests/test_wheel_install.py)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
         *sorted((ROOT / "bench").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A file of the repository cited in backticks: `docs/x.md`, `bench/capture.md`, `guardrail/y.py`.
CITED = re.compile(r"`((?:docs|bench|policies|guardrail|plugins|tests)/[\w./-]*[\w/])`")
SECTION = re.compile(r'the "([^"]+)" section(?: of ([\w./-]+\.md))?')


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return [m.group(1).replace("`", "") for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)]


def _prose(page: Path) -> str:
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(page)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path_text, _, anchor = target.partition("#")
        path = (page.parent / path_text).resolve() if path_text else page
        if not path.exists():
            broken.append(f"{target}: {path} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in map(_slug, _headings(path)):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_files_and_sections_exist(page: Path) -> None:
    text = _prose(page)
    missing = [cited for cited in CITED.findall(text) if not (ROOT / cited).exists()]
    for title, other in SECTION.findall(text):
        where = (ROOT / other) if other else page
        if title.lower() not in (h.lower() for h in _headings(where)):
            missing.append(f'"{title}" section of {where.relative_to(ROOT)}')
    assert not missing, missing


def test_every_shipped_policy_is_listed_in_the_policy_docs() -> None:
    shipped = _prose(ROOT / "docs" / "policies.md").split("## Shipped policies", 1)[1]
    shipped = shipped.split("\n## ", 1)[0]
    unlisted = [p.name for p in sorted((ROOT / "policies").glob("*.yaml"))
                if f"`{p.name}`" not in shipped and f"`{p.stem}`" not in shipped]
    assert not unlisted, f"docs/policies.md's shipped-policy table lacks {unlisted}"


def test_readme_lists_every_command() -> None:
    from guardrail.cli import build_parser

    [subparsers] = [a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)]
    table = _prose(ROOT / "README.md").split("## Command line", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in subparsers.choices if f"| `guardrail {name}" not in table]
    assert not missing, f"README's command table lacks {missing}"


def test_readme_first_screen_gives_the_two_commands_then_installing() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```console\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["make demo", "make test"]
    after = text.split(first_block, 1)[1]
    next_section = after.split("\n## ", 1)[1]
    title = next_section.splitlines()[0].lower()
    assert "install" in title and "library" in title, title
    assert "pip install" in next_section.split("\n## ", 1)[0]


# The README's Python snippet runs end to end from the installed wheel, on SmolLM2:
# tests/test_wheel_install.py.


def test_the_extends_examples_of_the_policy_docs_validate(tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    import yaml

    from guardrail.policy.artifacts import validate_policy_file
    from guardrail.policy.model import load_policy

    section = (ROOT / "docs" / "policies.md").read_text().split("## Composing policies", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    documents = [d for block in blocks for d in yaml.safe_load_all(block)]
    assert len(documents) >= 4
    parent = load_policy("eds-qwen2.5-coder-0.5b")
    for i, document in enumerate(documents):
        path = tmp_path / f"example-{i}.yaml"
        path.write_text(yaml.safe_dump(document))
        policy = validate_policy_file(path, registry)
        names = [r.name for r in policy.rails]
        wanted = [r["name"] for r in document.get("rails", [])]
        if any(r.get("enabled") is False for r in document.get("rails", [])):
            assert names == [], names
        elif set(wanted) <= {r.name for r in parent.rails}:
            assert names == [r.name for r in parent.rails]  # merged in place, none added
        else:
            assert names == [*(r.name for r in parent.rails), *wanted]
