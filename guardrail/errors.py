"""Errors a user can act on: each names the file, the key, the value and what was expected."""

from __future__ import annotations


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
