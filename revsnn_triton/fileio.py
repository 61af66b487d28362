"""Atomic file writes: the one way this project writes a file that a user may keep.

:func:`atomic_write` writes into a temporary file next to the target (``.<name>.<random>.tmp``), flushes and
fsyncs it, gives it the permissions a plain ``open(path, "w")`` would (``0o666`` minus the umask), and renames it
over the target with ``os.replace``. A crash or an error while writing leaves the previous file untouched and
removes the temporary file; a process killed mid-write can leave one behind, which :func:`remove_stale_temps`
clears at the next start.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import IO, Callable

__all__ = ["atomic_write", "atomic_write_text", "remove_stale_temps", "default_file_mode"]


def default_file_mode() -> int:
    """``0o666`` with the process umask applied: the mode ``open()`` gives a new file."""
    try:  # Linux >= 4.7 reports the umask without changing it (os.umask would, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO], object], binary: bool = True) -> Path:
    """Replace ``path`` by what ``write(f)`` writes into an open file object (binary, or text with ``binary=False``).

    The parent folder is created if missing. Returns the path. Errors from ``write`` or from the file system
    (e.g. a full disk) propagate after the temporary file is removed; the file at ``path`` is then unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def remove_stale_temps(folder: str | os.PathLike, names: list[str] | None = None) -> list[Path]:
    """Remove temporary files that an interrupted :func:`atomic_write` left in ``folder`` (only those of the files
    in ``names`` when given). Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")
    removed = []
    for entry in folder.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_file() and (names is None or m.group("name") in names):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
