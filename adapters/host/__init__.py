"""The plugin host: hookspecs, the plugin manager (built-ins, entry points, isolation), the registry."""
from .hookspecs import hookimpl, hookspec
from .manager import (
    DEFAULT_PLUGINS,
    ENTRY_POINT_GROUP,
    PluginWarning,
    distribution_of,
    entry_points,
    get_plugin_manager,
    get_registry,
    list_plugins,
)
from .registry import Entry, Registry

__all__ = ["hookimpl", "hookspec", "DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "PluginWarning", "distribution_of",
           "entry_points", "get_plugin_manager", "get_registry", "list_plugins", "Entry", "Registry"]
