"""The state a Collection is made of, and what its parts share.

``Collection`` (collection.py: lifecycle, writes, reads) is this state plus the mixins that
work on it: ``recovering`` (open-time recovery, the keyword index kept in step with the
documents), ``snapshotting`` (snapshots, WAL rotation, compaction), ``searching`` (dense,
keyword and hybrid search) and ``reindexing`` (re-embedding for a new model). The locks and
their order are described in collection.py.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from ..errors import EdgeAgentError, IndexBusy, InvalidArgument, ModelMismatch
from .config import IndexConfig
from .fingerprint import ModelFingerprint
from .keywords import KeywordIndex
from .manifest import CollectionManifest
from .memory import Memory
from .rwlock import RWLock
from .wal import WalWriter

__all__ = [
    "LOCK_NAME",
    "MAX_K",
    "REINDEX_DIR",
    "CollectionState",
    "CollectionStats",
    "ReindexReport",
    "lock_directory",
    "segment_info",
]

LOCK_NAME = "LOCK"
REINDEX_DIR = "reindex"
MAX_K = 10_000
_CORRUPT_SUFFIX = ".corrupt"


def lock_directory(path: Path, *, shared: bool = False) -> int:
    """Take the collection's advisory lock (released when the fd closes or the process dies,
    SIGKILL included). Raises IndexBusy if another holder has it."""
    import fcntl

    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise IndexBusy(
            f"collection {path} is open elsewhere (another edge-agent process or handle)",
            path=str(path),
        ) from exc
    return fd


@dataclass(frozen=True)
class CollectionStats:
    name: str
    count: int
    dim: int
    fingerprint: dict[str, Any]
    elements: int  # graph slots in use, deleted ones included
    capacity: int
    deleted_slots: int
    lsn: int
    snapshot_gen: int | None
    snapshot_lsn: int
    wal_records: int  # since the newest snapshot
    wal_bytes: int
    disk_bytes: int
    exact_search: bool
    fsync: str
    reindex_pending: bool
    snapshot_running: bool = False  # a background snapshot is being written
    snapshot_error: str | None = None  # why the last background snapshot failed, if it did


@dataclass(frozen=True)
class ReindexReport:
    embedded: int  # documents embedded by this call
    reused: int  # already in the new index (a resumed reindex)
    removed: int  # deleted from the new index because they left the collection meanwhile
    seconds: float
    fingerprint: dict[str, Any]


def segment_info(manifest: CollectionManifest) -> dict[str, Any]:
    """What each WAL segment header records, so any segment identifies its collection."""
    return {
        "name": manifest.name,
        "dim": manifest.dim,
        "fingerprint": manifest.fingerprint.to_json(),
        "m": manifest.m,
        "ef_construction": manifest.ef_construction,
    }


def _check_k(k: object) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise InvalidArgument(f"k must be an integer in [1, {MAX_K}], got {k!r:.40}")


class CollectionState:
    """The fields of a Collection and the checks every part makes."""

    def __init__(self, path: Path, config: IndexConfig, manifest: CollectionManifest) -> None:
        # Use open() / create(): this only sets fields.
        self.path = path
        self.config = config
        self._manifest = manifest
        self._writer = threading.Lock()
        self._rw = RWLock()
        self._lock_fd: int | None = None
        self._memory: Memory | None = None
        self._wal: WalWriter | None = None
        self._lsn = 0
        self._wal_records = 0
        self._wal_bytes = 0
        self._failed: BaseException | None = None
        self._closed = False
        self._closing = False  # set by close(): no new background snapshot starts
        self._snap_lock = threading.Lock()
        self._snap_thread: threading.Thread | None = None
        self._snap_error: str | None = None
        self._snap_retry_at = 0.0
        # BM25 over the documents' texts (keywords.py): derived from the WAL like the graph.
        self._keywords: KeywordIndex | None = None
        self._keyword_error: str | None = None
        self._text_docs = 0  # live documents stored with a text (keyword search needs some)

    @property
    def name(self) -> str:
        return self._manifest.name

    @property
    def fingerprint(self) -> ModelFingerprint:
        return self._manifest.fingerprint

    @property
    def dim(self) -> int:
        return self._manifest.dim

    @property
    def lsn(self) -> int:
        """LSN of the last acknowledged write."""
        return self._lsn

    @property
    def snapshot_error(self) -> str | None:
        """Why the last snapshot failed (no file paths in it), or None if it succeeded."""
        return self._snap_error

    @property
    def keyword_error(self) -> str | None:
        """Why the keyword index is behind the documents, or None."""
        return self._keyword_error

    @property
    def has_text(self) -> bool:
        """Whether any live document was stored with its text (keyword search needs it)."""
        return self._text_docs > 0

    def _mem(self) -> Memory:
        if self._closed or self._memory is None:
            raise InvalidArgument(f"collection {self.path.name!r} is closed")
        return self._memory

    def _check_model(self, fingerprint: ModelFingerprint) -> None:
        if not isinstance(fingerprint, ModelFingerprint):
            raise InvalidArgument("fingerprint must be a ModelFingerprint")
        mine = self._manifest.fingerprint
        if fingerprint != mine:
            raise ModelMismatch(
                f"collection {self.name!r} holds vectors of {mine.describe()}, not"
                f" {fingerprint.describe()} ({'; '.join(mine.differences(fingerprint))}):"
                " use the same model, or reindex the collection with the new one",
                collection=self.name,
                expected=mine.to_json(),
            )

    def _check_writable(self) -> None:
        self._mem()
        if self._failed is not None:
            raise EdgeAgentError(
                f"collection {self.name!r} stopped accepting writes after an error"
                f" ({self._failed}); reopen it (the WAL has every acknowledged write)"
            )

    def _keyword_file(self) -> KeywordIndex:
        keywords = self._keywords
        if keywords is None:
            raise InvalidArgument(f"collection {self.name!r} is closed")
        return keywords

    if TYPE_CHECKING:
        # What one mixin calls on another; Collection has them all.
        @classmethod
        def open(cls, path: Path, config: IndexConfig | None = None) -> Self: ...
        @classmethod
        def create(
            cls,
            path: Path,
            fingerprint: ModelFingerprint,
            config: IndexConfig | None = None,
            *,
            name: str | None = None,
        ) -> Self: ...
        def close(self) -> None: ...
        def upsert(
            self,
            fingerprint: ModelFingerprint,
            ids: Sequence[str],
            vectors: np.ndarray,
            texts: Sequence[str | None] | None = None,
            metadata: Sequence[Mapping[str, Any] | None] | None = None,
        ) -> int: ...
        def delete(self, ids: Sequence[str]) -> int: ...
        def count(self) -> int: ...
        def _remove_strays(self, *, at_open: bool = False) -> None: ...
        def _open_keywords(
            self, *, base_lsn: int, base_next_label: int, replayed: bool
        ) -> None: ...
        def _keyword_index(self) -> KeywordIndex: ...
        def _next_gen(self) -> int: ...
        def _snapshot_locked(self, *, force: bool) -> int | None: ...
