"""Read what a GGUF file says about itself (architecture, dims, pooling, context, quant)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from ..errors import ModelFileError
from .manifest import POOLING_NAMES

__all__ = ["GgufInfo", "read_gguf_info"]

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufInfo:
    architecture: str
    name: str | None
    dims: int
    context_length: int
    pooling: str | None  # None when the file does not say
    quant: str  # "F32", "Q8_0", ... (from general.file_type)


def _field_value(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if len(field.data) == 1:
        return field.parts[field.data[0]].tolist()[0]
    return [field.parts[i].tolist()[0] for i in field.data]


def quant_name(file_type: int | None) -> str:
    if file_type is None:
        return "UNKNOWN"
    try:
        name = gguf.LlamaFileType(file_type).name
    except ValueError:
        return f"FTYPE_{file_type}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def read_gguf_info(path: Path) -> GgufInfo:
    """Parse the header only; any malformed file becomes ModelFileError naming the file."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc}", path=str(path)) from exc
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (magic {magic!r})", path=str(path))
    try:
        reader = gguf.GGUFReader(path)
        arch = _field_value(reader, "general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(f"{path}: no general.architecture", path=str(path))
        dims = _field_value(reader, f"{arch}.embedding_length")
        context = _field_value(reader, f"{arch}.context_length")
        pooling = _field_value(reader, f"{arch}.pooling_type")
        name = _field_value(reader, "general.name")
        file_type = _field_value(reader, "general.file_type")
    except ModelFileError:
        raise
    except Exception as exc:  # the gguf reader raises many kinds on malformed input
        raise ModelFileError(
            f"{path}: malformed GGUF ({type(exc).__name__}: {exc})", path=str(path)
        ) from exc
    if not isinstance(dims, int) or not isinstance(context, int):
        raise ModelFileError(
            f"{path}: missing {arch}.embedding_length/context_length", path=str(path)
        )
    return GgufInfo(
        architecture=arch,
        name=name if isinstance(name, str) else None,
        dims=dims,
        context_length=context,
        pooling=POOLING_NAMES.get(pooling) if isinstance(pooling, int) else None,
        quant=quant_name(file_type if isinstance(file_type, int) else None),
    )
