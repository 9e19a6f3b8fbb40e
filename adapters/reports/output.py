"""Where reports are written: a file that exists is replaced only when asked, and only when it is ours.

`adapters bench --output` and `adapters report --output` never overwrite a file without
``--overwrite``, and ``--overwrite`` replaces only what the same command wrote before, recognised
by its content: a benchmark report that loads as one, or a rendering that a registered report
format recognises as its own (markdown and HTML do; a plugin's format may). Anything else (a
thesis, a config, a report of another tool) is refused and left as it was. The write itself is
atomic (`adapters.files.write_atomic`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import AdaptersError
from ..host import get_renderers, guarded

# How much of a file a format's ``recognizes`` sees.
START_CHARS = 4096


def is_bench_report(path: Path) -> bool:
    """Whether ``path`` holds a report `adapters bench` wrote: it loads as one."""
    from .load import load_report

    try:
        load_report(path)
    except AdaptersError:
        return False
    return True


def is_rendered_report(path: Path) -> bool:
    """Whether ``path`` holds a rendering of `adapters report`: one that a registered report format
    recognises as its own by how it begins."""
    try:
        with open(path, "rb") as f:
            start = f.read(START_CHARS).decode("utf-8", errors="replace")
    except OSError:
        return False
    return any(
        guarded(f.plugin, lambda f=f: bool(f.recognizes(start)),
                lambda error, f=f: AdaptersError(f"--output {path}: the report format {f.name!r} of plugin "
                                                 f"{f.plugin!r} failed to tell whether it wrote it: {error}. "
                                                 "Choose a new file name, or fix or uninstall the plugin."))
        for f in get_renderers().entries() if f.recognizes is not None
    )


def check_output(path: Path, overwrite: bool, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse ``path`` unless it is free, or ``overwrite`` is given and ``ours(path)`` recognises it as
    ``what`` (e.g. "a report written by `adapters bench`"); never touches it."""
    if path.is_dir():
        raise AdaptersError(f"--output {path}: is a directory. Give a file name, e.g. {path / 'report.json'}.")
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise AdaptersError(f"--output {path}: exists. Choose a new file name, or pass --overwrite to replace it.")
    if path.is_symlink() or not path.is_file() or not ours(path):
        raise AdaptersError(f"--output {path}: exists and is not {what}; --overwrite replaces only that, "
                            "and this file was left as it was. Choose a new file name.")
