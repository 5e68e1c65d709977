"""Small durable-file helpers: the rename trick only survives power loss with both fsyncs."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

__all__ = ["TMP_SUFFIX", "fsync_dir", "fsync_fd", "write_file_atomic"]

TMP_SUFFIX = ".tmp"  # every temporary file ends so; open() removes strays


def fsync_fd(fd: int) -> None:
    """Flush a file to stable storage (macOS: fsync alone stops at the drive's cache)."""
    if sys.platform == "darwin":
        import fcntl

        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or create in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory; there is nothing more we can do there.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Temp file, fsync, rename, directory fsync: readers see the old bytes or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            fsync_fd(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
