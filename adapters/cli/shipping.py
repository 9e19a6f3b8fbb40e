"""Commands that turn a run into something to ship: merge, import."""
from __future__ import annotations

import click  # noqa: F401

from . import cli  # noqa: F401
