"""Documents and search hits, input validation, and the WAL record payload codec."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import numpy as np

from ..errors import InvalidArgument
from .config import IndexConfig

__all__ = [
    "OP_DELETE",
    "OP_PUT",
    "Delete",
    "Document",
    "Hit",
    "Put",
    "check_vector_rows",
    "decode_payload",
    "encode_payload",
    "normalize_vectors",
    "validate_id",
    "validate_metadata",
    "validate_text",
]

OP_PUT = 0
OP_DELETE = 1
MAX_METADATA_KEY_BYTES = 256
MAX_METADATA_KEYS = 256
_INT64 = (-(1 << 63), (1 << 64) - 1)  # msgpack's integer range


@dataclass(frozen=True)
class Document:
    id: str
    text: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    vector: np.ndarray | None = None  # float32, unit length (as stored)


@dataclass(frozen=True)
class Hit:
    id: str
    # dense: cosine similarity in [-1, 1]; keyword: BM25 (> 0); hybrid: the fused score
    score: float
    metadata: dict[str, Any]
    text: str | None = None
    dense_score: float | None = None  # hybrid: the cosine, when known
    keyword_score: float | None = None  # keyword/hybrid: the BM25 score, when it matched


@dataclass(frozen=True)
class Put:
    id: str
    vector: np.ndarray  # (dim,) float32, unit length
    text: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Delete:
    id: str


def validate_id(doc_id: object, config: IndexConfig, where: str = "id") -> str:
    if not isinstance(doc_id, str) or not doc_id:
        raise InvalidArgument(f"{where} must be a non-empty string, got {doc_id!r:.80}")
    try:
        size = len(doc_id.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{where} is not valid UTF-8 text ({exc.reason})") from exc
    if size > config.max_id_bytes:
        raise InvalidArgument(
            f"{where} is {size} bytes; the limit is {config.max_id_bytes}",
            limit=config.max_id_bytes,
        )
    return doc_id


def validate_text(text: object, config: IndexConfig, where: str = "text") -> str | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise InvalidArgument(f"{where} must be a string or None, got {type(text).__name__}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{where} is not valid UTF-8 text ({exc.reason})") from exc
    if size > config.max_text_bytes:
        raise InvalidArgument(
            f"{where} is {size} bytes; the limit is {config.max_text_bytes}",
            limit=config.max_text_bytes,
        )
    return text


def _check_scalar(value: object, where: str) -> None:
    if value is None or isinstance(value, (bool, str, bytes)):
        return
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise InvalidArgument(f"{where} is outside the 64-bit integer range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(f"{where} must be finite, got {value!r}")
        return
    raise InvalidArgument(
        f"{where} must be None, bool, int, float, str or bytes (metadata is a flat map),"
        f" got {type(value).__name__}"
    )


def validate_metadata(metadata: object, config: IndexConfig, where: str = "metadata") -> dict:
    """A flat map of string keys to scalars, at most ``max_metadata_bytes`` as msgpack."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidArgument(f"{where} must be a map, got {type(metadata).__name__}")
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidArgument(f"{where} has {len(metadata)} keys; the limit is {MAX_METADATA_KEYS}")
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"{where} keys must be non-empty strings, got {key!r:.80}")
        if len(key.encode("utf-8", errors="replace")) > MAX_METADATA_KEY_BYTES:
            raise InvalidArgument(
                f"{where} key {key[:40]!r} is over {MAX_METADATA_KEY_BYTES} bytes"
            )
        _check_scalar(value, f"{where}[{key[:40]!r}]")
        out[key] = value
    try:
        size = len(msgpack.packb(out, use_bin_type=True))
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidArgument(f"{where} cannot be stored ({exc})") from exc
    if size > config.max_metadata_bytes:
        raise InvalidArgument(
            f"{where} is {size} bytes packed; the limit is {config.max_metadata_bytes}",
            limit=config.max_metadata_bytes,
        )
    return out


def normalize_vectors(
    vectors: object, dim: int, count: int | None = None, *, where: str = "vectors"
) -> np.ndarray:
    """(n, dim) float32 rows scaled to unit length; typed errors for anything unusable.

    Computed in float64 after dividing each row by its largest magnitude: squaring float32
    components overflows above ~1.8e19 (1e20 gave a zero vector, stored silently) and
    underflows below ~1e-23, while a row scaled into [-1, 1] squares safely whatever its
    magnitude. Every row must come out finite and of unit length, else the error names it.
    """
    try:
        array = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(f"{where} must be numbers ({exc})", argument=where) from exc
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise InvalidArgument(
            f"{where} must have shape (n, {dim}), got {tuple(np.shape(cast(Any, vectors)))}",
            dims=dim,
            argument=where,
        )
    if count is not None and array.shape[0] != count:
        raise InvalidArgument(f"{array.shape[0]} vectors for {count} ids", argument=where)
    peak = check_vector_rows(array, where)
    scaled = array / peak[:, None]  # every entry in [-1, 1], the largest exactly +-1
    unit = (scaled / np.linalg.norm(scaled, axis=1)[:, None]).astype(np.float32)
    # Unit rows have an entry of at least 1/sqrt(dim), far above float32's resolution, so
    # this only fails on a bug: check anyway, a bad vector must never reach the WAL.
    norms = np.linalg.norm(unit.astype(np.float64), axis=1)
    bad = ~(np.isfinite(unit).all(axis=1) & (np.abs(norms - 1.0) < 1e-3))
    if bad.any():
        row = int(np.argmax(bad))
        raise InvalidArgument(
            f"{where}[{row}] cannot be normalised to unit length", argument=where, index=row
        )
    return np.ascontiguousarray(unit)


def check_vector_rows(array: np.ndarray, where: str = "vectors") -> np.ndarray:
    """Each row's largest magnitude, after refusing a row with NaN or infinity or one that is
    all zero (no direction), naming it. One pass over (n, dim) floats: cheap enough for an
    event loop, so a server can refuse a bad row before anything is queued or created."""
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise InvalidArgument(f"{where}[{row}] contains NaN or infinity", argument=where, index=row)
    peak = np.abs(array).max(axis=1) if array.shape[1] else np.zeros(len(array), array.dtype)
    if (peak == 0).any():
        row = int(np.argmin(peak))
        raise InvalidArgument(
            f"{where}[{row}] is zero: it has no direction", argument=where, index=row
        )
    return peak


def encode_payload(lsn: int, ops: Sequence[Put | Delete]) -> bytes:
    packed: list[list[Any]] = []
    for op in ops:
        if isinstance(op, Put):
            packed.append([OP_PUT, op.id, op.vector.astype("<f4").tobytes(), op.text, op.metadata])
        else:
            packed.append([OP_DELETE, op.id])
    return msgpack.packb([lsn, packed], use_bin_type=True)


def decode_payload(payload: bytes, dim: int) -> tuple[int, list[Put | Delete]]:
    """(lsn, ops) of a record whose CRC already matched; ValueError if it is not ours."""
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:
        raise ValueError(f"payload does not decode ({exc})") from exc
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[0], int)):
        raise ValueError("payload is not [lsn, ops]")
    lsn, raw_ops = data
    if lsn < 1 or not isinstance(raw_ops, list) or not raw_ops:
        raise ValueError("bad lsn or empty op list")
    ops: list[Put | Delete] = []
    for raw in raw_ops:
        if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], str):
            raise ValueError("malformed op")
        if raw[0] == OP_PUT and len(raw) == 5:
            _, doc_id, blob, text, metadata = raw
            if not isinstance(blob, bytes) or len(blob) != 4 * dim:
                raise ValueError(f"vector of {doc_id!r:.80} is not {dim} float32 values")
            if not (text is None or isinstance(text, str)) or not isinstance(metadata, dict):
                raise ValueError(f"text or metadata of {doc_id!r:.80} malformed")
            vector = np.frombuffer(blob, dtype="<f4").astype(np.float32)
            if not np.isfinite(vector).all():
                raise ValueError(f"vector of {doc_id!r:.80} is not finite")
            ops.append(Put(doc_id, vector, text, metadata))
        elif raw[0] == OP_DELETE and len(raw) == 2:
            ops.append(Delete(raw[1]))
        else:
            raise ValueError(f"unknown op {raw[0]!r}")
    return lsn, ops
