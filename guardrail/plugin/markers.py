"""The plugin API's name, its pluggy markers and the ``register`` callable's type.

A leaf module (at run time it imports nothing of guardrail), so hook specifications, the
plugin manager and plugin authors all take their markers from one place: ``from guardrail
import hookimpl, Register``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:
    from pydantic import BaseModel

    from guardrail.plugin.components import Component

PROJECT_NAME = "guardrail"
hookspec = HookspecMarker(PROJECT_NAME)
hookimpl = HookimplMarker(PROJECT_NAME)


class Register(Protocol):
    """The ``register`` callable every registration hook receives.

    ``register(MySteerer, aliases=("mine",))`` registers a class; its name, ``Params`` and
    class attributes are read from it. ``register("package.module:Class", name="mine",
    params=MyParams, ...)`` registers a class by import path: it is imported the first time
    it is used, so what validation reads is given up front (see
    :mod:`guardrail.plugin.registry`): its ``params`` and, by kind, the class attributes
    the core reads before running (``requires_energy_model`` and ``tunable`` for a
    steerer, ``artifact_command`` for an energy model). Each declared value is checked
    against the class when it is imported. The registry refuses, naming the plugin, a class
    of the wrong kind, a name another plugin has, and a keyword the kind does not declare.
    """

    def __call__(
        self,
        component: type[Component] | str,
        name: str | None = None,
        aliases: Iterable[str] = (),
        *,
        params: type[BaseModel] = ...,
        requires_energy_model: bool = ...,
        tunable: Iterable[str] = ...,
        artifact_command: str | None = ...,
    ) -> None:
        """Register ``component`` (a class, or ``"package.module:Class"``) under ``name``
        (default: the class's ``name``; required for a path) and ``aliases``."""
