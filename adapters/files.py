"""Atomic writes: a temp file or directory beside the target, fsynced, then renamed into place.

Readers never see half a file, and a crash leaves the previous version intact. A directory is
replaced in two renames (the old one aside, the new one in); a process killed between them leaves
the previous directory under a hidden name, which `recover_dir` puts back on the next call.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Where converted and generated checkpoints and other caches live: $ADAPTERS_CACHE_DIR or ~/.cache/adapters."""
    root = os.environ.get("ADAPTERS_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "adapters"
    return Path(root)

def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a temp file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def dumps_json(data: Any) -> str:
    """Strict JSON (NaN and infinity are refused), indented, with a final newline."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Strict JSON, written atomically."""
    return write_atomic(path, dumps_json(data))


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (creations and renames) durable; a no-op where directories cannot be opened."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, ``root`` last, so a rename of it publishes durable content."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_symlink():
            continue
        if path.is_dir():
            fsync_dir(path)
        else:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def temp_sibling(target: Path, kind: str) -> Path:
    """A hidden name beside ``target`` for a write in progress: ``.NAME.KIND-PID-RANDOM``."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def replace_dir(new: Path, target: Path, keep: tuple[str, ...] = ()) -> None:
    """Put the complete directory ``new`` at ``target``; the entries of the old ``target`` named in ``keep`` move over.

    ``target`` is never missing for longer than between two renames, and a kill there leaves the
    old directory as ``.NAME.old-*``, which `recover_dir` restores.
    """
    fsync_tree(new)
    if not target.exists():
        os.replace(new, target)
        fsync_dir(target.parent)
        return
    old = temp_sibling(target, "old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)  # put the previous directory back where it was
        raise
    fsync_dir(target.parent)
    _retire(old, target, keep)


def recover_dir(target: Path, keep: tuple[str, ...] = ()) -> None:
    """Finish what a killed `replace_dir` into ``target`` left: the old directory back if ``target`` is
    missing, or else its ``keep`` entries moved over and the rest removed; stale temp directories removed.

    Only leftovers of processes that are no longer running are touched, so a save in progress elsewhere
    is left alone.
    """
    found = _leftovers(target)
    for tmp in found["tmp"]:
        shutil.rmtree(tmp, ignore_errors=True)
    olds = sorted(found["old"], key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.replace(olds.pop(), target)  # the newest previous directory: the one a kill left aside
    for old in olds:
        _retire(old, target, keep)
    if found["tmp"] or found["old"]:
        fsync_dir(target.parent)


def _retire(old: Path, target: Path, keep: tuple[str, ...]) -> None:
    for name in keep:
        if (old / name).exists() and not (target / name).exists():
            os.replace(old / name, target / name)
    shutil.rmtree(old, ignore_errors=True)


def _leftovers(target: Path) -> dict[str, list[Path]]:
    """The hidden temp (``tmp``) and set-aside (``old``) directories of ``target`` whose writer has died."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(?:(\d+)-)?[0-9a-f]+")
    found: dict[str, list[Path]] = {"tmp": [], "old": []}
    if not target.name or not target.parent.is_dir():
        return found
    try:
        entries = list(target.parent.iterdir())
    except OSError:  # an unreadable parent: nothing this process could recover anyway
        return found
    for path in entries:
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not _running(match[2]):
            found[match[1]].append(path)
    return found


def _running(pid: str | None) -> bool:
    """Whether the process that named a leftover still runs; names from before pids were recorded are stale."""
    if pid is None:
        return False
    if int(pid) == os.getpid() or os.name == "nt":  # Windows' os.kill would end the process, not probe it
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True
