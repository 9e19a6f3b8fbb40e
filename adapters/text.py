"""Plain-text output shared by the commands."""
from __future__ import annotations


def aligned_table(rows: list[list[str]], headers: list[str]) -> str:
    """Rows under headers, columns left-aligned and separated by two spaces, with a rule below the headers."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(row: list[str]) -> str:
        return "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
