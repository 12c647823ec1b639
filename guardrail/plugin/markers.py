"""The plugin API's name, its pluggy markers and the ``register`` callable's type.

A leaf module (it imports nothing of guardrail), so hook specifications, the plugin manager
and plugin authors all take their markers from one place: ``from guardrail import hookimpl``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from pluggy import HookimplMarker, HookspecMarker

PROJECT_NAME = "guardrail"
hookspec = HookspecMarker(PROJECT_NAME)
hookimpl = HookimplMarker(PROJECT_NAME)


class Register(Protocol):
    """What a registration hook receives: ``register(cls, name=None, aliases=())``.

    ``register("package.module:Class", name=..., params=Params, **attributes)`` registers a
    class that is imported on first use (see :mod:`guardrail.plugin.registry`).
    """

    def __call__(
        self,
        component: type[Any] | str,
        name: str | None = None,
        aliases: Iterable[str] = (),
        **declared: Any,
    ) -> None:
        """Register ``component`` under ``name`` (default: its ``name``) and ``aliases``."""
