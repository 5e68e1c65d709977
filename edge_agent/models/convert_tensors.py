"""Read the tensors of a Hugging Face model directory (one or several ``*.safetensors`` files).

The safetensors format is an 8-byte header length, a JSON header (name -> dtype, shape,
byte offsets) and the raw little-endian data. It is read here with numpy memory maps rather
than ``safetensors.safe_open(framework="numpy")`` because numpy has no bfloat16 and Qwen3
checkpoints are stored in bf16: bf16 is widened to float32 exactly (its 16 bits are the top
half of a float32). Only the tensor being converted is in memory at a time.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError

__all__ = ["TensorSource", "open_tensors"]

_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class TensorSource:
    """Every tensor of the directory's safetensors files, by name."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self._entries: dict[str, _Entry] = {}
        for path in files:
            for name, entry in _read_header(path).items():
                if name in self._entries:
                    raise ModelFileError(f"{path}: tensor {name} is also in another file")
                self._entries[name] = entry

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (bf16/f16/f64 widened or narrowed exactly where possible)."""
        entry = self._entries[name]
        dtype = _DTYPES[entry.dtype]
        count = int(np.prod(entry.shape)) if entry.shape else 1
        if entry.end - entry.start != count * dtype.itemsize:
            raise ModelFileError(
                f"{entry.file}: tensor {name} has {entry.end - entry.start} bytes for shape"
                f" {entry.shape} {entry.dtype}",
                path=str(entry.file),
            )
        raw = np.memmap(entry.file, dtype=dtype, mode="r", offset=entry.start, shape=(count,))
        if entry.dtype == "BF16":
            data = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            data = raw.astype(np.float32)
        return data.reshape(entry.shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._entries:
            yield name, self.get(name)


def _read_header(path: Path) -> dict[str, _Entry]:
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise ModelFileError(f"{path}: not a safetensors file", path=str(path))
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER:
                raise ModelFileError(f"{path}: header of {length} bytes", path=str(path))
            header = json.loads(handle.read(length))
        size = path.stat().st_size
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read {path}: {exc}", path=str(path)) from exc
    base = 8 + length
    entries: dict[str, _Entry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = meta["dtype"]
            start, end = (int(v) for v in meta["data_offsets"])
            shape = tuple(int(d) for d in meta["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: bad header entry {name}", path=str(path)) from exc
        if dtype not in _DTYPES:
            raise ModelFileError(
                f"{path}: tensor {name} is {dtype}; supported: {', '.join(_DTYPES)}",
                path=str(path),
            )
        if not 0 <= start <= end or base + end > size:
            raise ModelFileError(f"{path}: tensor {name} lies outside the file", path=str(path))
        entries[name] = _Entry(path, dtype, shape, base + start, base + end)
    return entries


def open_tensors(model_dir: Path) -> TensorSource:
    """The tensors of ``model_dir`` (``model.safetensors`` or sharded ``*.safetensors``)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFileError(
            f"{model_dir}: no *.safetensors weights (PyTorch .bin checkpoints are not read:"
            " save the model with safetensors)",
            path=str(model_dir),
        )
    return TensorSource(files)
