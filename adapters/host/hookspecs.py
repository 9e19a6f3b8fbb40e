"""Every hook a plugin can implement.

A plugin is a module or object with functions decorated by `adapters.hookimpl`, registered by the
plugin manager (built-ins) or found through the ``adapters`` entry-point group (third parties)::

    import adapters

    @adapters.hookimpl
    def register_strategies(register):
        register(MyStrategy())
        register(MyStrategy(), aliases={"my-strategy-4bit": "nf4"})  # also under another name

The built-ins register through these same hooks: the strategies in plugins/, the markdown and
HTML reports (`adapters.reports.renderers`) and the data readers (`adapters.data.formats`).
"""
from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("adapters")
hookimpl = pluggy.HookimplMarker("adapters")


@hookspec
def register_strategies(register: Callable[..., None]) -> None:
    """Register fine-tuning strategies.

    Call ``register(strategy)`` once per strategy. A strategy is any object that satisfies the
    `adapters.Strategy` protocol; its ``name`` must be unique across all installed plugins.

    ``register(strategy, aliases={"qlora": "nf4"})`` also registers the strategy under each alias,
    with the alias's quantization as its default: ``qlora`` is ``lora`` on an nf4 base.
    """


@hookspec
def register_report_renderers(register: Callable[..., None]) -> None:
    """Register formats for ``adapters report``.

    Call ``register(name, render, suffixes=(".csv",))`` once per format. ``render(reports, sources=...,
    labels=...)`` gets the loaded reports (`adapters.reports.Report`, in the order given), the file
    each came from and what to call each one (``--label``, else the file names), and returns the text
    to print or write. ``adapters report --format NAME`` picks the format, as does an ``--output`` whose
    name ends in one of ``suffixes``. Optional: ``aliases``, other names for ``--format``;
    ``recognizes(start)``, whether a file that begins with ``start`` (up to 4096 characters) is one of
    the format's renderings, which ``--overwrite`` may then replace (without it, no existing file is
    replaced); ``description``, one line.
    """


@hookspec
def register_data_readers(register: Callable[..., None]) -> None:
    """Register readers of data files, for ``adapters train --data FILE`` and `adapters.data.load_dataset`.

    Call ``register(name, read, suffixes=(".tsv",))`` once per reader; the suffix ``"/"`` stands for
    a directory. ``read(path)`` gets the `pathlib.Path` and returns the rows in order, each a pair
    ``(location, row)``: where the row is, for errors about it (``"FILE:LINE"``), and a dict with
    the columns of one shape (``messages``; ``prompt`` and ``completion``; ``instruction``,
    ``output`` and an optional ``input``; ``text`` with an optional ``label``). It may instead
    return a dict of such lists by split name: ``train`` is trained on, ``validation`` or ``test``
    held out. It raises `adapters.AdaptersError`, naming the file and line, for what it cannot read.
    Optional: ``description``, one line.
    """
