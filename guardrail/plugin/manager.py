"""The plugin manager: built-ins, then installed entry points (contained), and calling hooks.

An installed plugin that fails to import or to register is not fatal: it is left out,
recorded with its entry point, distribution and error, listed by ``guardrail plugins`` and
logged once (``plugin.failed``) by other commands. A policy that names one of its components
gets an error saying which plugin failed. Built-in plugins, and plugins an application
registers itself, still fail loudly: those are bugs to see at once.

Hooks a plugin's failure must not spread from (component registration, commands) are called
through :meth:`PluginManager.call_contained`: pluggy calls each plugin's implementations on
their own, so an error names the plugin and the hook, and the rest keep working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass

import pluggy
import structlog

from guardrail.errors import PluginError
from guardrail.plugin import hookspecs
from guardrail.plugin.defaults import DEFAULT_PLUGINS
from guardrail.plugin.markers import PROJECT_NAME

__all__ = [
    "DISABLE_ENV",
    "ENTRYPOINT_GROUP",
    "InstalledPlugin",
    "PluginManager",
    "build_plugin_manager",
    "disabled_plugins",
    "get_plugin_manager",
    "set_plugin_manager",
]

log = structlog.get_logger("guardrail.plugin.manager")

ENTRYPOINT_GROUP = "guardrail"
DISABLE_ENV = "GUARDRAIL_DISABLE_PLUGINS"


@dataclass
class InstalledPlugin:
    """A plugin from the ``guardrail`` entry-point group: where it came from, and whether it
    failed (``error``: at which stage and why)."""

    name: str
    entry_point: str
    distribution: str | None
    version: str | None
    error: str | None = None


class PluginManager(pluggy.PluginManager):
    """pluggy's plugin manager, plus the installed (entry-point) plugins it tried to load."""

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.installed: dict[str, InstalledPlugin] = {}
        self._warned: set[str] = set()

    def fail(self, name: str, error: str) -> None:
        """Unregister installed plugin ``name`` (if registered) and record ``error``."""
        if self.get_plugin(name) is not None:
            self.unregister(name=name)
        self.installed[name].error = error

    def call_contained(
        self,
        hook_name: str,
        call: Callable[[str, pluggy.HookCaller], object],
        *,
        on_fail: Callable[[str], None] | None = None,
    ) -> None:
        """Call hook ``hook_name`` one plugin at a time, containing installed plugins' errors.

        ``call(plugin_name, hook)`` runs once per plugin implementing the hook, with ``hook``
        pluggy's caller for that plugin's implementations alone (``subset_hook_caller``); it
        calls ``hook(**kwargs)`` and may act on what the plugin gave (a registry adds the
        components it staged). Built-ins and the application's own plugins go first, in
        pluggy's call order, then installed ones, so an installed plugin that reuses one of
        their names is the one refused.

        An error in ``call`` becomes a :class:`PluginError` naming the plugin and the hook
        (a ``PluginError`` is kept as it is). An installed plugin's is contained: ``on_fail``
        undoes what it did, and the plugin is unregistered and recorded (:meth:`fail`), so
        its later hooks do not run. Any other plugin's is raised.
        """
        impls = reversed(getattr(self.hook, hook_name).get_hookimpls())  # pluggy's call order
        plugins: dict[str, object] = {}
        for impl in impls:
            plugins.setdefault(impl.plugin_name, impl.plugin)
        for name in sorted(plugins, key=lambda name: name in self.installed):
            others = [plugin for other, plugin in plugins.items() if other != name]
            try:
                try:
                    call(name, self.subset_hook_caller(hook_name, remove_plugins=others))
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(f"plugin {name!r} raised in hook {hook_name}: "
                                      f"{type(exc).__name__}: {exc}") from exc
            except PluginError as exc:
                if name not in self.installed:
                    raise
                if on_fail is not None:
                    on_fail(name)
                self.fail(name, f"registration failed: {exc}")

    def failures(self) -> dict[str, InstalledPlugin]:
        """The installed plugins that failed, by name."""
        return {name: p for name, p in self.installed.items() if p.error is not None}

    def warn_failed(self) -> None:
        """Log each failed installed plugin once: ``plugin.failed``, with its entry point,
        distribution and error."""
        for name, plugin in self.failures().items():
            if name in self._warned:
                continue
            self._warned.add(name)
            log.warning(
                "plugin.failed", plugin=name, entry_point=plugin.entry_point,
                distribution=plugin.distribution, version=plugin.version, error=plugin.error,
                effect="left out; policies that do not use it work",
            )


def disabled_plugins() -> set[str]:
    """Plugin names listed (comma-separated) in ``GUARDRAIL_DISABLE_PLUGINS``."""
    raw = os.environ.get(DISABLE_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def build_plugin_manager(*, load_entrypoints: bool = True) -> PluginManager:
    """A new plugin manager with the built-ins and, optionally, installed entry points.

    Built-ins come from :data:`~guardrail.plugin.defaults.DEFAULT_PLUGINS`; a hook name no spec
    knows fails here, loudly. Third-party plugins come from the ``guardrail`` entry-point
    group one at a time: one that fails to import or to register (a misspelled hook name
    included) is unregistered and recorded, and the rest load.
    """
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    for name in disabled_plugins():
        pm.set_blocked(name)
    for name, module_name in DEFAULT_PLUGINS:
        if pm.is_blocked(name):
            continue
        pm.register(importlib.import_module(module_name), name=name)
    pm.check_pending()
    if load_entrypoints:
        _load_entrypoints(pm)
    return pm


def _load_entrypoints(pm: PluginManager) -> None:
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRYPOINT_GROUP or ep.name in pm.installed:
                continue
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            pm.installed[ep.name] = InstalledPlugin(
                name=ep.name, entry_point=f"{ep.name} = {ep.value}",
                distribution=dist.metadata["name"], version=dist.version,
            )
            stage = "import"
            try:
                plugin = ep.load()
                stage = "registration"
                pm.register(plugin, name=ep.name)
                pm.check_pending()
            except Exception as exc:
                pm.fail(ep.name, f"{stage} failed: {type(exc).__name__}: {exc}")


_PLUGIN_MANAGER: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, built (and entry points loaded) on first use only."""
    global _PLUGIN_MANAGER
    if _PLUGIN_MANAGER is None:
        _PLUGIN_MANAGER = build_plugin_manager()
    return _PLUGIN_MANAGER


def set_plugin_manager(pm: PluginManager | None) -> None:
    """Replace the process-wide plugin manager (tests; embedding applications)."""
    global _PLUGIN_MANAGER
    _PLUGIN_MANAGER = pm


