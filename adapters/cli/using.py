"""Commands that use a trained run: generate, eval."""
from __future__ import annotations

import click  # noqa: F401

from . import cli  # noqa: F401
