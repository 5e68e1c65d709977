"""A small real filesystem that fills up: a tmpfs mounted for one test, and a filler file that
takes its free space and gives it back. Needs root (or CAP_SYS_ADMIN); tests skip otherwise."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

TMPFS_SIZE = "2m"


@contextlib.contextmanager
def small_tmpfs(mount: Path, size: str = TMPFS_SIZE) -> Iterator[Path]:
    """``mount`` as a fresh tmpfs of ``size``, unmounted on exit (skips the test if it cannot
    be mounted)."""
    mount.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", os.fspath(mount)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        pytest.skip("disk-full tests need a tmpfs: there is no mount command here")
    if result.returncode != 0:
        pytest.skip(
            "disk-full tests need a small tmpfs and mounting one is not permitted here (run as"
            f" root or with CAP_SYS_ADMIN): {result.stderr.strip() or result.returncode}"
        )
    try:
        yield mount
    finally:
        done = subprocess.run(["umount", os.fspath(mount)], capture_output=True, timeout=30)
        if done.returncode != 0:  # something still holds a file: detach it anyway
            subprocess.run(["umount", "-l", os.fspath(mount)], capture_output=True, timeout=30)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


class Filler:
    """A file that takes all free space of its filesystem (``fill``) and returns some or all
    of it (``fill(leave=...)``, ``free``)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "filler.bin"

    def fill(self, leave: int = 0) -> None:
        """Write until the disk is full, then give back about ``leave`` bytes."""
        chunk = b"\0" * 65536
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        break
                    chunk = chunk[: len(chunk) // 2]
            size = os.fstat(fd).st_size
            if leave:
                os.ftruncate(fd, max(0, size - leave))
        finally:
            os.close(fd)

    def free(self) -> None:
        self.path.unlink(missing_ok=True)
