"""Where reports are written: a file that exists is replaced only when asked, and only when it is ours.

`adapters bench --output` and `adapters report --output` never overwrite a file without
``--overwrite``, and ``--overwrite`` replaces only what the same command wrote before, recognised
by its content: a benchmark report that loads as one, or a page or markdown file that `adapters
report` rendered. Anything else (a thesis, a config, a report of another tool) is refused and left
as it was. The write itself is atomic (`adapters.files.write_atomic`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import AdaptersError

# How the renderings begin (markdown) or title themselves (HTML); see markdown.py and html.py.
MARKDOWN_START = "# adapters benchmark report"
HTML_TITLE = "<title>adapters benchmark report"


def is_bench_report(path: Path) -> bool:
    """Whether ``path`` holds a report `adapters bench` wrote: it loads as one."""
    from .load import load_report

    try:
        load_report(path)
    except AdaptersError:
        return False
    return True


def is_rendered_report(path: Path) -> bool:
    """Whether ``path`` holds a page or markdown file `adapters report` rendered, by how it begins."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    if head.startswith("<!DOCTYPE html>"):
        return HTML_TITLE in head
    return head.startswith(MARKDOWN_START + "\n")


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
