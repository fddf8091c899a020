"""Atomic file writes: a temp file in the target's folder, renamed over the target when complete.

A crash or Ctrl-C leaves either the old file or the new one, never half of one (the same approach
as zarr-python's local store).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _file_mode() -> int:
    """0666 less the process umask (read once, at import: reading it means setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; it replaces ``path`` only on a clean exit."""
    if not any(m in mode for m in "wx"):
        raise ValueError(f"atomic_open writes; mode {mode!r} does not")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        os.fchmod(fd, _FILE_MODE)        # mkstemp makes 0600; a written file gets the usual mode
        with os.fdopen(fd, mode.replace("x", "w"), **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
