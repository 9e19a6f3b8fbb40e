"""The built-in datasets: real text that ships with every CPython install (``--data builtin:NAME``).

- causal-lm: "python-reference", the language reference topics from ``pydoc_data`` (the default);
- causal-lm: "instructions", prompt/completion pairs made from the same reference: "Explain X in Python."
  answered with the start of the reference's section on X;
- sequence-classification: "stdlib-docstrings", docstrings of public standard-library objects,
  labelled by their top-level package (the default).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from .examples import Dataset, Example, split, stable_hash

# Standard-library packages whose docstrings make up the classification set.
# All are pure Python, import without side effects on Linux, and exist on
# Python 3.11 and 3.12; each yields 100+ distinct docstrings.
DOCSTRING_PACKAGES = ("asyncio", "email", "http", "logging", "unittest", "xml")

# Docstrings shorter than this are mostly "Return x." style and carry little signal.
MIN_DOCSTRING_CHARS = 40

# Per-label cap so no class dominates (the packages range from ~105 to ~210).
MAX_PER_LABEL = 150


@functools.cache
def python_reference() -> Dataset:
    from pydoc_data.topics import topics

    # Split by topic, not by paragraph, so held-out text never shares a topic
    # with training text.
    names = sorted(topics)
    examples = [Example(topics[name].strip()) for name in names]
    train, heldout = split(examples, names)
    return Dataset(name="python-reference", train=train, heldout=heldout, labels=[])


# A section heading in the reference topics: a line underlined by a rule of the same length.
# (Grid tables have rules too, of "+", "-" and "=", under lines that start with "|".)
_HEADING = re.compile(r"^(?P<title>[^|\n][^\n]*)\n(?P<rule>([*=\-^~\"])\3*)\n", re.MULTILINE)

# An answer ends at the last paragraph (or sentence) that fits in this many characters: about 130 SmolLM2 tokens,
# so that most examples fit --seq-len 128 whole and their lengths still vary as real instruction data does.
MAX_ANSWER_CHARS = 500
# Sections shorter than this are headings over subsections, or a line such as "New in version 3.5.".
MIN_ANSWER_CHARS = 100


@functools.cache
def python_instructions() -> Dataset:
    """One prompt/completion pair per section of the language reference: "Explain TITLE in Python." answered with
    the section's first paragraphs (`answer`). A section that several topics repeat appears once, and the split is
    by section, so no held-out section is trained on."""
    from pydoc_data.topics import topics

    answers: dict[str, str] = {}
    for name in sorted(topics):
        text = topics[name]
        headings = [m for m in _HEADING.finditer(text) if len(m["rule"]) == len(m["title"])]
        for heading, after in zip(headings, [*headings[1:], None]):
            body = text[heading.end(): after.start() if after else len(text)].strip()
            title = heading["title"].strip()
            if len(body) >= MIN_ANSWER_CHARS and title not in answers and body not in answers.values():
                answers[title] = body
    titles = sorted(answers)
    examples = [Example(prompt=f"Explain {title} in Python.\n", completion=answer(answers[title]),
                        source=f"builtin:instructions {title!r}") for title in titles]
    train, heldout = split(examples, titles)
    return Dataset(name="python-instructions", train=train, heldout=heldout, labels=[], shape="prompt-completion")


def answer(body: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """The start of ``body`` that ends at a paragraph within ``limit`` characters; where whole paragraphs give
    less than `MIN_ANSWER_CHARS`, at the last sentence (or, without one, word) that fits."""
    kept = ""
    for paragraph in body.split("\n\n"):
        longer = f"{kept}\n\n{paragraph}" if kept else paragraph
        if len(longer) > limit:
            break
        kept = longer
    if len(kept) >= MIN_ANSWER_CHARS or len(body) <= limit:
        return kept or body
    cut = body[: limit + 1]
    end = max(cut.rfind(". "), cut.rfind(".\n")) + 1 or cut.rfind(" ")
    return cut[:end].rstrip() if end > 0 else cut[:limit]


@functools.cache
def stdlib_docstrings() -> Dataset:
    docs_by_label = {pkg: _package_docstrings(pkg) for pkg in DOCSTRING_PACKAGES}

    # A docstring shared between packages (e.g. copied from a base class)
    # cannot be classified correctly, so drop it from every label.
    seen: dict[str, int] = {}
    for docs in docs_by_label.values():
        for doc in docs:
            seen[doc] = seen.get(doc, 0) + 1

    examples: list[Example] = []
    for pkg, docs in docs_by_label.items():
        unique = [doc for doc in docs if seen[doc] == 1]
        # Cap in stable-hash order rather than discovery order so the kept
        # sample is spread over all submodules, not the alphabetically first.
        unique.sort(key=stable_hash)
        examples.extend(Example(doc, pkg) for doc in unique[:MAX_PER_LABEL])

    train, heldout = split(examples, [ex.text for ex in examples])
    return Dataset(
        name="stdlib-docstrings",
        train=train,
        heldout=heldout,
        labels=sorted({ex.label for ex in examples if ex.label is not None}),
    )


def _package_docstrings(package: str) -> list[str]:
    """Distinct docstrings of public objects defined in `package`, in a stable order."""
    docs: dict[str, None] = {}  # ordered set
    for module in _walk_package(package):
        for obj in _public_objects(module, package):
            doc = inspect.getdoc(obj)
            if doc and len(doc.strip()) >= MIN_DOCSTRING_CHARS:
                docs[doc.strip()] = None
    return list(docs)


def _walk_package(name: str) -> Iterator[ModuleType]:
    """Import `name` and its public submodules, depth first in sorted order.

    Walks by hand instead of pkgutil.walk_packages so that private modules,
    `__main__` (which runs code on import, e.g. unittest's test runner) and
    test packages are skipped before they are imported.
    """
    try:
        module = importlib.import_module(name)
    except Exception:  # e.g. asyncio.windows_events on Linux
        return
    yield module
    path = getattr(module, "__path__", None)
    if path is None:
        return
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in ("test", "tests"):
            continue
        yield from _walk_package(f"{name}.{info.name}")


def _public_objects(module: ModuleType, package: str) -> Iterator[Any]:
    """Public classes and functions defined in `package`, plus their public methods."""
    namespace = vars(module)
    for attr in sorted(namespace):
        obj = namespace[attr]
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        # Skip re-exports from other packages (e.g. `socket` names in http).
        owner = getattr(obj, "__module__", None) or ""
        if owner != package and not owner.startswith(package + "."):
            continue
        yield obj
        if inspect.isclass(obj):
            members = vars(obj)
            for member_name in sorted(members):
                member = members[member_name]
                if member_name.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    yield member


# Name -> (builder, task), for --data builtin:NAME.
BUILTIN: dict[str, tuple[Callable[[], Dataset], str]] = {
    "python-reference": (python_reference, "causal-lm"),
    "instructions": (python_instructions, "causal-lm"),
    "stdlib-docstrings": (stdlib_docstrings, "sequence-classification"),
}
