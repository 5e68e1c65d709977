"""The write-ahead log: append-only segments of length + CRC32 framed msgpack records.

A segment is ``wal-<base lsn, 20 digits>.log``::

    header  magic "EAWAL\\0\\r\\n" (8) | version u32 | info length u32 | info crc32 u32 | info
            (info: msgpack map with base_lsn, dim, fingerprint, m, ef_construction, so a
            segment identifies its collection even if the manifest is lost)
    record  magic E4 57 A1 1D (4) | length u32 | crc32 u32 | payload (msgpack [lsn, ops])

The CRC covers the length field and the payload. The record magic lets a scan resynchronise
after a bad record: a valid record further on means the damage is in the middle of the log
(refuse to start: data after it is acknowledged), none means a torn tail (truncate, log).
All integers are little-endian.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ..errors import EdgeAgentError, IndexCorrupt
from .fsutil import (
    DISK_FULL_ERRNOS,
    TMP_SUFFIX,
    describe_error,
    fsync_dir,
    fsync_fd,
    index_full,
)

__all__ = [
    "MAX_RECORD",
    "SegmentReader",
    "WalProblem",
    "WalWriter",
    "create_segment",
    "encode_record",
    "segment_base",
    "segment_name",
    "truncate_segment",
]

log = logging.getLogger("edge_agent.index.wal")

SEGMENT_MAGIC = b"EAWAL\x00\r\n"
SEGMENT_VERSION = 1
_SEGMENT_HEADER = struct.Struct("<8sIII")
RECORD_MAGIC = b"\xe4\x57\xa1\x1d"
RECORD_HEADER = struct.Struct("<4sII")
MAX_RECORD = 256 << 20
MAX_SEGMENT_INFO = 1 << 16
# Candidate records checked while looking past a bad one; past this we call it corruption
# (refusing to start is the safe answer, and a crafted file cannot make the scan quadratic).
_MAX_RESYNC_CANDIDATES = 10_000


def segment_name(base_lsn: int) -> str:
    return f"wal-{base_lsn:020d}.log"


def segment_base(name: str) -> int | None:
    """The base LSN in a segment file name, or None for any other name."""
    if not (name.startswith("wal-") and name.endswith(".log")) or len(name) != 28:
        return None
    digits = name[4:24]
    return int(digits) if digits.isdigit() else None


def _crc(length: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<I", length)))


def encode_record(payload: bytes) -> bytes:
    return RECORD_HEADER.pack(RECORD_MAGIC, len(payload), _crc(len(payload), payload)) + payload


def create_segment(directory: Path, base_lsn: int, info: dict[str, Any]) -> Path:
    """Create a segment atomically (temp, fsync, rename, dir fsync): never a half header."""
    info = {**info, "base_lsn": base_lsn}
    packed = msgpack.packb(info, use_bin_type=True)
    header = _SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, len(packed), zlib.crc32(packed))
    path = directory / segment_name(base_lsn)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(header + packed)
            while view:
                view = view[os.write(fd, view) :]
            fsync_fd(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # A half-written temp file would hold space on a full disk until the next open.
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return path


@dataclass(frozen=True)
class WalProblem:
    """A bad record: ``torn`` (nothing valid after it) or ``corrupt`` (valid records follow)."""

    kind: str  # "torn" | "corrupt"
    offset: int  # where the bad bytes start
    detail: str
    resume_offset: int | None = None  # the next valid record, for "corrupt"


class SegmentReader:
    """Reads one segment: header first (``info``), then ``records()``.

    After ``records()`` is exhausted, ``end`` is the offset just past the last good record and
    ``problem`` says why the scan stopped early (None at a clean end of file).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base_lsn = segment_base(path.name)
        self.problem: WalProblem | None = None
        self._file = path.open("rb")
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self._mm: mmap.mmap | None = (
                mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
            )
            self.info = self._read_header()
        except BaseException:
            self.close()
            raise
        self.end = self.header_size

    def _corrupt(self, detail: str) -> IndexCorrupt:
        return IndexCorrupt(f"WAL segment {self.path}: {detail}", path=str(self.path))

    def _read_header(self) -> dict[str, Any]:
        mm = self._mm
        if mm is None or self.size < _SEGMENT_HEADER.size:
            raise self._corrupt(f"{self.size} bytes, shorter than the segment header")
        magic, version, info_len, info_crc = _SEGMENT_HEADER.unpack_from(mm, 0)
        if magic != SEGMENT_MAGIC:
            raise self._corrupt("not a WAL segment (bad magic)")
        if version != SEGMENT_VERSION:
            raise self._corrupt(f"segment version {version} is not {SEGMENT_VERSION}")
        if info_len > MAX_SEGMENT_INFO or _SEGMENT_HEADER.size + info_len > self.size:
            raise self._corrupt(f"segment info length {info_len} is out of range")
        raw = mm[_SEGMENT_HEADER.size : _SEGMENT_HEADER.size + info_len]
        if zlib.crc32(raw) != info_crc:
            raise self._corrupt("segment header checksum mismatch")
        try:
            info = msgpack.unpackb(raw, raw=False)
        except Exception as exc:
            raise self._corrupt(f"segment info does not decode ({exc})") from exc
        if not isinstance(info, dict) or info.get("base_lsn") != self.base_lsn:
            named = info.get("base_lsn") if isinstance(info, dict) else None
            raise self._corrupt(f"segment info names base LSN {named!r}, the file {self.base_lsn}")
        self.header_size = _SEGMENT_HEADER.size + info_len
        return info

    def _map(self) -> mmap.mmap:
        if self._mm is None:  # only after close(): the header check rejects empty files
            raise ValueError(f"{self.path} is closed")
        return self._mm

    def _record_at(self, offset: int) -> tuple[bytes | None, str]:
        """The payload of a valid record at ``offset``, or None and why not."""
        mm = self._map()
        if self.size - offset < RECORD_HEADER.size:
            return None, f"{self.size - offset} bytes left, shorter than a record header"
        magic, length, crc = RECORD_HEADER.unpack_from(mm, offset)
        if magic != RECORD_MAGIC:
            return None, "bad record magic"
        if length > MAX_RECORD:
            return None, f"record length {length} is over the limit"
        start = offset + RECORD_HEADER.size
        if start + length > self.size:
            return None, f"record of {length} bytes runs past the end of the file"
        payload = mm[start : start + length]
        if _crc(length, payload) != crc:
            return None, "record checksum mismatch"
        return payload, ""

    def _next_valid(self, after: int) -> int | None:
        mm = self._map()
        position = after + 1
        for _ in range(_MAX_RESYNC_CANDIDATES):
            found = mm.find(RECORD_MAGIC, position)
            if found < 0:
                return None
            payload, _why = self._record_at(found)
            if payload is not None:
                return found
            position = found + 1
        return position  # too many look-alikes: treat as corrupt, not as a torn tail

    def records(self, start: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(offset, payload) of each valid record from ``start`` until the first bad one."""
        offset = self.header_size if start is None else start
        self.problem = None
        while offset < self.size:
            payload, why = self._record_at(offset)
            if payload is None:
                following = self._next_valid(offset)
                kind = "torn" if following is None else "corrupt"
                self.problem = WalProblem(kind, offset, why, following)
                self.end = offset
                return
            yield offset, payload
            offset += RECORD_HEADER.size + len(payload)
            self.end = offset
        self.end = offset

    def close(self) -> None:
        if getattr(self, "_mm", None) is not None:
            self._mm.close()  # type: ignore[union-attr]
            self._mm = None
        self._file.close()

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def truncate_segment(path: Path, size: int) -> None:
    """Cut a torn tail off (and make the cut durable)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        fsync_fd(fd)
    finally:
        os.close(fd)


class WalWriter:
    """Appends records to one segment with the configured fsync policy.

    Records go straight to the kernel with os.write (no user-space buffer), so an
    acknowledged record survives the process being killed under every policy; the policy only
    decides when it reaches stable storage (power loss).
    """

    def __init__(self, path: Path, policy: str, window_s: float) -> None:
        self.path = path
        self.policy = policy
        self.window_s = window_s
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.size = os.fstat(self._fd).st_size
        self._cond = threading.Condition(threading.Lock())
        self._dirty_since: float | None = None
        self._closing = False
        self._sync_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if policy == "batch":
            self._thread = threading.Thread(
                target=self._sync_loop, name="edge-agent-wal-sync", daemon=True
            )
            self._thread.start()

    def append(self, record: bytes) -> None:
        """Write one framed record; with policy "always", fsync before returning.

        On failure the segment is cut back to its previous size, so a half-written record can
        never sit in the middle of the log once later appends succeed.
        """
        if self._sync_error is not None:
            where = f"{self.path.parent.name}/{self.path.name}"
            raise EdgeAgentError(
                f"WAL {where}: an earlier write or fsync failed"
                f" ({describe_error(self._sync_error)}); reopen the collection"
            )
        before = self.size
        try:
            view = memoryview(record)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.policy == "always":
                fsync_fd(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, before)
            except OSError:
                # The log may now hold a partial record: no later append may follow it.
                self._sync_error = exc
            # Named relative to the index root (collection/segment): the message reaches
            # clients, which must not learn server paths.
            where = f"{self.path.parent.name}/{self.path.name}"
            if exc.errno in DISK_FULL_ERRNOS:
                raise index_full(exc, f"append to the WAL {where}") from exc
            raise EdgeAgentError(
                f"cannot write the WAL {where}: {describe_error(exc)}", segment=where
            ) from exc
        self.size = before + len(record)
        if self.policy == "batch":
            with self._cond:
                if self._dirty_since is None:
                    self._dirty_since = time.monotonic()
                    self._cond.notify_all()

    def sync(self) -> None:
        with self._cond:
            self._dirty_since = None
        fsync_fd(self._fd)

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                while self._dirty_since is None and not self._closing:
                    self._cond.wait()
                if self._dirty_since is None:
                    return
                deadline = self._dirty_since + self.window_s
                while not self._closing and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                self._dirty_since = None
            try:
                fsync_fd(self._fd)
            except OSError as exc:  # surfaced by the next append
                log.error("WAL fsync failed for %s: %s", self.path, exc)
                self._sync_error = exc
                return

    def close(self, sync: bool = True) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        try:
            if sync:
                fsync_fd(self._fd)
        finally:
            os.close(self._fd)
