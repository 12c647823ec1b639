"""The policies and energy-model artifacts that ship with guardrail, as package resources.

In a checkout they are the top-level ``policies/`` and ``artifacts/`` folders; in an
installed wheel they are the ``guardrail.policies`` and ``guardrail.artifacts`` packages,
which setuptools maps onto those folders (``pyproject.toml``). Either way the two sit side by
side, so a shipped policy's relative artifact path (``../artifacts/NAME.safetensors``)
resolves the same. Wherever a policy is taken (``--policy``, ``extends:``,
``Guardrail.from_policy``) a shipped policy can be named instead of given as a path.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

from guardrail.errors import PolicyError

POLICY_PACKAGE = "guardrail.policies"
ARTIFACT_PACKAGE = "guardrail.artifacts"
POLICY_SUFFIXES = (".yaml", ".yml")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PolicyError(package, ["the shipped files are not installed with guardrail "
                                    "(a broken install?); reinstall guardrail"])
    return Path(locations[0])


def policies_dir() -> Path:
    """The folder of the shipped policy files."""
    return _package_dir(POLICY_PACKAGE)


def artifacts_dir() -> Path:
    """The folder of the shipped energy-model artifacts."""
    return _package_dir(ARTIFACT_PACKAGE)


def is_checkout() -> bool:
    """Whether the shipped files are a source checkout's (an editable install), not a wheel's."""
    return (policies_dir().parent / "pyproject.toml").is_file()


def shipped_policies() -> dict[str, Path]:
    """Shipped policy files by name (the file name without ``.yaml``), sorted by name."""
    files = [p for p in policies_dir().iterdir() if p.suffix in POLICY_SUFFIXES and p.is_file()]
    return {p.stem: p for p in sorted(files, key=lambda p: p.stem)}


def shipped_policy(name: str) -> Path | None:
    """The shipped policy called ``name`` (with or without ``.yaml``), or None."""
    stem = name
    for suffix in POLICY_SUFFIXES:
        stem = stem.removesuffix(suffix)
    if "/" in stem or "\\" in stem:
        return None
    return shipped_policies().get(stem)


def resolve_policy(ref: str | Path) -> Path:
    """A policy reference as a file path: an existing file, else a shipped policy's name.

    A reference that looks like a path (it has a directory part or a ``.yaml`` suffix) and
    names neither is returned as it is, for the loader to report as not found; a bare name
    that is not shipped raises :class:`PolicyError` listing the shipped ones.
    """
    try:
        path = Path(ref).expanduser()
    except RuntimeError:  # ~name of a user that does not exist: not a path, maybe a name
        path = Path(ref)
    if path.is_file():
        return path
    shipped = shipped_policy(str(ref))
    if shipped is not None:
        return shipped
    text = str(ref)
    if "/" in text or "\\" in text or path.suffix in (*POLICY_SUFFIXES, ".json"):
        return path
    names = list(shipped_policies())
    close = difflib.get_close_matches(text, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    try:
        looked = path.resolve()
    except (RuntimeError, OSError):  # a symlink loop
        looked = path
    raise PolicyError(text, [
        f"not a policy file (looked at {looked}) and not a shipped policy name "
        f"(shipped: {', '.join(names) or 'none'}; `guardrail policy list`){hint}"
    ])
