"""Total and available RAM from /proc/meminfo; giving freed heap back. Standard library only."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from pathlib import Path

__all__ = ["read_meminfo", "release_free_heap"]


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``); a no-op where
    there is none (macOS, musl).

    glibc keeps freed memory for reuse: after start-up (compiling modules when there are no
    .pyc files, the self-test, building the parser) the daemon held ~1.7 MB of it, and an
    engine child after a 4,096-text call ~90 MB (docs/benchmarks.md)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def read_meminfo(root: Path = Path("/")) -> tuple[int | None, int | None]:
    """(total, available) in bytes; None where unknown."""
    try:
        text = (root / "proc" / "meminfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or not fields or not fields[0].isdigit():
            continue
        unit = fields[1].lower() if len(fields) > 1 else ""
        values[key.strip()] = int(fields[0]) * (1024 if unit == "kb" else 1)
    total = values.get("MemTotal")
    available = values.get("MemAvailable")
    if available is None and "MemFree" in values:
        # Kernels before 3.14 lack MemAvailable: free plus page cache is the usual stand-in.
        available = values["MemFree"] + values.get("Buffers", 0) + values.get("Cached", 0)
    return total, available
