"""Name -> strategy, built from what the plugins register, aliases included."""
from __future__ import annotations

import difflib
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from ..contract import Strategy, validate_strategy
from ..errors import AdaptersError, UnknownStrategyError


class Alias:
    """A strategy under another name, with another default quantization (``qlora`` is lora on nf4).

    Everything but ``name``, ``description`` and ``default_quantization`` is the target's.
    """

    def __init__(self, name: str, target: Strategy, quantization: str) -> None:
        self.name = name
        self.target = target
        self.default_quantization = quantization
        self.description = f"alias for {target.name} on a {quantization}-quantized base"

    def __getattr__(self, attribute: str) -> Any:
        # Only reached for what the alias does not set itself: the target's members.
        return getattr(self.target, attribute)

    def __repr__(self) -> str:
        return f"Alias({self.name!r} -> {self.target.name!r}@{self.default_quantization})"


@dataclass(frozen=True)
class Entry:
    strategy: Strategy
    plugin: str  # the plugin (module or entry point) that registered it
    alias_of: str | None = None  # the strategy's own name, when this entry is an alias


class Registry:
    """The strategies registered by all loaded plugins, looked up by name."""

    kind = "strategy"
    plural = "strategies"

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        # Filled by `adapters.host.get_registry`: third-party plugins skipped because their
        # registration failed, and strategies a third party offered under a built-in's name.
        self.failures: list = []  # adapters.host.manager.PluginFailure
        self.collisions: list = []  # adapters.host.manager.Collision

    def register(self, strategy: Strategy, plugin: str, aliases: dict[str, str] | None = None) -> None:
        """Add ``strategy``, and each alias (name -> default quantization), for ``plugin``; all or nothing."""
        entries = [Entry(strategy, plugin)]
        if not validate_strategy(strategy):  # an alias of an invalid strategy would only repeat its problems
            entries += [Entry(Alias(a, strategy, q), plugin, strategy.name) for a, q in (aliases or {}).items()]
        for entry in entries:
            problems = validate_strategy(entry.strategy)
            if problems:
                kind = "alias" if entry.alias_of else "strategy"
                label = getattr(entry.strategy, "name", type(entry.strategy).__name__)
                raise AdaptersError(
                    f"plugin {plugin!r} registered an invalid {kind} {label!r}: {'; '.join(problems)}. "
                    "Fix it to follow the contract in docs/plugins.md."
                )
            existing = self._entries.get(entry.strategy.name)
            if existing is not None:
                raise AdaptersError(
                    f"strategy name {entry.strategy.name!r} is registered twice: by plugin {existing.plugin!r} "
                    f"and by plugin {plugin!r}. Uninstall or disable one of them, or rename the strategy."
                )
        for entry in entries:
            self._entries[entry.strategy.name] = entry

    def adopt(self, other: Registry, builtin: Container[str]) -> list[tuple[str, str, str]]:
        """Add the strategies of ``other`` (one third-party plugin's), less the names and aliases a built-in
        plugin already has: the built-in keeps them. Returns each name left out, as ("name", the name, the
        built-in plugin); a strategy whose own name is taken is left out with its aliases. A name that another third
        party registered is an error naming both."""
        dropped = []
        for entry in other.entries(aliases=False):
            aliases = other.aliases(entry.strategy.name)
            taken = [n for n in [entry.strategy.name, *aliases]
                     if (e := self.find(n)) is not None and e.plugin in builtin]
            dropped += [("name", n, self.entry(n).plugin) for n in taken]
            if entry.strategy.name not in taken:
                self.register(entry.strategy, plugin=entry.plugin,
                              aliases={a: q for a, q in aliases.items() if a not in taken})
        return dropped

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
        close = [n for n in self.names() if _swapped(name, n)] or difflib.get_close_matches(name, self.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownStrategyError(
            f"unknown strategy {name!r}.{hint} Available: {', '.join(self.names())}. "
            "Run `adapters strategies` to list them with their options."
        )

    def aliases(self, name: str) -> dict[str, str]:
        """The aliases of the strategy called ``name``: alias -> its default quantization."""
        return {e.strategy.name: e.strategy.default_quantization for e in self._entries.values() if e.alias_of == name}

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self, aliases: bool = True) -> list[Entry]:
        """Every entry by name; ``aliases=False`` leaves out the strategies' other names."""
        return [self._entries[n] for n in self.names() if aliases or self._entries[n].alias_of is None]

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def _swapped(typed: str, name: str) -> bool:
    """Whether ``typed`` is ``name`` with two neighbouring letters swapped (``lroa`` for ``lora``): the commonest
    typo, which difflib's ratio ranks below other names of the same letters."""
    return len(typed) == len(name) and any(
        typed[:i] + typed[i + 1] + typed[i] + typed[i + 2:] == name for i in range(len(typed) - 1))
