"""What training data is made of: `Example`, `Dataset`, `DataError`, and the held-out split.

The leaf of `adapters.data`: the readers, the built-in datasets and training all build on these
types, and this module imports none of them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import AdaptersError

# Fraction of examples kept out of training for evaluation.
HELDOUT_FRACTION = 0.1

# Whether instruction and chat data are packed when the run does not say: what benchmarks/packing.py measured best
# on the built-in instructions (benchmarks/results/packing-cpu-2core.json).
DEFAULT_PACKING = True


class DataError(AdaptersError):
    """The dataset given by the user cannot be read or does not fit the task."""


@dataclass
class Example:
    """One training example: a document (``text``, with a class ``label`` for sequence classification), a
    ``prompt`` and its ``completion``, or a chat's ``messages``."""

    text: str = ""
    label: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, Any]] | None = None
    source: str = field(default="", compare=False, repr=False)  # "FILE:LINE" or "NAME row N", for errors


@dataclass
class Dataset:
    """Examples split into train and held-out parts.

    `labels` holds the sorted label names for sequence classification and is empty for causal-lm. `shape` is
    the key of `adapters.data.SHAPES` the data was read as.
    """

    name: str
    train: list[Example]
    heldout: list[Example]
    labels: list[str]
    shape: str = "text"


def stable_hash(key: str) -> int:
    # hash() is salted per process; sha256 gives the same split on every run.
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def split(examples: list[Example], keys: list[str]) -> tuple[list[Example], list[Example]]:
    """Split into (train, heldout), holding out about HELDOUT_FRACTION by key hash.

    With at least two examples both parts are non-empty: the lowest-hash
    example is always held out and the highest-hash one always trained on.
    Examples with the same key land on the same side.
    """
    hashes = [stable_hash(key) for key in keys]
    cutoff = int(HELDOUT_FRACTION * 2**64)
    held = [h < cutoff for h in hashes]
    if len(set(hashes)) >= 2:
        lowest, highest = min(hashes), max(hashes)
        held = [h == lowest or (h < cutoff and h != highest) for h in hashes]
    train = [ex for ex, h in zip(examples, held, strict=True) if not h]
    heldout = [ex for ex, h in zip(examples, held, strict=True) if h]
    return train, heldout
