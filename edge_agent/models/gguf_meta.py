"""Read what a GGUF file says about itself (architecture, dims, pooling, context, quant)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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
    # The shape the memory estimate needs (selection/choose.py); None when the file does not say.
    layers: int | None = None  # {arch}.block_count
    kv_heads: int | None = None  # {arch}.attention.head_count_kv (else head_count)
    key_length: int | None = None  # per head (else embedding_length / head_count)
    value_length: int | None = None
    vocab_size: int | None = None  # entries of tokenizer.ggml.tokens


# GGUF value types with a fixed size (little-endian struct formats); 8 is string, 9 array.
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_MAX_STRING = 1 << 20  # keys and the values we keep are short; more means a corrupt file


def _header_values(handle: IO[bytes], wanted: set[str]) -> dict[str, Any]:
    """The wanted scalar and string key/values of a GGUF v2/v3 header, skipping the rest.

    gguf.GGUFReader decodes every field, the tokenizer's ~30k-entry arrays included, which
    takes seconds; skipping them takes milliseconds. Raises ValueError on anything malformed.
    """

    def read(size: int) -> bytes:
        data = handle.read(size)
        if len(data) != size:
            raise ValueError("truncated header")
        return data

    def unpack(fmt: str) -> Any:
        return struct.unpack(fmt, read(struct.calcsize(fmt)))[0]

    def string() -> str:
        size = unpack("<Q")
        if size > _MAX_STRING:
            raise ValueError(f"string of {size} bytes in the header")
        return read(size).decode("utf-8", errors="replace")

    def skip(vtype: int) -> None:
        if vtype in _SCALARS:
            handle.seek(struct.calcsize(_SCALARS[vtype]), 1)
        elif vtype == 8:
            handle.seek(unpack("<Q"), 1)  # a seek past the end fails at the next read
        elif vtype == 9:
            item, count = unpack("<I"), unpack("<Q")
            if item in _SCALARS:
                handle.seek(struct.calcsize(_SCALARS[item]) * count, 1)
            else:
                for _ in range(count):
                    skip(item)
        else:
            raise ValueError(f"unknown value type {vtype}")

    version = unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    unpack("<Q")  # tensor count
    values: dict[str, Any] = {}
    for _ in range(unpack("<Q")):
        key = string()
        vtype = unpack("<I")
        if key in wanted and vtype == 8:
            values[key] = string()
        elif key in wanted and vtype in _SCALARS:
            values[key] = unpack(_SCALARS[vtype])
        elif key in wanted and vtype == 9:
            item, count = unpack("<I"), unpack("<Q")
            values[key] = count  # arrays: their length only
            if item in _SCALARS:
                handle.seek(struct.calcsize(_SCALARS[item]) * count, 1)
            else:
                for _ in range(count):
                    skip(item)
        else:
            skip(vtype)
    return values


# llama.cpp's enum llama_ftype (general.file_type) by value, as gguf.LlamaFileType names it
# without its MOSTLY_/ALL_ prefixes. A table, not the gguf package: importing gguf for these
# names cost the daemon ~5 MB of RSS (docs/benchmarks.md, "Serving RSS against llama-server");
# tests/test_gguf_meta.py checks the table against the installed gguf.
FILE_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 1024: "GUESSED",
}  # fmt: skip


def quant_name(file_type: int | None) -> str:
    if file_type is None:
        return "UNKNOWN"
    return FILE_TYPE_NAMES.get(file_type, f"FTYPE_{file_type}")


def read_gguf_info(path: Path) -> GgufInfo:
    """Parse the header only; any malformed file becomes ModelFileError naming the file."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
            if magic != GGUF_MAGIC:
                raise ModelFileError(f"{path} is not a GGUF file (magic {magic!r})", path=str(path))
            try:
                values = _header_values(handle, {"general.architecture"})
                arch = values.get("general.architecture")
                if not isinstance(arch, str):
                    raise ModelFileError(f"{path}: no general.architecture", path=str(path))
                handle.seek(4)
                keys = (
                    "embedding_length",
                    "context_length",
                    "pooling_type",
                    "block_count",
                    "attention.head_count",
                    "attention.head_count_kv",
                    "attention.key_length",
                    "attention.value_length",
                )
                values = _header_values(
                    handle,
                    {
                        "general.name",
                        "general.file_type",
                        "tokenizer.ggml.tokens",
                        *(f"{arch}.{k}" for k in keys),
                    },
                )
            except (ValueError, struct.error, OverflowError) as exc:
                raise ModelFileError(
                    f"{path}: malformed GGUF header ({exc})", path=str(path)
                ) from exc
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc}", path=str(path)) from exc
    dims = values.get(f"{arch}.embedding_length")
    context = values.get(f"{arch}.context_length")
    pooling = values.get(f"{arch}.pooling_type")
    name = values.get("general.name")
    file_type = values.get("general.file_type")
    if not isinstance(dims, int) or not isinstance(context, int):
        raise ModelFileError(
            f"{path}: missing {arch}.embedding_length/context_length", path=str(path)
        )
    heads = _positive(values.get(f"{arch}.attention.head_count"))
    kv_heads = _positive(values.get(f"{arch}.attention.head_count_kv")) or heads
    per_head = dims // heads if heads and dims % heads == 0 else None
    return GgufInfo(
        architecture=arch,
        name=name if isinstance(name, str) else None,
        dims=dims,
        context_length=context,
        pooling=POOLING_NAMES.get(pooling) if isinstance(pooling, int) else None,
        quant=quant_name(file_type if isinstance(file_type, int) else None),
        layers=_positive(values.get(f"{arch}.block_count")),
        kv_heads=kv_heads,
        key_length=_positive(values.get(f"{arch}.attention.key_length")) or per_head,
        value_length=_positive(values.get(f"{arch}.attention.value_length")) or per_head,
        vocab_size=_positive(values.get("tokenizer.ggml.tokens")),
    )


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
