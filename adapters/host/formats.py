"""Named functions with the file suffixes they are for: report renderers and data readers.

Plugins fill these through the ``register_report_renderers`` and ``register_data_readers`` hooks
(`adapters.host.hookspecs`); `adapters.host.get_renderers` and `adapters.host.get_readers` build
them, with the isolation and name rules of the strategy registry. A format is found by its name or
an alias (``--format md``) or by the suffix of a path (``report.html``, ``data.tsv``); the suffix
``"/"`` stands for a directory.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import AdaptersError

_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")  # as strategy names: lowercase words joined by hyphens
_SUFFIX = re.compile(r"(\.[a-z0-9_+-]+)+")
DIRECTORY = "/"  # the suffix of a directory


@dataclass(frozen=True)
class Format:
    """One registered renderer or reader."""

    name: str
    function: Callable[..., Any]
    suffixes: tuple[str, ...]
    plugin: str  # the plugin that registered it
    aliases: tuple[str, ...] = ()
    recognizes: Callable[[str], bool] | None = None  # renderers: whether a file's start is one of its renderings
    description: str = ""


class Formats:
    """Formats by name (aliases included) and by suffix; what one hook's plugins registered."""

    kind = "format"
    plural = "formats"
    directories = False  # whether the suffix "/" (a directory) may be registered
    suffix_required = False  # readers are found by suffix alone; a renderer also by --format

    def __init__(self) -> None:
        self._by_name: dict[str, Format] = {}
        self._by_suffix: dict[str, Format] = {}
        # Filled by `adapters.host.manager`: third-party plugins skipped because their hook failed, and the
        # names and suffixes a third party offered that a built-in has.
        self.failures: list = []  # adapters.host.manager.PluginFailure
        self.collisions: list = []  # adapters.host.manager.Collision

    def add(self, entry: Format) -> None:
        """Add ``entry`` under its name, aliases and suffixes; all or nothing."""
        problems = self._problems(entry)
        if problems:
            raise AdaptersError(f"plugin {entry.plugin!r} registered an invalid {self.kind} {entry.name!r}: "
                                f"{'; '.join(problems)}. Fix it to follow docs/plugins.md.")
        for attribute, key, table in self._keys(entry):
            existing = table.get(key)
            if existing is not None:
                raise AdaptersError(
                    f"{self.kind} {attribute} {key!r} is registered twice: by plugin {existing.plugin!r} and by plugin "
                    f"{entry.plugin!r}. Uninstall or disable one of them, or rename it in the plugin."
                )
        for _, key, table in self._keys(entry):
            table[key] = entry

    def adopt(self, other: Formats, builtin: Container[str]) -> list[tuple[str, str, str]]:
        """Add what ``other`` (one third-party plugin's registrations) holds, less the names and suffixes a
        built-in plugin already has: the built-in keeps them. Returns each key left out, as ("name" or
        "suffix", the key, the built-in plugin); a format whose name is taken is left out whole, as is a
        reader left without a suffix."""
        dropped = []
        for entry in other.entries():
            taken = set()  # names never begin with "." or "/", so one set holds both kinds of key
            for attribute, key, table in self._keys(entry):
                owner = table.get(key)
                if owner is not None and owner.plugin in builtin:
                    taken.add(key)
                    dropped.append((attribute, key, owner.plugin))
            kept = replace(entry, aliases=tuple(a for a in entry.aliases if a not in taken),
                           suffixes=tuple(s for s in entry.suffixes if s not in taken))
            if entry.name not in taken and (kept.suffixes or not self.suffix_required):
                self.add(kept)
        return dropped

    def find(self, name: str) -> Format | None:
        """The format called ``name`` (or an alias of it, in any case), or None."""
        return self._by_name.get(name.strip().lower())

    def for_path(self, path: str, is_dir: bool = False) -> Format | None:
        """The format for ``path`` by its longest registered suffix (``"/"`` for a directory), or None."""
        if is_dir:
            return self._by_suffix.get(DIRECTORY)
        name = path.lower()
        matches = [s for s in self._by_suffix if s != DIRECTORY and name.endswith(s)]
        return self._by_suffix[max(matches, key=len)] if matches else None

    def entries(self) -> list[Format]:
        """Every format once, by name."""
        return [self._by_name[n] for n in self.names()]

    def names(self) -> list[str]:
        """The formats' own names (no aliases), sorted."""
        return sorted(n for n, e in self._by_name.items() if e.name == n)

    def suffixes(self) -> list[str]:
        """Every registered file suffix, sorted (the directory's ``"/"`` left out)."""
        return sorted(s for s in self._by_suffix if s != DIRECTORY)

    def _keys(self, entry: Format) -> Iterable[tuple[str, str, dict[str, Format]]]:
        yield from (("name", n, self._by_name) for n in (entry.name, *entry.aliases))
        yield from (("suffix", s, self._by_suffix) for s in entry.suffixes)

    def _problems(self, entry: Format) -> list[str]:
        problems = [f"name {n!r} is not lowercase words joined by hyphens" for n in (entry.name, *entry.aliases)
                    if not isinstance(n, str) or not _NAME.fullmatch(n)]
        if not callable(entry.function):
            problems.append(f"its function is a {type(entry.function).__name__}, not something to call")
        for s in entry.suffixes:
            if not (isinstance(s, str) and (_SUFFIX.fullmatch(s) or (self.directories and s == DIRECTORY))):
                allowed = ', or "/" for a directory' if self.directories else ""
                problems.append(f"suffix {s!r} is not a lowercase file suffix such as '.csv'{allowed}")
        if self.suffix_required and not entry.suffixes:
            problems.append("it gives no suffixes, so no file would ever be read by it")
        if entry.recognizes is not None and not callable(entry.recognizes):
            problems.append("recognizes is not a function")
        if not isinstance(entry.description, str):
            problems.append("description is not a string")
        return problems


def _strings(value: str | Iterable[str]) -> tuple[str, ...]:
    """A tuple of strings from one string or several (``suffixes=".csv"`` is one suffix, not four letters)."""
    return (value,) if isinstance(value, str) else tuple(value)


class Renderers(Formats):
    """The formats of ``adapters report``: name -> a function from loaded reports to text."""

    kind = "report format"
    plural = "report formats"

    def register(self, name: str, render: Callable[..., str], suffixes: str | Iterable[str] = (), *,
                 plugin: str, aliases: str | Iterable[str] = (), recognizes: Callable[[str], bool] | None = None,
                 description: str = "") -> None:
        """What a ``register_report_renderers`` hook calls (``plugin`` is filled in by the host)."""
        self.add(Format(name, render, _strings(suffixes), plugin, _strings(aliases), recognizes, description))


class Readers(Formats):
    """The readers of ``--data``: file suffix -> a function from a path to rows."""

    kind = "data reader"
    plural = "data readers"
    directories = True
    suffix_required = True

    def register(self, name: str, read: Callable[..., Any], suffixes: str | Iterable[str], *, plugin: str,
                 description: str = "") -> None:
        """What a ``register_data_readers`` hook calls (``plugin`` is filled in by the host)."""
        self.add(Format(name, read, _strings(suffixes), plugin, description=description))
