"""The plugin manager: built-in plugins, third-party entry points, and the strategy registry.

Built-ins and third parties go through the same door: each is a module with hook
implementations, registered with the same ``pm.register`` call. Built-ins come from
`DEFAULT_PLUGINS`; third parties from the ``adapters`` entry-point group.

Environment variables:
    ADAPTERS_LOAD_PLUGINS     comma-separated distribution names to load; set but empty loads none
    ADAPTERS_DISABLE_PLUGINS  comma-separated distribution or entry-point names never to load
    ADAPTERS_STRICT_PLUGINS   "1" makes a broken third-party plugin fatal instead of a warning
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .errors import AdaptersError
from .registry import Registry

DEFAULT_PLUGINS = ("adapters_lora", "adapters_prefix", "adapters_probe", "adapters_full")
ENTRY_POINT_GROUP = "adapters"


@dataclass(frozen=True)
class PluginFailure:
    entry_point: str
    distribution: str
    error: str


class PluginWarning(UserWarning):
    """A third-party plugin could not be loaded and was skipped."""


_pm: pluggy.PluginManager | None = None
_failures: list[PluginFailure] = []


def _names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = _names("ADAPTERS_LOAD_PLUGINS")
    blocked = _names("ADAPTERS_DISABLE_PLUGINS") or set()
    strict = os.environ.get("ADAPTERS_STRICT_PLUGINS", "") not in ("", "0")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        if (allowed is not None and dist not in allowed) or dist in blocked or ep.name in blocked:
            continue
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the tool down with it
            failure = PluginFailure(ep.name, dist, f"{type(exc).__name__}: {exc}")
            if strict:
                raise AdaptersError(
                    f"plugin entry point {ep.name!r} from distribution {dist!r} failed to load: "
                    f"{failure.error}. Fix or uninstall it, or unset ADAPTERS_STRICT_PLUGINS."
                ) from exc
            _failures.append(failure)
            warnings.warn(
                f"skipped plugin entry point {ep.name!r} from distribution {dist!r}: {failure.error}",
                PluginWarning,
                stacklevel=2,
            )


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created and loaded on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("adapters")
        pm.add_hookspecs(hookspecs)
        for module_name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(module_name), name=module_name)
        _load_entry_points(pm)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise AdaptersError(
                f"plugin {exc.plugin!r} implements a hook that does not exist: {exc}. "
                "Check the hook name against adapters.hookspecs."
            ) from exc
        _pm = pm
    return _pm


def plugin_failures() -> list[PluginFailure]:
    """Third-party plugins that failed to load in this process."""
    get_plugin_manager()
    return list(_failures)


def get_registry() -> Registry:
    """Every strategy registered by the loaded plugins, built-ins first."""
    pm = get_plugin_manager()
    registry = Registry()
    # Call each implementation on its own, so the registry knows which plugin registered what.
    for impl in pm.hook.register_strategies.get_hookimpls():
        impl.function(register=functools.partial(registry.register, plugin=impl.plugin_name))
    return registry


def distribution_of(plugin_name: str) -> tuple[str, str]:
    """(distribution name, version) of a loaded plugin."""
    pm = get_plugin_manager()
    for plugin, dist in pm.list_plugin_distinfo():
        if pm.get_name(plugin) == plugin_name:
            return dist.metadata["name"], dist.version
    if plugin_name in DEFAULT_PLUGINS:
        return "adapters", _version("adapters")
    return "unknown", "unknown"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def list_plugins() -> list[dict]:
    """Each loaded plugin with its distribution, hooks and strategies (for `adapters plugins`)."""
    pm = get_plugin_manager()
    registry = get_registry()
    rows = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        dist, version = distribution_of(name)
        rows.append(
            {
                "name": name,
                "distribution": dist,
                "version": version,
                "builtin": name in DEFAULT_PLUGINS,
                "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
                "strategies": [e.strategy.name for e in registry.entries() if e.plugin == name],
            }
        )
    rows.sort(key=lambda r: (not r["builtin"], r["name"]))
    for failure in _failures:
        rows.append({"name": failure.entry_point, "distribution": failure.distribution, "error": failure.error})
    return rows
