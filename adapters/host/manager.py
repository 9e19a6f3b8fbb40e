"""The plugin manager: built-in plugins, third-party entry points, and what they register.

Built-ins and third parties go through the same door: each is a module with hook
implementations, registered with the same ``pm.register`` call. Built-ins come from
`DEFAULT_PLUGINS` (the strategies in plugins/, the report renderers and the data readers); third
parties from the ``adapters`` entry-point group. What they register is built, hook by hook, into
the strategy registry (`get_registry`), the report formats (`get_renderers`) and the data readers
(`get_readers`), all under the same rules.

Environment variables:
    ADAPTERS_LOAD_PLUGINS     comma-separated distribution names to load; set but empty loads none
    ADAPTERS_DISABLE_PLUGINS  comma-separated distribution or entry-point names never to load
    ADAPTERS_STRICT_PLUGINS   "1" makes a broken third-party plugin fatal instead of a warning

A third-party plugin that fails to import, fails to register (raises in its hook, or registers an
invalid strategy, renderer or reader), or implements a misspelled or wrong-signature hook is
skipped with a `PluginWarning` naming the entry point, distribution and exception, and is listed
with its error by `adapters plugins`; the rest of the tool keeps working. A plugin that calls
``sys.exit()`` while it is imported or registers is one of these: it is skipped the same way
("called sys.exit(3) at import") instead of ending the command. `entry_points` lists what is
installed without importing any of it (``adapters plugins --no-import``). A third-party strategy,
report format or data reader whose name (or suffix) a built-in already has loses it to the built-in,
and the collision is reported the same way. Built-in plugins are never isolated: a failure there is
a bug, and raises.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pluggy

from .. import __distribution__ as DISTRIBUTION  # our name on PyPI, where `adapters` is AdapterHub's library
from ..errors import AdaptersError
from . import hookspecs
from .formats import Formats, Readers, Renderers
from .registry import Registry

DEFAULT_PLUGINS = ("adapters_lora", "adapters_prefix", "adapters_probe", "adapters_full", "adapters_peft_methods",
                   "adapters.reports.renderers", "adapters.data.formats")
ENTRY_POINT_GROUP = "adapters"


@dataclass(frozen=True)
class PluginFailure:
    """A third-party plugin that was skipped, and why."""

    entry_point: str  # the entry point's name (the plugin's name in the plugin manager)
    distribution: str
    error: str  # "ExceptionType: message", or "called sys.exit(3) at import"
    stage: str = "import"  # "import" (loading the entry point) or "registration" (its hook)


@dataclass(frozen=True)
class Collision:
    """A name (or suffix) a third party registered and a built-in already has; the built-in keeps it."""

    name: str
    plugin: str
    distribution: str
    builtin_plugin: str
    kind: str = "strategy"  # what it names: "strategy", "report format" or "data reader"
    attribute: str = "name"  # "name" (aliases included) or "suffix"

    def message(self) -> str:
        return (
            f"plugin {self.plugin!r} from distribution {self.distribution!r} registers {self.kind} {self.attribute} "
            f"{self.name!r}, which the built-in plugin {self.builtin_plugin!r} already has; the built-in wins. "
            f"Give the plugin's {self.kind} another {self.attribute}."
        )


class PluginWarning(UserWarning):
    """A third-party plugin was skipped (or one of its names dropped); the rest keeps working."""


_pm: pluggy.PluginManager | None = None
_failures: list[PluginFailure] = []
# Entry-point plugins: plugin name -> (distribution, version).
_distributions: dict[str, tuple[str, str]] = {}
# Plugins whose failures always raise, as under ADAPTERS_STRICT_PLUGINS=1 (`adapters.testing`
# registers plugins this way, so a plugin's own tests fail loudly).
_strict_plugins: set[str] = set()
# The registries being built, by hook, while plugins' hooks run.
_building: dict[str, Any] = {}


def _normalize(name: str) -> str:
    """A distribution name in its canonical form (PEP 503): ``Adapters_IA3`` -> ``adapters-ia3``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {_normalize(n.strip()) for n in value.split(",") if n.strip()}


def strict() -> bool:
    """Whether ADAPTERS_STRICT_PLUGINS makes a broken third-party plugin fatal."""
    return os.environ.get("ADAPTERS_STRICT_PLUGINS", "").strip().lower() not in ("", "0", "false", "no")


def _describe(exc: BaseException, where: str = "at import") -> str:
    if isinstance(exc, SystemExit):  # not an error of its own: what the plugin did is the error
        return f"called sys.exit({'' if exc.code is None else repr(exc.code)}) {where}".rstrip()
    return f"{type(exc).__name__}: {exc}".strip()


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)


def known_hooks(pm: pluggy.PluginManager) -> list[str]:
    """The names of the hooks that `adapters.host.hookspecs` declares."""
    return sorted(n for n, caller in vars(pm.hook).items() if not n.startswith("_") and caller.has_spec())


def unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Hook names ``plugin`` implements that no hookspec declares (misspellings, usually)."""
    unknown = []
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is None or opts.get("optionalhook"):
            continue
        hook_name = opts.get("specname") or attr
        caller = getattr(pm.hook, hook_name, None)
        if caller is None or not caller.has_spec():
            unknown.append(hook_name)
    return sorted(unknown)


def register_checked(pm: pluggy.PluginManager, plugin: object, name: str | None = None) -> str:
    """Register ``plugin``, rejecting a wrong-signature or misspelled hook with an error naming it.

    The manager is left unchanged when the plugin is rejected.
    """
    label = name or pm.get_canonical_name(plugin)
    try:
        registered = pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise AdaptersError(
            f"plugin {label!r} implements a hook with the wrong signature: {' '.join(str(exc).split())}. "
            "Check the hook's arguments against adapters.host.hookspecs (docs/plugins.md)."
        ) from exc
    except ValueError as exc:  # the name, or the same object, is already registered
        raise AdaptersError(f"plugin {label!r} cannot be registered: {' '.join(str(exc).split()[:12])}") from exc
    if registered is None:
        raise AdaptersError(f"plugin {label!r} is blocked from registering.")
    unknown = unknown_hooks(pm, plugin)
    if unknown:
        pm.unregister(name=registered)
        known = known_hooks(pm)
        hints = []
        for hook in unknown:
            close = difflib.get_close_matches(hook, known, n=1)
            hints.append(f"{hook!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise AdaptersError(
            f"plugin {label!r} implements hooks that do not exist: {', '.join(hints)}. "
            f"Known hooks: {', '.join(known)} (see adapters.host.hookspecs, docs/plugins.md)."
        )
    return registered


def _entry_point_distribution(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    try:
        dist = ep.dist
        if dist is None:
            return "unknown", "unknown"
        return dist.name or dist.metadata["Name"] or "unknown", dist.version or "unknown"
    except Exception:  # broken metadata must not stop the others loading
        return "unknown", "unknown"


def _not_loaded_because(name: str, dist: str) -> str | None:
    """Why the allow and block lists keep entry point ``name`` of distribution ``dist`` from loading, or None."""
    allowed = _names("ADAPTERS_LOAD_PLUGINS")
    blocked = _names("ADAPTERS_DISABLE_PLUGINS") or set()
    if _normalize(dist) in blocked or _normalize(name) in blocked:
        return "ADAPTERS_DISABLE_PLUGINS"
    if allowed is not None and _normalize(dist) not in allowed:
        return "not in ADAPTERS_LOAD_PLUGINS"
    return None


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    try:
        entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:  # unreadable metadata somewhere on sys.path
        _entry_point_failed(PluginFailure("*", "unknown", _describe(exc)), exc)
        return
    for ep in entry_points:
        dist, version = _entry_point_distribution(ep)
        if _not_loaded_because(ep.name, dist):
            continue
        try:
            if pm.has_plugin(ep.name):
                owner = _distributions.get(ep.name, (DISTRIBUTION, ""))[0]
                raise AdaptersError(f"the plugin name {ep.name!r} is already taken by distribution {owner!r}")
            register_checked(pm, ep.load(), name=ep.name)
        # A broken plugin must not take the tool down with it, nor end it with sys.exit() at import.
        except (Exception, SystemExit) as exc:
            _entry_point_failed(PluginFailure(ep.name, dist, _describe(exc)), exc)
        else:
            _distributions[ep.name] = (dist, version)


def entry_points() -> list[dict]:
    """Every installed ``adapters`` entry point, read from package metadata: nothing is imported.

    Each row: ``name``, ``value`` (``module:object``), ``distribution``, ``version``, and ``loads``
    (whether the allow and block lists let it load) with ``reason`` when they do not. For
    ``adapters plugins --no-import``: it works even when a plugin breaks the tool on import.
    """
    try:
        found = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:  # unreadable metadata somewhere on sys.path
        raise AdaptersError(f"cannot read the installed packages' entry points: {_describe(exc)}. "
                            "Reinstall the package whose metadata is broken.") from exc
    rows = []
    for ep in found:
        dist, version = _entry_point_distribution(ep)
        reason = _not_loaded_because(ep.name, dist)
        row = {"name": ep.name, "value": ep.value, "distribution": dist, "version": version, "loads": reason is None}
        if reason:
            row["reason"] = reason
        rows.append(row)
    return sorted(rows, key=lambda r: (r["distribution"], r["name"]))


def _entry_point_failed(failure: PluginFailure, exc: BaseException) -> None:
    if strict():
        raise AdaptersError(
            f"plugin entry point {failure.entry_point!r} from distribution {failure.distribution!r} failed to "
            f"load: {failure.error}. Fix or uninstall it, or unset ADAPTERS_STRICT_PLUGINS."
        ) from exc
    _failures.append(failure)
    _warn(
        f"skipped plugin entry point {failure.entry_point!r} from distribution {failure.distribution!r}: "
        f"{failure.error}"
    )


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created and loaded on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("adapters")
        pm.add_hookspecs(hookspecs)
        for module_name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(module_name), name=module_name)
        _failures.clear()
        _distributions.clear()
        _load_entry_points(pm)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise AdaptersError(
                f"plugin {exc.plugin!r} implements a hook that does not exist: {exc}. "
                "Check the hook name against adapters.host.hookspecs."
            ) from exc
        _pm = pm
    return _pm


def get_registry() -> Registry:
    """Every strategy registered by the loaded plugins, built-ins first.

    A third-party plugin whose hook raises, or that registers an invalid strategy, is skipped as a
    whole (recorded in ``registry.failures``, with a `PluginWarning`); under ADAPTERS_STRICT_PLUGINS=1
    that raises instead. A third-party strategy named like a built-in one is dropped and recorded in
    ``registry.collisions``. Two third-party plugins registering one name is an error naming both.
    """
    return _build("register_strategies", Registry)


def get_renderers() -> Renderers:
    """Every report format registered by the loaded plugins (``register_report_renderers``), under the
    rules of `get_registry`: a name or suffix a built-in has stays the built-in's."""
    return _build("register_report_renderers", Renderers)


def get_readers() -> Readers:
    """Every data reader registered by the loaded plugins (``register_data_readers``), under the rules of
    `get_registry`: a suffix a built-in reads stays the built-in's."""
    return _build("register_data_readers", Readers)


_R = TypeVar("_R", Registry, Formats)


def _build(hook: str, make: Callable[[], _R]) -> _R:
    if hook in _building:
        # Re-entered from a plugin's hook (a wrapper looking up what it wraps): what is registered so
        # far, the built-ins included, since they register first.
        return _building[hook]
    pm = get_plugin_manager()
    registry = _building[hook] = make()
    try:
        _register_all(pm, hook, registry, make)
    finally:
        del _building[hook]
    return registry


def _register_all(pm: pluggy.PluginManager, hook: str, registry: _R, make: Callable[[], _R]) -> None:
    impls = getattr(pm.hook, hook).get_hookimpls()
    # Built-ins first, so that they win every name; otherwise in registration order.
    impls = sorted(impls, key=lambda impl: impl.plugin_name not in DEFAULT_PLUGINS)
    # Call each implementation on its own, so the registry knows which plugin registered what.
    for impl in impls:
        plugin = impl.plugin_name
        if plugin in DEFAULT_PLUGINS:
            impl.function(register=_register_as(registry, plugin))
            continue
        own = make()  # validates what the plugin registers, and catches a name it registers twice
        try:
            impl.function(register=_register_as(own, plugin))
        except (Exception, SystemExit) as exc:  # the plugin's own code, or what it registered is invalid
            _registration_failed(registry, plugin, hook, exc)
            continue
        for attribute, name, builtin_plugin in registry.adopt(own, DEFAULT_PLUGINS):
            collision = Collision(name, plugin, distribution_of(plugin)[0], builtin_plugin, registry.kind, attribute)
            registry.collisions.append(collision)
            _warn(collision.message())


def _register_as(registry: Registry | Formats, plugin: str) -> Callable[..., None]:
    """The ``register`` a hook gets: the registry's own, with the plugin filled in."""
    def register(*args: Any, **kwargs: Any) -> None:
        registry.register(*args, plugin=plugin, **kwargs)

    return register


def _registration_failed(registry: Registry | Formats, plugin: str, hook: str, exc: BaseException) -> None:
    dist = distribution_of(plugin)[0]
    failure = PluginFailure(plugin, dist, _describe(exc, f"in {hook}"), stage="registration")
    if strict() or plugin in _strict_plugins:
        if isinstance(exc, AdaptersError):
            raise exc
        raise AdaptersError(
            f"plugin {plugin!r} from distribution {dist!r} failed to register its {registry.plural}: "
            f"{failure.error}. Fix or uninstall it, or unset ADAPTERS_STRICT_PLUGINS."
        ) from exc
    registry.failures.append(failure)
    _warn(f"skipped plugin {plugin!r} from distribution {dist!r}: its {registry.plural} failed to register: "
          f"{failure.error}")


_T = TypeVar("_T")


def guarded(plugin: str, call: Callable[[], _T], error: Callable[[str], AdaptersError]) -> _T:
    """``call()``, which runs ``plugin``'s code (a renderer, a reader): an exception from a third-party
    plugin's code becomes ``error(what it raised)``, a user error naming it, not a traceback; a built-in's
    is a bug, and raises as it is."""
    try:
        return call()
    except AdaptersError:
        raise
    except (Exception, SystemExit) as exc:
        if plugin in DEFAULT_PLUGINS:
            raise
        raise error(_describe(exc, "")) from exc


def distribution_of(plugin_name: str) -> tuple[str, str]:
    """(distribution name, version) of a loaded plugin."""
    get_plugin_manager()
    if plugin_name in _distributions:
        return _distributions[plugin_name]
    if plugin_name in DEFAULT_PLUGINS:
        return DISTRIBUTION, _version(DISTRIBUTION)
    return "unknown", "unknown"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def list_plugins() -> list[dict]:
    """Each plugin with its distribution, hooks, and what it registered (for `adapters plugins`):
    ``strategies``, ``report_formats`` and ``data_readers``, by name.

    A plugin that was skipped carries ``error`` (and ``stage``: import or registration); one that
    lost a name to a built-in carries ``collisions``, one message per name.
    """
    pm = get_plugin_manager()
    strategies, renderers, readers = get_registry(), get_renderers(), get_readers()
    failed = {f.entry_point: f for r in (readers, renderers, strategies) for f in r.failures}
    collisions = [c for r in (strategies, renderers, readers) for c in r.collisions]
    rows = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        dist, version = distribution_of(name)
        row = {
            "name": name,
            "distribution": dist,
            "version": version,
            "builtin": name in DEFAULT_PLUGINS,
            "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
            "strategies": [e.strategy.name for e in strategies.entries() if e.plugin == name],
            "report_formats": [f.name for f in renderers.entries() if f.plugin == name],
            "data_readers": [f.name for f in readers.entries() if f.plugin == name],
        }
        if name in failed:
            row.update(error=failed[name].error, stage="registration")
        if any(c.plugin == name for c in collisions):
            row["collisions"] = [c.message() for c in collisions if c.plugin == name]
        rows.append(row)
    rows.sort(key=lambda r: (not r["builtin"], r["name"]))
    for failure in _failures:
        rows.append({"name": failure.entry_point, "distribution": failure.distribution, "version": "",
                     "builtin": False, "hooks": [], "strategies": [], "report_formats": [], "data_readers": [],
                     "error": failure.error, "stage": failure.stage})
    return rows
