"""Weights in files: safetensors read by content, never unpickled, and checked before they are used.

A leaf module: saving (`adapters.store`), PEFT's files (`adapters.peft`) and a sharded run's optimizer state all
read weights through it.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import AdaptersError


def read_safetensors(path: Path, *, finite: bool = True) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, refusing anything else by content (never unpickles).

    A tensor holding NaN or infinity is refused too, naming it, unless ``finite`` is False.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("too short")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > path.stat().st_size - 8 or f.read(1) != b"{":
                raise ValueError("no safetensors header")
        tensors = load_file(path)
    except FileNotFoundError:
        raise AdaptersError(f"{path}: file not found; the saved directory is incomplete. Save it again.") from None
    except (ValueError, SafetensorError, OSError) as exc:
        raise AdaptersError(
            f"{path}: not a safetensors file ({exc}); adapters never loads pickles. "
            "Re-save the weights in safetensors format."
        ) from None
    if finite and (bad := first_non_finite(tensors.items())):
        raise AdaptersError(f"{path}: tensor {bad} holds NaN or infinite values; adapters never loads such weights. "
                            "Train and save it again.")
    return tensors


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor that holds NaN or infinity, or None."""
    return next((name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def check_keys(saved: dict[str, torch.Tensor], expected: dict[str, torch.Size], path: Path) -> None:
    """Refuse weights whose names or shapes differ from what the model expects."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}")
        raise AdaptersError(
            f"{path}: {'; '.join(parts)}. The weights do not match this strategy and config; "
            "load them with the options they were saved with."
        )
    for name, shape in expected.items():
        if tuple(saved[name].shape) != tuple(shape):
            raise AdaptersError(
                f"{path}: parameter {name} has shape {tuple(saved[name].shape)} in the file but "
                f"{tuple(shape)} in the model. Load it onto the base it was trained on."
            )
