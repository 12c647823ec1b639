"""The packages the build ships, found rather than listed (everything else: pyproject.toml).

``plugins/`` ships as ``guardrail_plugins``, and ``policies/`` and ``artifacts/`` as
``guardrail.policies`` and ``guardrail.artifacts`` (``package-dir`` in pyproject.toml), so a
new sub-package of ``guardrail/`` or ``plugins/`` is shipped without being named anywhere.
"""

from setuptools import find_packages, setup


def found(folder: str, name: str) -> list[str]:
    """The package kept in ``folder`` and shipped as ``name``, and every package below it."""
    return [name, *(f"{name}.{sub}" for sub in find_packages(folder))]


setup(packages=[*found("guardrail", "guardrail"), *found("plugins", "guardrail_plugins"),
                "guardrail.policies", "guardrail.artifacts"])
