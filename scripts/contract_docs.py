"""Render the reference of the strategy contract from `adapters.contract`'s own docstrings.

    python scripts/contract_docs.py            # rewrite the block in docs/plugins.md
    python scripts/contract_docs.py --check    # exit 1 when the block is out of date

docs/plugins.md holds the block between ``<!-- contract:start -->`` and ``<!-- contract:end -->``;
tests/test_docs.py fails when it differs from what this renders.
"""
from __future__ import annotations

import inspect
import re
import sys
import textwrap
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
START, END = "<!-- contract:start -->", "<!-- contract:end -->"
# In reading order: what is required, the optional settings, the capabilities, the shape types,
# then the helpers that strategies would otherwise write again.
NAMES = {
    "adapters.contract": ("Strategy", "StrategyBase", "Traits", "traits", "SavesOwnFormat", "DeclaresTrainable",
                          "EstimatesMemory", "RefusesModels", "RefusesRuns", "GroupsParameters",
                          "InitialisesFromData", "Merges",
                          "ImportsPeft", "RunShape", "ModelShape", "LinearShape",
                          "StrategyMemory"),
    "adapters.nn": ("match_targets", "targeted_linears", "head_parameters"),
    "adapters.peft": ("PeftStrategy", "peft_task_type"),
}


def _members(obj: type) -> list[str]:
    """A class's field lines (with their comments) and method signatures, as written in the source."""
    lines = inspect.getsource(obj).splitlines()
    out = []
    for i, line in enumerate(lines):
        if re.match(r"    [a-z_]+: ", line):
            out.append(line.strip())
        elif re.match(r"    def [a-z]", line):
            out.append(("@property " if lines[i - 1].strip() == "@property" else "") + _signature(lines, i))
    return out


def _signature(lines: list[str], i: int) -> str:
    """The ``def`` line at ``lines[i]``, joined with its continuation lines, body elided."""
    signature = lines[i].strip()
    while signature.count("(") > signature.count(")"):
        i += 1
        signature += (" " if not signature.endswith("(") else "") + lines[i].strip()
    return signature.removesuffix(" ...").removesuffix(":") + ": ..."


def render() -> str:
    import importlib

    parts = []
    for module, names in NAMES.items():
        for name in names:
            parts.append(_entry(name, getattr(importlib.import_module(module), name)))
    return "\n".join(parts)


def _entry(name: str, obj: object) -> str:
    if inspect.isclass(obj):
        bases = [b.__name__ for b in obj.__bases__ if b is not object]
        head = f"class {name}({', '.join(bases)}):" if bases else f"class {name}:"
        code = "\n".join([head] + [f"    {m}" for m in _members(obj)])
    else:
        code = _signature(inspect.getsource(obj).splitlines(), 0)
    doc = textwrap.dedent(inspect.getdoc(obj) or "")
    return f"### `adapters.{name}`\n\n```python\n{code}\n```\n\n{doc}\n"


def updated(text: str) -> str:
    before, start, rest = text.partition(START)
    _, end, after = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"{DOCS}: no {START} ... {END} block")
    return f"{before}{START}\n{render()}{END}{after}"


def main(argv: list[str]) -> int:
    text = DOCS.read_text()
    new = updated(text)
    if "--check" in argv:
        return 0 if new == text else 1
    DOCS.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
