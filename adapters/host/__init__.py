"""The plugin host: hookspecs, the plugin manager (built-ins, entry points, isolation), the registries of
strategies, report formats and data readers."""
from .formats import Format, Readers, Renderers
from .hookspecs import hookimpl, hookspec
from .manager import (
    DEFAULT_PLUGINS,
    ENTRY_POINT_GROUP,
    PluginWarning,
    distribution_of,
    entry_points,
    get_plugin_manager,
    get_readers,
    get_registry,
    get_renderers,
    guarded,
    list_plugins,
)
from .registry import Entry, Registry

__all__ = ["hookimpl", "hookspec", "DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "PluginWarning", "distribution_of",
           "entry_points", "get_plugin_manager", "get_readers", "get_registry", "get_renderers", "guarded",
           "list_plugins", "Entry", "Format", "Readers", "Registry", "Renderers"]
