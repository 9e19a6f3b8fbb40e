"""Plain-text formatting shared by every command: one table renderer, one byte formatter, one size parser."""
from __future__ import annotations

import re

from .errors import AdaptersError

KiB, MiB, GiB = 2**10, 2**20, 2**30
DASH = "–"  # shown where a value was not measured


def aligned_table(rows: list[list[str]], headers: list[str]) -> str:
    """Rows under headers, columns left-aligned and separated by two spaces, with a rule below the headers."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(row: list[str]) -> str:
        return "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


_UNITS = {"GiB": GiB, "MiB": MiB, "KiB": KiB}


def format_bytes(n: float | None, missing: str = "-", digits: int = 2, unit: str | None = None) -> str:
    """``3.30 GiB``, ``512.00 MiB``, ``12.00 KiB``, ``10 B``; ``missing`` for None.

    ``unit`` ("GiB", "MiB" or "KiB") fixes the unit, e.g. ``3,379.2 MiB``, so that numbers set side by side
    compare at a glance; otherwise the largest unit the number reaches is used.
    """
    if n is None:
        return missing
    if unit is not None:
        return f"{n / _UNITS[unit]:,.{digits}f} {unit}"
    for name, size in _UNITS.items():
        if abs(n) >= size:
            return f"{n / size:,.{digits}f} {name}"
    return f"{n:,.0f} B"


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '512MiB', '1.5T' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m or not m.group(0).strip():
        raise AdaptersError(f"cannot read the size {text!r}. Write it like 24GiB, 80GB or 512MiB.")
    number, prefix, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    power = "KMGT".index(prefix) + 1 if prefix else 0
    base = 1000 if suffix == "b" and prefix else 1024
    return int(number * base**power)
