"""Errors a user can act on: each names the file, the key, the value and what was expected."""

from __future__ import annotations

from typing import Any


class GuardrailError(Exception):
    """Base class of every error guardrail raises on purpose."""


class PolicyError(GuardrailError):
    """A policy file is missing, unreadable or invalid; ``problems`` lists every error at once.

    The message shows the first :attr:`SHOWN` problems (a broken generated file can have
    thousands); ``problems`` keeps them all.
    """

    SHOWN = 50

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems[: self.SHOWN])
        if len(problems) > self.SHOWN:
            lines += f"\n  - ... and {len(problems) - self.SHOWN} more problems"
        super().__init__(f"invalid policy {path}:\n{lines}")


class ModelNotFoundError(GuardrailError):
    """A model source names nothing that can be loaded."""


class ArtifactError(GuardrailError):
    """An energy-model artifact is missing, corrupt, or trained for another model."""


class PluginError(GuardrailError):
    """A plugin is unknown, registered twice, or raised inside a hook or component call."""


class DataError(GuardrailError):
    """A prompt file is missing, unreadable, or lacks the configured field."""


class MissingComponentError(GuardrailError):
    """A policy needs something that is not installed (its packaged model, a gate's encoder).

    ``missing`` lists each prerequisite (:class:`guardrail.steering.prerequisites.Prerequisite`);
    ``command`` installs the packaged ones (None when none is packaged).
    """

    def __init__(self, policy: str, missing: list[Any], command: str | None) -> None:
        self.policy = policy
        self.missing = missing
        self.command = command
        lines = "\n".join(f"  - {item.describe()}" for item in missing)
        fix = f"\ninstall them with: {command}" if command else ""
        super().__init__(f"policy {policy} needs components that are not installed:\n"
                         f"{lines}{fix}")
