"""``fsync_path``: flush a file or folder to disk, best effort (shared by checkpoints and data stores)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """``os.fsync`` of ``path`` (a file, or a folder so that renames inside it are durable).

    Best effort: a path that cannot be opened or synced (some filesystems refuse folders) is
    skipped silently; it never raises ``OSError``.
    """
    try:
        fd = os.open(Path(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
