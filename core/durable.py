"""Making a file system change survive power loss: fsync of a directory's entries."""
from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike) -> None:
    """A new, renamed or deleted name in `path` is durable only once the directory is fsynced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
