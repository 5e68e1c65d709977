"""Snapshots: the hnswlib graph file plus our own header and id map, checked before loading.

A snapshot generation G is two files written together and pinned by the manifest:

``snap-G.hnsw``  hnswlib's own save_index output, untouched.
``snap-G.meta``  fixed header, then a msgpack body::

    magic "EASNAP\\r\\n" (8) | version u32 | dim u32 | lsn u64 | count u64 | elements u64 |
    next_label u64 | m u32 | ef_construction u32 | hnsw_size u64 | hnsw_crc32 u32 |
    body_size u64 | body_crc32 u32 | header_crc32 u32 (of everything before it)
    body: {"fingerprint": {...}, "next_label": int, "docs": [[id, label, text, metadata], ...]}

hnswlib's load_index trusts its input (a truncated or crafted file can crash the process or
make it allocate without bound), so before a .hnsw file reaches it we check its size and
CRC32 against our header, then walk its own header and link lists: sizes, counts, neighbour
ids and labels must all be consistent, and its live labels must be exactly our id map's.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import numpy as np

from ..errors import IndexCorrupt
from .fsutil import TMP_SUFFIX, fsync_dir, fsync_fd

if TYPE_CHECKING:
    import hnswlib

__all__ = [
    "GraphCopy",
    "GraphFile",
    "GraphSource",
    "LoadedSnapshot",
    "SnapshotState",
    "check_hnsw_complete",
    "graph_bytes",
    "load_snapshot",
    "pack_body",
    "snapshot_gen",
    "snapshot_paths",
    "validate_snapshot",
    "write_snapshot",
]

SNAP_MAGIC = b"EASNAP\r\n"
SNAP_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQQIIQIQII")
# hnswlib 0.8 HierarchicalNSW::saveIndex header: offsetLevel0, max_elements, cur_element_count,
# size_data_per_element, label_offset, offsetData, maxlevel, enterpoint_node, maxM, maxM0, M,
# mult, ef_construction.
_HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
_DELETE_MARK = 0x01  # hnswlib keeps it in byte 2 of an element's level-0 link header
_NO_ENTRY = 0xFFFFFFFF
_CHUNK = 8 << 20
_MAX_LEVEL = 64  # levels are ~log_M(n): 64 is far beyond any real index
# A short graph file with less than this free on its filesystem is blamed on a full disk.
_SHORT_WRITE_FREE_BYTES = 4 << 20


def snapshot_paths(directory: Path, gen: int) -> tuple[Path, Path]:
    stem = f"snap-{gen:010d}"
    return directory / f"{stem}.hnsw", directory / f"{stem}.meta"


def snapshot_gen(name: str) -> int | None:
    """The generation in a snapshot file name (either file), or None."""
    if not name.startswith("snap-") or not name.endswith((".hnsw", ".meta")):
        return None
    digits = name[5:-5]
    return int(digits) if len(digits) == 10 and digits.isdigit() else None


@dataclass(frozen=True)
class SnapshotState:
    """Everything besides the graph: what a collection needs to resume at ``lsn``."""

    lsn: int
    next_label: int
    fingerprint: dict[str, Any]
    docs: list[tuple[str, int, str | None, dict[str, Any]]]  # id, label, text, metadata


@dataclass
class LoadedSnapshot:
    index: hnswlib.Index
    state: SnapshotState
    elements: int  # graph slots in use, deleted ones included
    vectors: np.ndarray | None  # rows aligned with state.docs, when asked for and few enough


def _file_crc(fd: int) -> tuple[int, int]:
    crc, size = 0, 0
    while chunk := os.read(fd, _CHUNK):
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    return crc, size


class GraphSource(Protocol):
    """What write_snapshot needs of a graph: hnswlib.Index, GraphCopy or GraphFile."""

    @property
    def element_count(self) -> int: ...

    @property
    def M(self) -> int: ...  # hnswlib's attribute name

    @property
    def ef_construction(self) -> int: ...

    def save_index(self, path: str) -> None: ...


class GraphCopy:
    """A point-in-time copy of an hnswlib graph, written later without any lock held.

    Taken with hnswlib's pickle state, which is a memcpy of the level-0 block and of the
    upper-level link lists: about 3x faster than ``save_index`` into the page cache, and it is
    the only part of a background snapshot that writers wait for. ``save_index`` then writes
    the bytes hnswlib's own ``saveIndex`` would (tests/test_index_snapshots.py compares them
    byte for byte), so loading and validation do not know the difference. Costs one more
    copy of the graph in memory while the snapshot is written.
    """

    def __init__(self, index: hnswlib.Index) -> None:
        params = index.__getstate__()[0]
        self._params = params
        self.element_count = int(params["cur_element_count"])
        self.M = int(params["M"])
        self.ef_construction = int(params["ef_construction"])

    def save_index(self, path: str) -> None:
        p = self._params
        count = self.element_count
        # Types as hnswlib writes them: size_t fields, int maxlevel, u32 entry point.
        header = _HNSW_HEADER.pack(
            int(p["offset_level0"]),
            int(p["max_elements"]),
            count,
            int(p["size_data_per_element"]),
            int(p["label_offset"]),
            int(p["offset_data"]),
            int(p["max_level"]),
            int(p["enterpoint_node"]) & 0xFFFFFFFF,
            int(p["max_M"]),
            int(p["max_M0"]),
            self.M,
            float(p["mult"]),
            self.ef_construction,
        )
        level0 = np.asarray(p["data_level0"]).view(np.uint8)
        if level0.size != count * int(p["size_data_per_element"]):
            raise ValueError("hnswlib state: level-0 block size does not match the count")
        # Upper levels: per element a u32 byte size, then that many bytes (none at level 0).
        # Sizes are multiples of 4 (u32 link entries), so every field is u32-aligned and the
        # interleaving can be done on u32 words.
        per_level = int(p["size_links_per_element"])
        sizes = np.asarray(p["element_levels"][:count], dtype=np.int64) * per_level
        links = np.asarray(p["link_lists"]).view(np.uint8)
        if int(sizes.sum()) != links.size or per_level % 4:
            raise ValueError("hnswlib state: link lists do not match the element levels")
        words = np.zeros(count + links.size // 4, dtype="<u4")
        # Word index of element i's size field: i earlier size fields + earlier links.
        before = np.cumsum(sizes // 4) - sizes // 4
        size_at = np.arange(count, dtype=np.int64) + before
        words[size_at] = sizes
        is_link = np.ones(len(words), dtype=bool)
        is_link[size_at] = False
        words[is_link] = links.view("<u4")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for part in (header, level0, words):
                view = (memoryview(part) if isinstance(part, bytes) else part.data).cast("B")
                while view:
                    view = view[os.write(fd, view[:_CHUNK]) :]
        finally:
            os.close(fd)


class GraphFile:
    """A graph already dumped with ``save_index`` to a temporary file (no extra memory, for
    graphs too big to copy); ``save_index`` moves that file into place."""

    def __init__(self, index: hnswlib.Index, tmp: Path) -> None:
        self.tmp = tmp
        index.save_index(str(tmp))
        self.element_count = int(index.element_count)
        self.M = int(index.M)
        self.ef_construction = int(index.ef_construction)

    def save_index(self, path: str) -> None:
        os.replace(self.tmp, path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def graph_bytes(elements: int, dim: int, m: int) -> int:
    """About what a graph of ``elements`` slots occupies (level 0, plus ~1/M upper links)."""
    level0 = 4 + 8 * m + 4 * dim + 8
    return int(elements * (level0 + (4 + 4 * m) / max(m - 1, 1) + 4))


def check_hnsw_complete(path: Path, elements: int) -> None:
    """Raise OSError unless ``path`` is a whole hnswlib graph file of ``elements`` elements.

    hnswlib's save_index writes through an unchecked std::ofstream: on a full disk it leaves a
    short file and returns as if it had succeeded. The file's CRC would then be taken of the
    short bytes and the snapshot committed; with keep_snapshots=1 the WAL it replaces would be
    deleted. So the sizes it wrote are walked here, before anything trusts the file."""
    size = path.stat().st_size
    position = -1
    if size >= _HNSW_HEADER.size:
        with (
            path.open("rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm,
        ):
            fields = _HNSW_HEADER.unpack_from(mm, 0)
            count, per_element = int(fields[2]), int(fields[3])
            if count == elements:
                position = _HNSW_HEADER.size + count * per_element
                for _ in range(count):  # upper-level link lists: u32 size, then the bytes
                    if position + 4 > size:
                        position = -1
                        break
                    (nbytes,) = struct.unpack_from("<I", mm, position)
                    position += 4 + nbytes
    if position == size:
        return
    # ofstream does not say why; a nearly full filesystem is by far the likeliest reason, and
    # the only one the caller can fix, so report it as such (INDEX_FULL) when it fits.
    stat = os.statvfs(path.parent)
    full = stat.f_bavail * stat.f_frsize < _SHORT_WRITE_FREE_BYTES
    raise OSError(
        errno.ENOSPC if full else errno.EIO,
        f"hnswlib wrote an incomplete graph file ({size} bytes)"
        + (" on a full disk" if full else ""),
    )


def write_snapshot(
    directory: Path, gen: int, index: GraphSource, state: SnapshotState, dim: int
) -> int:
    """Write generation ``gen`` durably (temp files, fsync, rename, dir fsync); its size.

    ``index`` is the live graph (the caller keeps writers out until this returns) or a
    GraphCopy / GraphFile taken earlier (nothing needs to be held)."""
    hnsw_path, meta_path = snapshot_paths(directory, gen)
    hnsw_tmp = hnsw_path.with_name(f".{hnsw_path.name}{TMP_SUFFIX}")
    meta_tmp = meta_path.with_name(f".{meta_path.name}{TMP_SUFFIX}")
    try:
        index.save_index(str(hnsw_tmp))
        if not isinstance(index, GraphCopy):  # hnswlib wrote it, unchecked
            check_hnsw_complete(hnsw_tmp, int(index.element_count))
        fd = os.open(hnsw_tmp, os.O_RDONLY)
        try:
            hnsw_crc, hnsw_size = _file_crc(fd)
            fsync_fd(fd)
        finally:
            os.close(fd)
        body = pack_body(state)
        fields = (
            SNAP_MAGIC,
            SNAP_VERSION,
            dim,
            state.lsn,
            len(state.docs),
            int(index.element_count),
            state.next_label,
            int(index.M),
            int(index.ef_construction),
            hnsw_size,
            hnsw_crc,
            len(body),
            zlib.crc32(body),
        )
        head = _HEADER.pack(*fields, 0)[:-4]
        header = head + struct.pack("<I", zlib.crc32(head))
        fd = os.open(meta_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for part in (header, body):
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            fsync_fd(fd)
        finally:
            os.close(fd)
        os.replace(hnsw_tmp, hnsw_path)
        os.replace(meta_tmp, meta_path)
    finally:
        hnsw_tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)
    fsync_dir(directory)
    return hnsw_size + len(header) + len(body)


def pack_body(state: SnapshotState, chunk: int = 1024) -> bytes:
    """The msgpack body: the same bytes as packb of the whole map, but packed ``chunk``
    documents at a time, so a background snapshot never holds the GIL for long (one packb call
    over 100k documents holds it ~50 ms, which writers and searches would wait for)."""
    packer = msgpack.Packer(use_bin_type=True)
    docs = state.docs
    parts = [
        packer.pack_map_header(3),
        packer.pack("fingerprint"),
        packer.pack(state.fingerprint),
        packer.pack("next_label"),
        packer.pack(state.next_label),
        packer.pack("docs"),
        packer.pack_array_header(len(docs)),
    ]
    for start in range(0, len(docs), chunk):
        part = [list(doc) for doc in docs[start : start + chunk]]
        # A packed list is its array header followed by the items: keep the items only.
        header = len(packer.pack_array_header(len(part)))
        parts.append(packer.pack(part)[header:])
    return b"".join(parts)


@dataclass(frozen=True)
class _Header:
    dim: int
    lsn: int
    count: int
    elements: int
    next_label: int
    m: int
    ef_construction: int
    hnsw_size: int
    hnsw_crc: int
    body_size: int
    body_crc: int


def _corrupt(path: Path, detail: str) -> IndexCorrupt:
    return IndexCorrupt(f"snapshot {path}: {detail}", path=str(path))


def read_header(meta_path: Path) -> tuple[_Header, bytes]:
    """Our header, validated, and the raw body (its CRC checked)."""
    try:
        data = meta_path.read_bytes()
    except OSError as exc:
        raise _corrupt(meta_path, f"cannot read ({exc})") from exc
    if len(data) < _HEADER.size:
        raise _corrupt(meta_path, f"{len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    fields = _HEADER.unpack_from(data, 0)
    if fields[0] != SNAP_MAGIC:
        raise _corrupt(meta_path, "not a snapshot (bad magic)")
    if zlib.crc32(data[: _HEADER.size - 4]) != fields[-1]:
        raise _corrupt(meta_path, "header checksum mismatch")
    if fields[1] != SNAP_VERSION:
        raise _corrupt(meta_path, f"snapshot version {fields[1]} is not {SNAP_VERSION}")
    header = _Header(*fields[2:-1])
    body = data[_HEADER.size :]
    if len(body) != header.body_size:
        raise _corrupt(meta_path, f"body is {len(body)} bytes, the header says {header.body_size}")
    if zlib.crc32(body) != header.body_crc:
        raise _corrupt(meta_path, "body checksum mismatch")
    return header, body


@dataclass(frozen=True)
class _HnswLayout:
    labels: np.ndarray  # (elements,) uint64
    deleted: np.ndarray  # (elements,) bool


def _inspect_hnsw(path: Path, header: _Header) -> _HnswLayout:
    """Walk hnswlib's file: every size and id it will trust, checked against our header."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size != header.hnsw_size:
            raise _corrupt(path, f"{size} bytes, the snapshot header says {header.hnsw_size}")
        crc, _ = _file_crc(handle.fileno())
        if crc != header.hnsw_crc:
            raise _corrupt(path, "checksum mismatch")
        if size < _HNSW_HEADER.size:
            raise _corrupt(path, "shorter than hnswlib's header")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _walk_hnsw(path, mm, size, header)


def _walk_hnsw(path: Path, mm: mmap.mmap, size: int, header: _Header) -> _HnswLayout:
    (
        offset_level0,
        _max_elements,
        count,
        size_per_element,
        label_offset,
        offset_data,
        max_level,
        entry,
        max_m,
        max_m0,
        m,
        mult,
        ef_construction,
    ) = _HNSW_HEADER.unpack_from(mm, 0)
    dim = header.dim
    expected = {
        "offsetLevel0": (offset_level0, 0),
        "cur_element_count": (count, header.elements),
        "M": (m, header.m),
        "maxM": (max_m, header.m),
        "maxM0": (max_m0, 2 * header.m),
        "ef_construction": (ef_construction, header.ef_construction),
        "offsetData": (offset_data, 4 + 4 * 2 * header.m),
        "label_offset": (label_offset, 4 + 4 * 2 * header.m + 4 * dim),
        "size_data_per_element": (size_per_element, 4 + 4 * 2 * header.m + 4 * dim + 8),
    }
    for name, (got, want) in expected.items():
        if got != want:
            raise _corrupt(path, f"hnswlib {name} is {got}, expected {want}")
    if not math.isclose(mult, 1 / math.log(header.m), rel_tol=1e-9):
        raise _corrupt(path, f"hnswlib mult {mult} does not match M={header.m}")
    if count == 0:
        if entry != _NO_ENTRY or max_level != -1:
            raise _corrupt(path, "empty graph with an entry point")
    elif not (0 <= max_level <= _MAX_LEVEL and entry < count):
        raise _corrupt(path, f"entry point {entry} / max level {max_level} out of range")
    level0_end = _HNSW_HEADER.size + count * size_per_element
    if level0_end > size:
        raise _corrupt(path, f"{count} elements need {level0_end} bytes, the file has {size}")
    if count == 0:
        if size != _HNSW_HEADER.size:
            raise _corrupt(path, f"{size - _HNSW_HEADER.size} unexpected bytes in an empty graph")
        return _HnswLayout(labels=np.empty(0, np.uint64), deleted=np.empty(0, bool))
    base = _HNSW_HEADER.size
    link_headers = np.ndarray((count,), "<u4", buffer=mm, offset=base, strides=(size_per_element,))
    link_counts = (link_headers & 0xFFFF).astype(np.int64)
    if count and int(link_counts.max()) > max_m0:
        raise _corrupt(path, "a level-0 neighbour count is over maxM0")
    links = np.ndarray(
        (count, max_m0), "<u4", buffer=mm, offset=base + 4, strides=(size_per_element, 4)
    )
    used = np.arange(max_m0)[None, :] < link_counts[:, None]
    if count and bool((links[used] >= count).any()):
        raise _corrupt(path, "a level-0 neighbour id is out of range")
    deleted = ((link_headers >> 16) & _DELETE_MARK).astype(bool)
    label_view = np.ndarray(
        (count,), "<u8", buffer=mm, offset=base + label_offset, strides=(size_per_element,)
    )
    labels = np.array(label_view)
    del label_view
    del link_headers, links
    # Upper-level link lists: a u32 byte size per element, then that many bytes.
    per_level = 4 + 4 * max_m
    position = level0_end
    for element in range(count):
        if position + 4 > size:
            raise _corrupt(path, f"link list of element {element} runs past the end")
        (nbytes,) = struct.unpack_from("<I", mm, position)
        position += 4
        if not nbytes:
            continue
        levels, remainder = divmod(nbytes, per_level)
        if remainder or levels > max(max_level, 0) or position + nbytes > size:
            raise _corrupt(path, f"link list of element {element} has a bad size {nbytes}")
        block = np.ndarray((levels, 1 + max_m), "<u4", buffer=mm, offset=position)
        level_counts = block[:, 0] & 0xFFFF
        if bool((level_counts > max_m).any()):
            raise _corrupt(path, f"element {element} has an upper-level count over maxM")
        ids = block[:, 1:]
        mask = np.arange(max_m)[None, :] < level_counts[:, None].astype(np.int64)
        if bool((ids[mask] >= count).any()):
            raise _corrupt(path, f"element {element} links to an id out of range")
        del block, ids
        position += nbytes
    if position != size:
        raise _corrupt(path, f"{size - position} unexpected bytes after the link lists")
    return _HnswLayout(labels=labels, deleted=deleted)


def _decode_body(path: Path, body: bytes, header: _Header) -> SnapshotState:
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise _corrupt(path, f"body does not decode ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("docs"), list):
        raise _corrupt(path, "body is not a snapshot map")
    docs: list[tuple[str, int, str | None, dict[str, Any]]] = []
    for item in data["docs"]:
        if not (
            isinstance(item, list)
            and len(item) == 4
            and isinstance(item[0], str)
            and isinstance(item[1], int)
            and (item[2] is None or isinstance(item[2], str))
            and isinstance(item[3], dict)
        ):
            raise _corrupt(path, "a document entry is malformed")
        docs.append((item[0], item[1], item[2], item[3]))
    if len(docs) != header.count or data.get("next_label") != header.next_label:
        raise _corrupt(path, "body disagrees with the header (count or next label)")
    fingerprint = data.get("fingerprint")
    if not isinstance(fingerprint, dict):
        raise _corrupt(path, "body has no fingerprint")
    return SnapshotState(header.lsn, header.next_label, fingerprint, docs)


def validate_snapshot(
    directory: Path, gen: int, *, dim: int, m: int, vectors_up_to: int = -1
) -> tuple[SnapshotState, int, np.ndarray | None]:
    """Check generation ``gen`` completely without hnswlib: (state, elements, vectors).

    ``vectors`` are the live documents' rows, aligned with ``state.docs``, when there are at
    most ``vectors_up_to`` of them (else None). Raises IndexCorrupt.
    """
    hnsw_path, meta_path = snapshot_paths(directory, gen)
    header, body = read_header(meta_path)
    if header.dim != dim:
        raise _corrupt(meta_path, f"dimension {header.dim}, the collection has {dim}")
    if header.m != m:
        raise _corrupt(meta_path, f"M={header.m}, the collection has M={m}")
    if header.count > header.elements:
        raise _corrupt(meta_path, "more documents than graph elements")
    state = _decode_body(meta_path, body, header)
    del body
    doc_labels = np.fromiter((doc[1] for doc in state.docs), dtype=np.int64, count=len(state.docs))
    layout = _inspect_hnsw(hnsw_path, header)
    live = layout.labels[~layout.deleted]
    if len(np.unique(layout.labels)) != len(layout.labels):
        raise _corrupt(hnsw_path, "duplicate labels in the graph")
    if len(layout.labels) and int(layout.labels.max()) >= header.next_label:
        raise _corrupt(hnsw_path, "a graph label is beyond the snapshot's next label")
    if len(live) != len(doc_labels) or not np.array_equal(
        np.sort(live.astype(np.int64)), np.sort(doc_labels)
    ):
        raise _corrupt(meta_path, "the id map and the graph's live labels differ")
    vectors = None
    if not state.docs and vectors_up_to >= 0:
        vectors = np.empty((0, dim), np.float32)
    elif len(state.docs) <= vectors_up_to:
        row_of = {int(label): row for row, label in enumerate(layout.labels)}
        rows = np.fromiter((row_of[doc[1]] for doc in state.docs), dtype=np.int64)
        size_per = 4 + 8 * m + 4 * dim + 8
        with (
            hnsw_path.open("rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm,
        ):
            view = np.ndarray(
                (header.elements, dim),
                "<f4",
                buffer=mm,
                offset=_HNSW_HEADER.size + 4 + 8 * m,
                strides=(size_per, 4),
            )
            vectors = np.array(view[rows], dtype=np.float32)
            del view
    return state, header.elements, vectors


def load_snapshot(
    directory: Path, gen: int, *, dim: int, m: int, capacity: int, vectors_up_to: int = -1
) -> LoadedSnapshot:
    """Validate generation ``gen`` fully, then hand the graph to hnswlib.

    ``capacity`` is the slot count to allocate (raised to the file's element count), so a
    crafted max_elements inside the file never decides the allocation. Raises IndexCorrupt.
    """
    state, elements, vectors = validate_snapshot(
        directory, gen, dim=dim, m=m, vectors_up_to=vectors_up_to
    )
    hnsw_path, _ = snapshot_paths(directory, gen)
    import hnswlib  # when a collection first loads a graph (index/memory.py says why)

    index = hnswlib.Index(space="ip", dim=dim)
    try:
        index.load_index(
            str(hnsw_path), max_elements=max(capacity, elements), allow_replace_deleted=True
        )
    except (RuntimeError, MemoryError) as exc:
        raise _corrupt(hnsw_path, f"hnswlib refused it ({exc})") from exc
    return LoadedSnapshot(index=index, state=state, elements=elements, vectors=vectors)
