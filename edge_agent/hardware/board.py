"""The board model (Raspberry Pi, Jetson, ...) from the device tree. Standard library only."""

from __future__ import annotations

from pathlib import Path

__all__ = ["board_family", "read_board_model"]

# /proc/device-tree is a link to /sys/firmware/devicetree/base; containers often have only
# one of the two, and Raspberry Pi kernels also print "Model" in /proc/cpuinfo.
_MODEL_FILES = (
    ("proc", "device-tree", "model"),
    ("sys", "firmware", "devicetree", "base", "model"),
)
_MAX_MODEL_BYTES = 256

_FAMILIES = (("Raspberry Pi", "raspberry-pi"), ("Jetson", "jetson"))


def _clean(raw: bytes) -> str | None:
    # Device-tree strings end in NUL; a compatible list may hold several NUL-separated names.
    text = raw[:_MAX_MODEL_BYTES].split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()
    return text or None


def read_board_model(root: Path = Path("/")) -> str | None:
    for parts in _MODEL_FILES:
        try:
            model = _clean((root.joinpath(*parts)).read_bytes())
        except OSError:
            continue
        if model:
            return model
    try:
        cpuinfo = (root / "proc" / "cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        # Case matters: x86 prints a numeric "model", Raspberry Pi kernels a named "Model".
        if sep and key.strip() == "Model" and value.strip():
            return value.strip()[:_MAX_MODEL_BYTES]
    return None


def board_family(model: str | None) -> str | None:
    """``"raspberry-pi"``, ``"jetson"`` or None (for display; profiles match the model)."""
    if not model:
        return None
    return next((family for needle, family in _FAMILIES if needle in model), None)
