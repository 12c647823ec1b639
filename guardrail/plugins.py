"""Plugin manager factory and the component registry the registration hooks fill."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy
import structlog
from pydantic import BaseModel, ValidationError

from guardrail import __version__, hookspecs
from guardrail.components import (
    ActivationSource,
    Component,
    EnergyModel,
    Gate,
    RefusalClassifier,
    Steerer,
    Suite,
)
from guardrail.defaults import DEFAULT_PLUGINS
from guardrail.errors import PluginError
from guardrail.markers import PROJECT_NAME, Register

log = structlog.get_logger("guardrail.plugins")

ENTRYPOINT_GROUP = "guardrail"
DISABLE_ENV = "GUARDRAIL_DISABLE_PLUGINS"

# kind -> (registration hook name, base class); a new kind is one more row and one hookspec.
KINDS: dict[str, tuple[str, type[Component]]] = {
    "activation_source": ("guardrail_register_activation_sources", ActivationSource),
    "energy_model": ("guardrail_register_energy_models", EnergyModel),
    "steerer": ("guardrail_register_steerers", Steerer),
    "gate": ("guardrail_register_gates", Gate),
    "refusal_classifier": ("guardrail_register_refusal_classifiers", RefusalClassifier),
    "suite": ("guardrail_register_suites", Suite),
}


def disabled_plugins() -> set[str]:
    """Plugin names listed (comma-separated) in ``GUARDRAIL_DISABLE_PLUGINS``."""
    raw = os.environ.get(DISABLE_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def build_plugin_manager(*, load_entrypoints: bool = True) -> pluggy.PluginManager:
    """A new plugin manager with the built-ins and, optionally, installed entry points.

    Built-ins come from :data:`~guardrail.defaults.DEFAULT_PLUGINS`, third-party plugins from
    the ``guardrail`` entry-point group; a hook name no spec knows fails here, loudly.
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in disabled_plugins():
        pm.set_blocked(name)
    for name, module_name in DEFAULT_PLUGINS:
        if pm.is_blocked(name):
            continue
        pm.register(importlib.import_module(module_name), name=name)
    if load_entrypoints:
        pm.load_setuptools_entrypoints(ENTRYPOINT_GROUP)
    pm.check_pending()
    return pm


_PLUGIN_MANAGER: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built (and entry points loaded) on first use only."""
    global _PLUGIN_MANAGER
    if _PLUGIN_MANAGER is None:
        _PLUGIN_MANAGER = build_plugin_manager()
    return _PLUGIN_MANAGER


def set_plugin_manager(pm: pluggy.PluginManager | None) -> None:
    """Replace the process-wide plugin manager (tests; embedding applications)."""
    global _PLUGIN_MANAGER
    _PLUGIN_MANAGER = pm


@dataclass(frozen=True)
class Registration:
    """One registered component class and the plugin that registered it."""

    kind: str
    name: str
    cls: type[Component]
    plugin: str
    aliases: tuple[str, ...] = ()


class Registry:
    """All registered components by kind and name (aliases resolve to the same entry)."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Registry:
        """Call every registration hook, one implementation at a time, so errors name the plugin."""
        registry = cls()
        for kind, (hook_name, _base) in KINDS.items():
            caller = getattr(pm.hook, hook_name)
            for impl in reversed(caller.get_hookimpls()):
                register = registry._register_fn(kind, impl.plugin_name)
                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} raised in hook {hook_name}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
        return registry

    def _register_fn(self, kind: str, plugin: str) -> Register:
        def register(
            component: type[Component], name: str | None = None, aliases: Iterable[str] = ()
        ) -> None:
            self.add(kind, component, plugin=plugin, name=name, aliases=tuple(aliases))

        return register

    def add(
        self,
        kind: str,
        component: type[Component],
        *,
        plugin: str,
        name: str | None = None,
        aliases: tuple[str, ...] = (),
    ) -> None:
        """Register ``component`` under ``name`` (default: its ``name`` attribute)."""
        base = KINDS[kind][1]
        if not (isinstance(component, type) and issubclass(component, base)):
            raise PluginError(
                f"plugin {plugin!r} registered {component!r} as a {kind}, "
                f"expected a subclass of {base.__module__}.{base.__qualname__}"
            )
        if not (isinstance(component.Params, type) and issubclass(component.Params, BaseModel)):
            raise PluginError(
                f"plugin {plugin!r}: {component.__qualname__}.Params must be a pydantic model"
            )
        name = name or component.name
        if not name:
            raise PluginError(f"plugin {plugin!r} registered a {kind} without a name")
        if issubclass(component, Steerer):
            unknown = set(component.sweep_params) - set(component.Params.model_fields)
            if unknown:
                raise PluginError(
                    f"plugin {plugin!r}: {component.__qualname__}.sweep_params names "
                    f"{sorted(unknown)}, which are not fields of its Params"
                )
        table = self._entries[kind]
        entry = Registration(kind=kind, name=name, cls=component, plugin=plugin, aliases=aliases)
        for key in (name, *aliases):
            if key in table:
                raise PluginError(
                    f"{kind} name {key!r} is registered twice: by plugin "
                    f"{table[key].plugin!r} and by plugin {plugin!r}"
                )
            table[key] = entry

    def names(self, kind: str) -> list[str]:
        """Canonical names (no aliases) of the registered components of ``kind``."""
        return sorted({entry.name for entry in self._entries[kind].values()})

    def registrations(self, kind: str) -> list[Registration]:
        """Each registered component of ``kind`` once (aliases not repeated), by name."""
        unique = {entry.name: entry for entry in self._entries[kind].values()}
        return [unique[name] for name in sorted(unique)]

    def get(self, kind: str, name: str) -> Registration:
        """Look a component up; an unknown name raises :class:`PluginError` listing known ones."""
        try:
            return self._entries[kind][name]
        except KeyError:
            known = ", ".join(self.names(kind)) or "none"
            raise PluginError(f"unknown {kind} {name!r}; registered: {known}") from None

    def params(self, kind: str, name: str, values: dict[str, Any]) -> BaseModel:
        """Validate ``values`` against the component's ``Params`` (raises pydantic's error)."""
        return self.get(kind, name).cls.Params.model_validate(values)

    def create(self, kind: str, name: str, values: dict[str, Any]) -> Component:
        """Instantiate a component with validated parameters."""
        entry = self.get(kind, name)
        try:
            params = entry.cls.Params.model_validate(values)
        except ValidationError as exc:
            raise PluginError(f"invalid parameters for {kind} {name!r}: {exc}") from exc
        if issubclass(entry.cls, EnergyModel):
            raise PluginError(
                "energy models are built or loaded, not created; see guardrail.energy"
            )
        try:
            return entry.cls(params)
        except Exception as exc:
            raise PluginError(
                f"plugin {entry.plugin!r} failed to create {kind} {name!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def plugin_report(
    pm: pluggy.PluginManager, *, include_builtins: bool = False
) -> list[dict[str, Any]]:
    """What ``guardrail plugins`` prints: name, version, hooks (and components) per plugin."""
    builtin_names = {name for name, _ in DEFAULT_PLUGINS}
    dist_info = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    registry = Registry.from_plugin_manager(pm)
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:
            continue
        builtin = name in builtin_names
        if builtin and not include_builtins:
            continue
        dist = dist_info.get(id(plugin))
        version = __version__ if builtin else (dist.version if dist is not None else None)
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        components = {
            kind: [e.name for e in registry.registrations(kind) if e.plugin == name]
            for kind in KINDS
        }
        rows.append(
            {
                "name": name,
                "version": version,
                "builtin": builtin,
                "hooks": hooks,
                "components": {k: v for k, v in components.items() if v},
            }
        )
    return rows
