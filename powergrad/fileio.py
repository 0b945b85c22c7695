"""Atomic file writes: the one place that writes a run's files (checkpoints, JSON, markers).

A file is written to a temporary file beside its target, fsynced and renamed over it, so a kill
at any moment leaves either the old or the new file, never a torn one. The temporary file gets
the permissions a plain ``open()`` would give (0666 minus the umask): ``mkstemp`` creates 0600
files, which teammates on a shared cluster could not read.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

__all__ = ["TEMP_SUFFIX", "DiskFullError", "atomic_write", "remove_stale_temps", "temp_pattern"]

TEMP_SUFFIX = ".tmp"
# A failed write with less free space than this (bytes) on its disk failed for lack of space.
_FULL_BELOW = 1 << 20


class DiskFullError(OSError):
    """No space left while writing a file; the previous version of the file is intact."""


def _read_umask() -> int:
    # os.umask can only be read by setting it; set it back at once. Read once, at import (one
    # thread): checkpoints are written on a background thread while the main thread writes
    # other files, and a file opened between the two calls would get the wrong mode.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None] | bytes | str) -> None:
    """Write ``path`` atomically.

    Args:
        path: the target; its folder must exist.
        write: the content (``bytes`` or ``str``), or a function that writes it to the binary
            file object it is given (e.g. ``lambda f: torch.save(obj, f)``).

    Raises:
        DiskFullError: the disk filled up; the old ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            if callable(write):
                write(f)
            else:
                f.write(write.encode() if isinstance(write, str) else write)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # torch.save reports a full disk as a RuntimeError of its zip writer, not as ENOSPC:
        # look at the disk itself while the partial temp file still fills it.
        full = getattr(e, "errno", None) == errno.ENOSPC or (
            isinstance(e, OSError | RuntimeError) and _free_bytes(path.parent) < _FULL_BELOW
        )
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise DiskFullError(
                errno.ENOSPC,
                f"no space left on the device while writing {path}; "
                "the previous version of that file is intact",
            ) from e
        raise


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return _FULL_BELOW


def temp_pattern(name: str) -> str:
    """The glob of the temporary files :func:`atomic_write` makes for target ``name`` (itself
    a file name or a glob): ``.NAME.<random>.tmp``."""
    return f".{name}.*{TEMP_SUFFIX}"


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that a killed :func:`atomic_write` of one of ``names`` (file
    names or globs) left in ``folder``; anything else there, hidden ``*.tmp`` files of other
    programs included, is left alone."""
    stale = {p for name in names for p in Path(folder).glob(temp_pattern(name)) if p.is_file()}
    for p in stale:
        p.unlink(missing_ok=True)
    return sorted(stale)
