"""Total and available RAM from /proc/meminfo. Standard library only."""

from __future__ import annotations

from pathlib import Path

__all__ = ["read_meminfo"]


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
