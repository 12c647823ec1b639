"""The component registry the registration hooks fill: kinds, names, aliases and ``Params``.

A plugin registers a component class, or names one by import path (``"package.module:Class"``)
together with the ``Params`` model and the class attributes the core reads before anything
runs (``requires_energy_model``, ``tunable``, ``artifact_command``). A class named by
path is imported the first time it is used, so checking a policy (``guardrail validate``,
``guardrail plugins``, ``guardrail policy schema``) never imports what running it needs:
torch, for the built-in energy models. The declared values are checked against the class
when it is imported.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel, ValidationError

from guardrail.errors import PluginError
from guardrail.plugin import components

if TYPE_CHECKING:
    from guardrail.plugin.manager import PluginManager
    from guardrail.plugin.markers import Register

# kind -> (registration hook name, name of the base class in guardrail.plugin.components); a new
# kind is one more row and one hookspec.
KINDS: dict[str, tuple[str, str]] = {
    "activation_source": ("guardrail_register_activation_sources", "ActivationSource"),
    "energy_model": ("guardrail_register_energy_models", "EnergyModel"),
    "steerer": ("guardrail_register_steerers", "Steerer"),
    "gate": ("guardrail_register_gates", "Gate"),
    "refusal_classifier": ("guardrail_register_refusal_classifiers", "RefusalClassifier"),
    "output_rail": ("guardrail_register_output_rails", "OutputRail"),
    "suite": ("guardrail_register_suites", "Suite"),
}

# Class attributes a component named by path may declare up front, by kind.
DECLARABLE: dict[str, tuple[str, ...]] = {
    "steerer": ("requires_energy_model", "tunable"),
    "energy_model": ("artifact_command",),
}
# Their values when a component named by path does not declare them (the base classes').
_BASE_DEFAULTS: dict[str, Any] = {
    "requires_energy_model": True,
    "tunable": (),
    "artifact_command": None,
}


def base_class(kind: str) -> type[components.Component]:
    """The interface class of ``kind`` (``EnergyModel`` imports torch, so it is looked up late)."""
    if kind == "energy_model":
        from guardrail.plugin.energy_model import EnergyModel

        return EnergyModel
    base: type[components.Component] = getattr(components, KINDS[kind][1])
    return base


class Registration:
    """One registered component: its kind, name, aliases, plugin, and its class.

    ``cls`` imports a class named by path on first access; ``Params`` and :meth:`attribute`
    never import it.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        plugin: str,
        aliases: tuple[str, ...],
        component: type[components.Component] | str,
        declared: dict[str, Any],
    ) -> None:
        self.kind = kind
        self.name = name
        self.plugin = plugin
        self.aliases = aliases
        self.target = component if isinstance(component, str) else None
        self._cls = None if isinstance(component, str) else component
        self._declared = declared

    @property
    def cls(self) -> type[components.Component]:
        """The component class (imported now if it was registered by path)."""
        if self._cls is None:
            self._cls = self._import()
        return self._cls

    @property
    def Params(self) -> type[BaseModel]:  # noqa: N802 - mirrors the class attribute
        """The pydantic model the component's parameters are validated with."""
        params: type[BaseModel] = self._declared.get("Params") or self.cls.Params
        return params

    def attribute(self, attr: str) -> Any:
        """A class attribute the core reads before running (declared, else the class's)."""
        if attr in self._declared:
            return self._declared[attr]
        if self._cls is None:
            return _BASE_DEFAULTS[attr]
        return getattr(self._cls, attr)

    def _import(self) -> type[components.Component]:
        assert self.target is not None
        module_name, _, qualname = self.target.partition(":")
        where = f"plugin {self.plugin!r}: {self.kind} {self.name!r} ({self.target})"
        try:
            node: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                node = getattr(node, part)
        except Exception as exc:
            raise PluginError(f"{where} cannot be imported: {type(exc).__name__}: {exc}") from exc
        check_class(self.kind, node, self.plugin)
        for attr, value in self._declared.items():
            if getattr(node, attr, None) != value:
                raise PluginError(
                    f"{where}: registered with {attr}={value!r}, but the class has "
                    f"{getattr(node, attr, None)!r}"
                )
        for attr in DECLARABLE.get(self.kind, ()):
            if attr not in self._declared and getattr(node, attr) != _BASE_DEFAULTS[attr]:
                raise PluginError(
                    f"{where}: the class sets {attr}={getattr(node, attr)!r}; declare it in "
                    f"register(..., {attr}=...) so it is known before the class is imported"
                )
        cls: type[components.Component] = node
        return cls


def check_class(kind: str, component: Any, plugin: str) -> None:
    """Refuse a class of the wrong kind, or whose ``Params`` is not a pydantic model."""
    base = base_class(kind)
    if not (isinstance(component, type) and issubclass(component, base)):
        raise PluginError(
            f"plugin {plugin!r} registered {component!r} as a {kind}, "
            f"expected a subclass of {base.__module__}.{base.__qualname__}"
        )
    _check_params(component.Params, plugin, component.__qualname__)


def _check_params(params: Any, plugin: str, owner: str) -> None:
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise PluginError(f"plugin {plugin!r}: {owner}.Params must be a pydantic model")


class Registry:
    """All registered components by kind and name (aliases resolve to the same entry).

    ``failed`` maps installed plugins that could not be loaded or registered to why; their
    components are absent, and looking one of them up says so.
    """

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        self.failed: dict[str, str] = {}

    @classmethod
    def from_plugin_manager(cls, pm: PluginManager, *, warn: bool = True) -> Registry:
        """Call every registration hook through pluggy, one plugin at a time, so errors name it.

        A plugin's components are staged while its hook runs and added once it returns, so
        one that raises adds none. An installed plugin whose hook raises, or whose components
        are refused, is dropped with all its components and recorded as failed (see
        :meth:`guardrail.plugin.manager.PluginManager.call_contained`); any other plugin's
        error is raised. With ``warn``, each failed installed plugin is logged once per
        plugin manager.
        """
        registry = cls()
        for kind, (hook_name, _base) in KINDS.items():
            pm.call_contained(hook_name, functools.partial(registry._register_from, kind),
                              on_fail=registry.drop_plugin)
        registry.failed = {name: plugin.error for name, plugin in pm.failures().items()
                           if plugin.error is not None}
        if warn and registry.failed:
            pm.warn_failed()
        return registry

    def _register_from(self, kind: str, plugin: str, hook: pluggy.HookCaller) -> None:
        """Call ``plugin``'s registration hook for ``kind``, then add what it registered."""
        staged: list[tuple[type[components.Component] | str, str | None, Iterable[str],
                           dict[str, Any]]] = []

        def register(component: type[components.Component] | str, name: str | None = None,
                     aliases: Iterable[str] = (), **declared: Any) -> None:
            staged.append((component, name, aliases, declared))

        checked: Register = register  # the implementation matches what plugins are promised
        hook(register=checked)
        for component, name, aliases, declared in staged:
            self.add(kind, component, plugin=plugin, name=name, aliases=aliases, **declared)

    def add(
        self,
        kind: str,
        component: type[components.Component] | str,
        *,
        plugin: str,
        name: str | None = None,
        aliases: Iterable[str] = (),
        **declared: Any,
    ) -> None:
        """Register ``component`` (a class, or ``"module:Class"``) under ``name`` and ``aliases``.

        A class named by path needs ``name``; it may declare ``params`` (its ``Params``) and
        the attributes in :data:`DECLARABLE` for its kind.
        """
        if kind not in KINDS:
            raise PluginError(f"plugin {plugin!r} registered a component of unknown kind {kind!r}")
        allowed = {"params", *DECLARABLE.get(kind, ())}
        unknown = sorted(set(declared) - allowed)
        if unknown:
            raise PluginError(
                f"plugin {plugin!r}: register() got {unknown} for a {kind}; expected only "
                f"{sorted(allowed)}"
            )
        if "params" in declared:
            declared["Params"] = declared.pop("params")
        if "tunable" in declared:
            declared["tunable"] = tuple(declared["tunable"])
        if isinstance(component, str):
            if not name or ":" not in component:
                raise PluginError(
                    f"plugin {plugin!r} registered {component!r} as a {kind}: a class named by "
                    "path needs the form 'package.module:Class' and a name="
                )
            if "Params" in declared:
                _check_params(declared["Params"], plugin, component)
            else:
                declared["Params"] = components.NoParams
            params: type[BaseModel] = declared["Params"]
            sweep = declared.get("tunable", ())
        else:
            if declared:
                raise PluginError(
                    f"plugin {plugin!r}: register({component.__qualname__}) takes no declared "
                    "attributes; they are read from the class"
                )
            check_class(kind, component, plugin)
            name = name or component.name
            params = component.Params
            sweep = getattr(component, "tunable", ())
        if not name:
            raise PluginError(f"plugin {plugin!r} registered a {kind} without a name")
        unknown_sweep = set(sweep) - set(params.model_fields)
        if unknown_sweep:
            raise PluginError(
                f"plugin {plugin!r}: {getattr(component, '__qualname__', component)}.tunable "
                f"names {sorted(unknown_sweep)}, which are not fields of its Params"
            )
        table = self._entries[kind]
        entry = Registration(kind, name, plugin, tuple(aliases), component, declared)
        for key in (name, *entry.aliases):
            if key in table:
                raise PluginError(
                    f"{kind} name {key!r} is registered twice: by plugin "
                    f"{table[key].plugin!r} and by plugin {plugin!r}"
                )
            table[key] = entry

    def drop_plugin(self, plugin: str) -> None:
        """Remove every component ``plugin`` registered."""
        for table in self._entries.values():
            for key in [k for k, entry in table.items() if entry.plugin == plugin]:
                del table[key]

    def names(self, kind: str) -> list[str]:
        """Canonical names (no aliases) of the registered components of ``kind``."""
        return sorted({entry.name for entry in self._entries[kind].values()})

    def aliases(self, kind: str) -> dict[str, str]:
        """Every name and alias of ``kind`` -> the canonical name."""
        return {key: entry.name for key, entry in self._entries[kind].items()}

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
            failed = "".join(
                f"; plugin {plugin!r} failed to load ({error})"
                for plugin, error in sorted(self.failed.items())
            )
            raise PluginError(f"unknown {kind} {name!r}; registered: {known}{failed}") from None

    def params(self, kind: str, name: str, values: dict[str, Any]) -> BaseModel:
        """Validate ``values`` against the component's ``Params`` (raises pydantic's error)."""
        return self.get(kind, name).Params.model_validate(values)

    def create(self, kind: str, name: str, values: dict[str, Any]) -> components.Component:
        """Instantiate a component with validated parameters."""
        if kind == "energy_model":
            raise PluginError(
                "energy models are built or loaded, not created; see guardrail.artifact.energy"
            )
        entry = self.get(kind, name)
        try:
            params = entry.Params.model_validate(values)
        except ValidationError as exc:
            raise PluginError(f"invalid parameters for {kind} {name!r}: {exc}") from exc
        cls = entry.cls
        try:
            return cls(params)
        except Exception as exc:
            raise PluginError(
                f"plugin {entry.plugin!r} failed to create {kind} {name!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
