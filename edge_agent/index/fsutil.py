"""Small durable-file helpers: the rename trick only survives power loss with both fsyncs."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import EdgeAgentError, IndexFull

__all__ = [
    "DISK_FULL_ERRNOS",
    "TMP_SUFFIX",
    "describe_error",
    "disk_full",
    "fsync_dir",
    "fsync_fd",
    "index_full",
    "is_disk_full",
    "write_file_atomic",
]

TMP_SUFFIX = ".tmp"  # every temporary file ends so; open() removes strays
# The filesystem or the user's quota is full: the caller can act (free space, drop data), so
# these become INDEX_FULL instead of an internal error.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError saying the disk (or quota) is full, or one caused by it."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(exc, IndexFull) and exc.data.get("reason") == "disk_full":
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


def describe_error(exc: BaseException) -> str:
    """A one-line reason without file names: it may reach remote clients (stats, health),
    which must not learn server paths. The log line that goes with it names the path."""
    if isinstance(exc, EdgeAgentError):
        return exc.message
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{name}: {exc.strerror or os.strerror(exc.errno)}"
    return f"{type(exc).__name__}: {exc}"


def index_full(exc: OSError, what: str) -> IndexFull:
    """The INDEX_FULL error for a disk-full OSError met while doing ``what``."""
    reason = exc.strerror or os.strerror(exc.errno or errno.ENOSPC)
    return IndexFull(
        f"disk full: cannot {what} ({reason}); free space on the index's filesystem and retry",
        reason="disk_full",
        errno=errno.errorcode.get(exc.errno or errno.ENOSPC, "ENOSPC"),
    )


@contextmanager
def disk_full(what: str) -> Iterator[None]:
    """Turn a disk-full OSError raised inside into IndexFull (others pass unchanged)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise index_full(exc, what) from exc
        raise


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
