"""The plugin API: what a plugin package imports to add components to guardrail.

- :mod:`~guardrail.plugin.markers`: ``hookimpl``, ``hookspec`` and the ``Register`` callable's type;
- :mod:`~guardrail.plugin.hookspecs`: the hooks a plugin may implement;
- :mod:`~guardrail.plugin.components`: the interfaces its classes implement (``Steerer``...);
- :mod:`~guardrail.plugin.energy_model`: the ``EnergyModel`` interface (an ``nn.Module``; torch);
- :mod:`~guardrail.plugin.manager` and :mod:`~guardrail.plugin.registry`: how plugins are found,
  contained and their components looked up; :mod:`~guardrail.plugin.defaults`: the built-ins.

It also hands a plugin the core services it may build on, so no plugin reaches into core
internals: ``DEFAULT_COMPONENTS`` (the component of each kind a policy gets when it names
none), ``cache_root`` (the guardrail cache folder) and ``digest`` (the sha256 key the core's
caches use, so a plugin's entries are keyed the same way).

``from guardrail.plugin import hookimpl, Register, Steerer`` imports no torch; ``EnergyModel`` is
handed out on first use.
"""

from __future__ import annotations

from typing import Any

from guardrail.cache import cache_root, digest
from guardrail.plugin.components import (
    ActivationSource,
    Answer,
    Component,
    Energy,
    Gate,
    NoParams,
    OutputRail,
    RefusalClassifier,
    SteerContext,
    Steerer,
    SteerOutcome,
    Suite,
    SuiteItem,
    Verdict,
)
from guardrail.plugin.defaults import DEFAULT_COMPONENTS
from guardrail.plugin.markers import Register, hookimpl, hookspec

__all__ = [
    "DEFAULT_COMPONENTS", "ActivationSource", "Answer", "Component", "Energy", "EnergyModel",
    "Gate", "NoParams", "OutputRail", "RefusalClassifier", "Register", "SteerContext",
    "SteerOutcome", "Steerer", "Suite", "SuiteItem", "Verdict", "cache_root", "digest",
    "hookimpl", "hookspec",
]


def __getattr__(name: str) -> Any:
    if name == "EnergyModel":  # an nn.Module: importing it imports torch
        from guardrail.plugin.energy_model import EnergyModel

        return EnergyModel
    raise AttributeError(f"module 'guardrail.plugin' has no attribute {name!r}")
