"""Name -> strategy, built from what the plugins register."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import AdaptersError, UnknownStrategyError
from .strategy import Strategy, validate_strategy


@dataclass(frozen=True)
class Entry:
    strategy: Strategy
    plugin: str  # the plugin (module or entry point) that registered it


class Registry:
    """The strategies registered by all loaded plugins, looked up by name."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        # Filled by `adapters.plugins.get_registry`: third-party plugins skipped because their
        # registration failed, and strategies a third party offered under a built-in's name.
        self.failures: list = []  # adapters.plugins.PluginFailure
        self.collisions: list = []  # adapters.plugins.Collision

    def register(self, strategy: Strategy, plugin: str) -> None:
        problems = validate_strategy(strategy)
        if problems:
            label = getattr(strategy, "name", type(strategy).__name__)
            raise AdaptersError(
                f"plugin {plugin!r} registered an invalid strategy {label!r}: {'; '.join(problems)}. "
                "Fix the strategy to follow the contract in the README's plugin section."
            )
        existing = self._entries.get(strategy.name)
        if existing is not None:
            raise AdaptersError(
                f"strategy name {strategy.name!r} is registered twice: by plugin {existing.plugin!r} "
                f"and by plugin {plugin!r}. Uninstall or disable one of them, or rename the strategy."
            )
        self._entries[strategy.name] = Entry(strategy, plugin)

    def get(self, name: str) -> Strategy:
        return self.entry(name).strategy

    def find(self, name: str) -> Entry | None:
        """The entry registered under ``name``, or None."""
        return self._entries.get(name)

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            pass
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownStrategyError(
            f"unknown strategy {name!r}.{hint} Available: {', '.join(self.names())}. "
            "Run `adapters strategies` to list them with their options."
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries
