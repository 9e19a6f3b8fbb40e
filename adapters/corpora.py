"""The built-in datasets: real text that ships with every CPython install.

- causal-lm: "python-reference", the language reference topics from ``pydoc_data``;
- sequence-classification: "stdlib-docstrings", docstrings of public standard-library objects,
  labelled by their top-level package.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from .data import Dataset, Example, split, stable_hash

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
