"""The built-in formats of ``adapters report``, registered as a plugin's are: markdown and HTML.

This module is one of the plugin manager's `DEFAULT_PLUGINS`; a plugin adds a format the same way
(docs/plugins.md). The renderers are imported when a report is rendered, not when plugins load, so
commands that render nothing never import them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..host import hookimpl

if TYPE_CHECKING:
    from .model import Report


def markdown(reports: Sequence[Report], *, sources: Sequence[str], labels: Sequence[str]) -> str:
    from .markdown import render_markdown

    return render_markdown(reports, sources=sources, labels=labels)


def is_markdown(start: str) -> bool:
    from .markdown import is_markdown_report

    return is_markdown_report(start)


def html(reports: Sequence[Report], *, sources: Sequence[str], labels: Sequence[str]) -> str:
    from .html import render_html

    return render_html(reports, sources=sources, labels=labels)


def is_html(start: str) -> bool:
    from .html import is_html_report

    return is_html_report(start)


@hookimpl
def register_report_renderers(register):
    register("markdown", markdown, suffixes=(".md", ".markdown"), aliases="md", recognizes=is_markdown,
             description="GitHub-flavoured markdown tables (the default when printing)")
    register("html", html, suffixes=(".html", ".htm"), aliases="htm", recognizes=is_html,
             description="one self-contained page with charts as inline SVG")
