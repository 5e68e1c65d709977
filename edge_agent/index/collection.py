"""A named, persistent collection of documents pinned to one embedding model.

Durability: every write is one WAL record (so a batch is all-or-nothing), appended and synced
per the fsync policy before it is applied in memory and acknowledged. Snapshots of the graph
and id map bound recovery time; the manifest pins them and the WAL position. See docs/index.md.

Concurrency: any number of searches run at once; writers are serialised (``_writer``) and
hold the readers-writer lock exclusively only while they change memory, so the WAL fsync and
snapshot writing never block searches. Snapshots run in a background thread by default:
writers wait only while the graph is copied and while the manifest is committed.

Lock order: ``_snap_lock`` (one snapshot at a time) before ``_writer`` before ``_rw``. Every
change to memory holds ``_writer``, so holding it is enough for a consistent graph copy.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from ..errors import (
    CollectionExists,
    CollectionNotFound,
    DocumentExists,
    EdgeAgentError,
    IndexBusy,
    IndexCorrupt,
    IndexFull,
    InvalidArgument,
    ModelMismatch,
)
from ..progress import Progress
from .config import IndexConfig
from .documents import (
    Delete,
    Document,
    Hit,
    Put,
    encode_payload,
    normalize_vectors,
    validate_id,
    validate_metadata,
    validate_text,
)
from .filters import Filter, Selection, compile_filter
from .filters import select as select_where
from .fingerprint import ModelFingerprint
from .fsutil import (
    DISK_FULL_ERRNOS,
    TMP_SUFFIX,
    describe_error,
    disk_full,
    fsync_dir,
    index_full,
)
from .fusion import DEFAULT_FUSION, DEFAULT_WEIGHT, FUSIONS, fuse
from .keywords import FILENAME as KEYWORDS_FILE
from .keywords import KeywordIndex
from .manifest import MANIFEST_NAME, CollectionManifest, SnapshotRef, validate_collection_name
from .memory import Memory, StoredDoc
from .recovery import list_segments, repair_hint, replay_wal
from .rwlock import RWLock
from .snapshot import (
    GraphCopy,
    GraphFile,
    GraphSource,
    SnapshotState,
    graph_bytes,
    load_snapshot,
    snapshot_gen,
    snapshot_paths,
    write_snapshot,
)
from .wal import MAX_RECORD, WalWriter, create_segment, encode_record, segment_name

__all__ = ["Collection", "CollectionStats", "ReindexReport", "lock_directory", "segment_info"]

log = logging.getLogger("edge_agent.index")

LOCK_NAME = "LOCK"
REINDEX_DIR = "reindex"
MAX_K = 10_000
_CORRUPT_SUFFIX = ".corrupt"
# After a failed background snapshot (disk full, I/O error) the next try waits this long, so
# a persistent failure does not turn into a snapshot attempt after every write.
SNAPSHOT_RETRY_S = 10.0


class _QuietProgress:
    """Progress's interface, saying nothing (reindex with show_progress=False)."""

    def __enter__(self) -> _QuietProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, amount: float = 1, detail: str = "") -> None:
        return None


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


@dataclass
class _SnapshotJob:
    """A snapshot between its capture (writers held) and its manifest commit."""

    gen: int
    lsn: int
    next_label: int
    fingerprint: dict[str, Any]
    # A shallow copy of the id map: StoredDoc objects are replaced, never changed in place,
    # so this is the state at ``lsn`` (the list of entries is built after the capture).
    docs: dict[str, StoredDoc]
    graph: GraphSource  # the live index (writers held throughout) or a private copy / dump
    dim: int
    records: int  # WAL records and bytes counted up to the capture: the snapshot covers them
    bytes: int
    old_wal: WalWriter | None  # the segment rotated away from, still to close (and sync)

    def state(self) -> SnapshotState:
        docs = [(doc_id, d.label, d.text, d.metadata) for doc_id, d in self.docs.items()]
        return SnapshotState(self.lsn, self.next_label, self.fingerprint, docs)

    def release(self) -> None:
        if isinstance(self.graph, GraphFile):
            self.graph.discard()


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


class Collection:
    """Open with :meth:`open` or :meth:`create`; close (or use ``with``) to release the lock."""

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

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        fingerprint: ModelFingerprint,
        config: IndexConfig | None = None,
        *,
        name: str | None = None,
    ) -> Collection:
        """A new, empty collection at ``path`` (created atomically: a crash leaves nothing)."""
        config = config or IndexConfig()
        path = Path(path)
        name = validate_collection_name(name or path.name)
        if not isinstance(fingerprint, ModelFingerprint):
            raise InvalidArgument("fingerprint must be a ModelFingerprint")
        if path.exists():
            raise CollectionExists(f"collection {name!r} already exists", name=name)
        with disk_full(f"create collection {name!r}"):
            return cls._create(path, name, fingerprint, config)

    @classmethod
    def _create(
        cls, path: Path, name: str, fingerprint: ModelFingerprint, config: IndexConfig
    ) -> Collection:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
        tmp.mkdir()
        try:
            manifest = CollectionManifest(
                name=name,
                fingerprint=fingerprint,
                dim=fingerprint.vector_dims,
                m=config.m,
                ef_construction=config.ef_construction,
                created=time.time(),
            )
            manifest.save(tmp)
            create_segment(tmp, 1, segment_info(manifest))
            try:
                os.rename(tmp, path)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise  # e.g. a full disk (a directory entry needs room too)
                # Another creator won the race.
                raise CollectionExists(f"collection {name!r} already exists", name=name) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(path.parent)
        return cls.open(path, config)

    @classmethod
    def open(cls, path: Path, config: IndexConfig | None = None) -> Collection:
        """Load the newest valid snapshot and replay the WAL after it.

        A torn WAL tail is cut off and logged. A corrupt newest snapshot falls back to the
        previous one plus the WAL (nothing lost), and is kept aside as ``*.corrupt``. Any
        other damage raises IndexCorrupt naming `edge-agent index check|repair`.
        """
        config = config or IndexConfig()
        path = Path(path)
        if not path.is_dir():
            raise CollectionNotFound(f"no collection at {path}", path=str(path))
        lock_fd = lock_directory(path)
        try:
            manifest = CollectionManifest.load(path)
            self = cls(path, config, manifest)
            self._lock_fd = lock_fd
            # Recovery may write: a torn tail's cut, a new WAL segment, a fresh snapshot.
            with disk_full(f"open collection {manifest.name!r}"):
                self._recover()
        except BaseException:
            os.close(lock_fd)
            raise
        return self

    def close(self) -> None:
        """Wait for a background snapshot, snapshot if configured and the WAL has news, sync,
        release the lock."""
        with self._writer:
            if self._closed:
                return
            self._closing = True
            thread = self._snap_thread
        if thread is not None:
            thread.join()  # outside _writer: the snapshot needs it to commit
        with self._snap_lock, self._writer:
            if self._closed:
                return
            try:
                if (
                    self.config.snapshot_on_close
                    and self._failed is None
                    and self._wal_records
                    and self._wal is not None
                ):
                    try:
                        self._snapshot_locked(force=False)
                    except Exception as exc:
                        # Nothing is lost: the WAL holds every acknowledged write and the next
                        # open replays it. Closing must still succeed (a daemon stopping on a
                        # full disk), so this is one log line, not an exception.
                        self._snapshot_failed(exc)
                        log.error(
                            "%s: snapshot on close failed (%s); nothing is lost, the WAL holds"
                            " every acknowledged write and is replayed at the next open",
                            self.path,
                            describe_error(exc),
                        )
            finally:
                self._closed = True
                wal, self._wal = self._wal, None
                try:
                    if wal is not None:
                        # Raises if the final fsync fails (writes under fsync "batch"/"off"
                        # may not be durable): the caller must hear of that.
                        wal.close(sync=True)
                finally:
                    keywords, self._keywords = self._keywords, None
                    if keywords is not None:
                        keywords.close()
                    if self._lock_fd is not None:
                        os.close(self._lock_fd)
                        self._lock_fd = None

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recovery --------------------------------------------------------------------------------

    def _remove_strays(self, *, at_open: bool = False) -> None:
        """Temp files of interrupted writes, and snapshots/segments the manifest no longer
        needs. Only names we create are touched."""
        keep_gens = {ref.gen for ref in self._manifest.snapshots}
        for entry in self.path.iterdir():
            name = entry.name
            if entry.is_dir():
                continue
            if name.endswith(TMP_SUFFIX):
                log.warning("%s: removing %s left by an interrupted write", self.path, name)
                entry.unlink(missing_ok=True)
            elif (gen := snapshot_gen(name)) is not None and gen not in keep_gens:
                entry.unlink(missing_ok=True)
        for base, segment in list_segments(self.path):
            if base < self._manifest.wal_from:
                segment.unlink(missing_ok=True)
        shadow = self.path / REINDEX_DIR
        if at_open and (shadow / MANIFEST_NAME).is_file():
            try:
                done = CollectionManifest.load(shadow).fingerprint == self._manifest.fingerprint
            except IndexCorrupt:
                done = False
            if done:  # a reindex committed but its cleanup was cut short
                shutil.rmtree(shadow, ignore_errors=True)

    def _recover(self) -> None:
        manifest = self._manifest
        config = self.config
        self._remove_strays(at_open=True)
        failures: list[str] = []
        memory: Memory | None = None
        replay = None
        used: SnapshotRef | None = None
        base_next_label = 0
        for base in manifest.bases():
            # The WAL is read first: its damage cannot be fixed by an older snapshot.
            replay = replay_wal(self.path, manifest, base.lsn if base else 0, fix=True)
            if base is None:
                memory = Memory.empty(
                    manifest.dim,
                    m=manifest.m,
                    ef_construction=manifest.ef_construction,
                    capacity=config.initial_capacity,
                    threads=config.threads,
                    exact_max=config.exact_limit(manifest.dim),
                )
                break
            try:
                loaded = load_snapshot(
                    self.path,
                    base.gen,
                    dim=manifest.dim,
                    m=manifest.m,
                    capacity=config.initial_capacity,
                    vectors_up_to=config.exact_limit(manifest.dim),
                )
            except IndexCorrupt as exc:
                failures.append(exc.message)
                log.error("%s: snapshot %d unusable: %s", self.path, base.gen, exc.message)
                continue
            if loaded.state.lsn != base.lsn or loaded.state.fingerprint != (
                manifest.fingerprint.to_json()
            ):
                failures.append(f"snapshot {base.gen} disagrees with the manifest (lsn/model)")
                continue
            memory = Memory(
                loaded.index,
                manifest.dim,
                next_label=loaded.state.next_label,
                threads=config.threads,
                exact_max=config.exact_limit(manifest.dim),
            )
            memory.load_docs(loaded.state.docs, loaded.vectors)
            used = base
            base_next_label = loaded.state.next_label
            break
        if memory is None or replay is None:
            raise IndexCorrupt(
                f"collection {self.path}: no usable snapshot ({'; '.join(failures)});"
                f" {repair_hint(self.path)}",
                path=str(self.path),
            )
        memory.index.set_ef(config.ef_search)
        memory.index.set_num_threads(config.threads)
        puts = [op for op in replay.final.values() if op is not None]
        for doc_id, op in replay.final.items():
            if op is None:
                memory.remove(doc_id)
        if puts:
            memory.put_many(
                [p.id for p in puts],
                np.stack([p.vector for p in puts]),
                [p.text for p in puts],
                [p.metadata for p in puts],
            )
        memory.after_deletes()
        self._memory = memory
        self._lsn = replay.last_lsn
        self._open_keywords(
            base_lsn=used.lsn if used is not None else 0,
            base_next_label=base_next_label,
            replayed=bool(replay.final),
        )
        newest = manifest.snapshots[0] if manifest.snapshots else None
        fell_back = newest is not None and used != newest
        # Records after the newest snapshot count toward the next one.
        newest_lsn = newest.lsn if newest else 0
        self._wal_records = max(0, replay.last_lsn - newest_lsn)
        self._wal_bytes = replay.bytes if not fell_back else 0
        segments = list_segments(self.path)
        last = segments[-1] if segments else None
        if replay.stale_last_segment is not None or last is None or last[0] > self._lsn + 1:
            path = create_segment(self.path, self._lsn + 1, segment_info(manifest))
        else:
            path = last[1]
        self._wal = WalWriter(path, config.fsync, config.batch_window_ms / 1000)
        if fell_back:
            for ref in manifest.snapshots:
                if ref == used:
                    break
                for file in snapshot_paths(self.path, ref.gen):
                    if file.exists():
                        file.rename(file.with_name(file.name + _CORRUPT_SUFFIX))
            log.warning(
                "%s: recovered from an older snapshot and the WAL (nothing lost); writing a"
                " fresh snapshot",
                self.path,
            )
            with self._snap_lock, self._writer:
                self._snapshot_locked(force=True)

    # -- the keyword index -----------------------------------------------------------------------

    def _keyword_owner(self, manifest: CollectionManifest) -> str:
        """Names the label space: a reindex gives out new labels, so a keyword file written
        before it must not be trusted after it."""
        return json.dumps([manifest.created, manifest.fingerprint.to_json()], sort_keys=True)

    def _open_keywords(self, *, base_lsn: int, base_next_label: int, replayed: bool) -> None:
        """Open the keyword file and bring it to this collection's state: nothing to do after
        a clean close; after a crash the documents the WAL replayed (whose labels may differ
        from before) are rewritten, and a missing, foreign or stale file is rebuilt."""
        keywords = KeywordIndex(
            self.path / KEYWORDS_FILE, owner=self._keyword_owner(self._manifest)
        )
        self._keywords = keywords
        self._text_docs = sum(1 for doc in self._mem().docs.values() if doc.text)
        if not replayed and keywords.applied_lsn == self._lsn:
            return
        try:
            self._reconcile_keywords(
                base_lsn=base_lsn if keywords.applied_lsn <= self._lsn else 0,
                base_next_label=base_next_label,
            )
        except EdgeAgentError as exc:
            # A full disk must not keep the collection from opening (its vectors and WAL are
            # fine): keyword search retries the rebuild, and says why while it cannot.
            self._keyword_error = exc.message
            log.error("%s: keyword index not brought up to date: %s", self.path, exc.message)

    def _reconcile_keywords(self, *, base_lsn: int = 0, base_next_label: int = 0) -> None:
        keywords = self._keyword_file()
        memory = self._mem()
        started = time.perf_counter()
        written, deleted = keywords.reconcile(
            {doc.label: doc.text for doc in memory.docs.values()},
            lsn=self._lsn,
            base_lsn=base_lsn,
            base_next_label=base_next_label,
        )
        self._keyword_error = None
        log.info(
            "%s: keyword index brought to lsn %d (%d rows written, %d removed, %.2fs)",
            self.path,
            self._lsn,
            written,
            deleted,
            time.perf_counter() - started,
        )

    def _apply_keywords(
        self, upserts: list[tuple[int, str | None]], deletes: list[int], lsn: int
    ) -> None:
        """Mirror one acknowledged write into the keyword index. The WAL already holds the
        write, so a failure here (a full disk) is logged and reported by ``keyword_error``;
        the next open rebuilds what is missing."""
        keywords = self._keywords
        if keywords is None or self._keyword_error is not None:
            return  # behind already: the next keyword search rebuilds it whole
        try:
            keywords.apply(upserts=upserts, deletes=deletes, lsn=lsn)
        except Exception as exc:
            if self._keyword_error is None:
                log.error(
                    "%s: keyword index update failed (%s); keyword search misses the newest"
                    " documents until the collection is reopened",
                    self.path,
                    describe_error(exc),
                )
            self._keyword_error = describe_error(exc)

    @property
    def keyword_error(self) -> str | None:
        """Why the keyword index is behind the documents, or None."""
        return self._keyword_error

    # -- properties ------------------------------------------------------------------------------

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

    # -- writes ----------------------------------------------------------------------------------

    def add(
        self,
        fingerprint: ModelFingerprint,
        ids: Sequence[str],
        vectors: np.ndarray,
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> int:
        """Insert new documents (DocumentExists if an id is stored); all or none. The LSN."""
        return self._put(fingerprint, ids, vectors, texts, metadata, replace=False)

    def upsert(
        self,
        fingerprint: ModelFingerprint,
        ids: Sequence[str],
        vectors: np.ndarray,
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> int:
        """Insert or replace by id; all or none. Returns the write's LSN."""
        return self._put(fingerprint, ids, vectors, texts, metadata, replace=True)

    def _validate_batch(
        self,
        ids: Sequence[str],
        texts: Sequence[str | None] | None,
        metadata: Sequence[Mapping[str, Any] | None] | None,
    ) -> tuple[list[str], list[str | None], list[dict[str, Any]]]:
        config = self.config
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidArgument("ids must be a list of strings")
        if not ids:
            raise InvalidArgument("ids must not be empty")
        if len(ids) > config.max_batch:
            raise InvalidArgument(
                f"{len(ids)} documents in one write; the limit is {config.max_batch}",
                limit=config.max_batch,
            )
        checked = [validate_id(doc_id, config, f"ids[{i}]") for i, doc_id in enumerate(ids)]
        if len(set(checked)) != len(checked):
            raise InvalidArgument("ids repeat within one write")
        for name, values in (("texts", texts), ("metadata", metadata)):
            if values is not None and (
                isinstance(values, (str, bytes, Mapping))
                or not isinstance(values, Sequence)
                or len(values) != len(checked)
            ):
                raise InvalidArgument(f"{name} must be a list with one entry per id")
        text_list = [
            validate_text(t, config, f"texts[{i}]")
            for i, t in enumerate(texts or [None] * len(ids))
        ]
        meta_list = [
            validate_metadata(m, config, f"metadata[{i}]")
            for i, m in enumerate(metadata or [None] * len(ids))
        ]
        return checked, text_list, meta_list

    def _put(
        self,
        fingerprint: ModelFingerprint,
        ids: Sequence[str],
        vectors: np.ndarray,
        texts: Sequence[str | None] | None,
        metadata: Sequence[Mapping[str, Any] | None] | None,
        *,
        replace: bool,
    ) -> int:
        self._check_model(fingerprint)
        id_list, text_list, meta_list = self._validate_batch(ids, texts, metadata)
        rows = normalize_vectors(vectors, self.dim, len(id_list))
        ops = [Put(doc_id, rows[i], text_list[i], meta_list[i]) for i, doc_id in enumerate(id_list)]
        with self._writer:
            self._check_writable()
            memory = self._mem()
            replacing = sum(1 for doc_id in id_list if doc_id in memory.docs)
            if replacing and not replace:
                existing = next(doc_id for doc_id in id_list if doc_id in memory.docs)
                raise DocumentExists(
                    f"document {existing!r} is already in {self.name!r} (upsert replaces)",
                    id=existing,
                )
            live_after = len(memory.docs) + len(id_list) - replacing
            if live_after > self.config.max_vectors:
                raise IndexFull(
                    f"collection {self.name!r} would hold {live_after} documents; the limit is"
                    f" {self.config.max_vectors}",
                    limit=self.config.max_vectors,
                    reason="max_vectors",
                )
            slots = memory.slots_needed(len(id_list), replacing)
            if slots > memory.capacity:
                with self._rw.write():
                    memory.reserve(slots)
            replaced = [memory.docs[doc_id] for doc_id in id_list if doc_id in memory.docs]
            old_labels = [doc.label for doc in replaced]
            lsn = self._commit(ops, lambda: self._apply_puts(memory, ops))
            self._text_docs += sum(1 for op in ops if op.text) - sum(
                1 for doc in replaced if doc.text
            )
            self._apply_keywords(
                [(memory.docs[op.id].label, op.text) for op in ops], old_labels, lsn
            )
            return lsn

    def delete(self, ids: Sequence[str]) -> int:
        """Delete by id (all or none); how many were stored. Unknown ids are ignored."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidArgument("ids must be a list of strings")
        if len(ids) > self.config.max_batch:
            raise InvalidArgument(
                f"{len(ids)} ids in one delete; the limit is {self.config.max_batch}",
                limit=self.config.max_batch,
            )
        checked = [validate_id(doc_id, self.config, f"ids[{i}]") for i, doc_id in enumerate(ids)]
        with self._writer:
            self._check_writable()
            memory = self._mem()
            present = [doc_id for doc_id in dict.fromkeys(checked) if doc_id in memory.docs]
            if not present:
                return 0
            ops = [Delete(doc_id) for doc_id in present]
            labels = [memory.docs[doc_id].label for doc_id in present]
            self._text_docs -= sum(1 for doc_id in present if memory.docs[doc_id].text)

            def apply() -> None:
                for doc_id in present:
                    memory.remove(doc_id)
                memory.after_deletes()

            lsn = self._commit(ops, apply)
            self._apply_keywords([], labels, lsn)
            return len(present)

    @staticmethod
    def _apply_puts(memory: Memory, ops: list[Put]) -> None:
        memory.put_many(
            [op.id for op in ops],
            np.stack([op.vector for op in ops]),
            [op.text for op in ops],
            [op.metadata for op in ops],
        )

    def _commit(self, ops: Sequence[Put | Delete], apply: Callable[[], None]) -> int:
        """WAL first (synced per policy), then memory; caller holds ``_writer``."""
        wal = self._wal
        if wal is None:
            raise EdgeAgentError(f"collection {self.name!r} has no open WAL; reopen it")
        lsn = self._lsn + 1
        payload = encode_payload(lsn, ops)
        if len(payload) > MAX_RECORD:
            raise InvalidArgument(
                f"one write of {len(payload)} bytes is over the {MAX_RECORD}-byte record limit:"
                " split the batch"
            )
        record = encode_record(payload)
        wal.append(record)
        try:
            with self._rw.write():
                apply()
                self._lsn = lsn
        except BaseException as exc:
            # Memory may be half-changed; the WAL has the write, so a reopen is exact.
            self._failed = exc
            raise
        self._wal_records += 1
        self._wal_bytes += len(record)
        if self._snapshot_due():
            if self.config.snapshot_in_background:
                self._request_snapshot()
            elif self._snap_lock.acquire(blocking=False):  # else one is running: next time
                try:
                    self._snapshot_locked(force=False)
                except Exception as exc:  # the write itself is durable: report, retry next time
                    self._snapshot_failed(exc)
                    log.error("%s: snapshot failed: %s", self.path, describe_error(exc))
                finally:
                    self._snap_lock.release()
        return lsn

    def flush(self) -> None:
        """Make every acknowledged write durable now, whatever the fsync policy."""
        with self._writer:
            if self._wal is not None:
                self._wal.sync()

    # -- snapshots and compaction ----------------------------------------------------------------

    def snapshot(self) -> int | None:
        """Write a snapshot now; its generation (None when nothing changed since the last).

        Returns once it is committed. Other writers wait only while the graph is copied and
        the manifest written, not for the snapshot files."""
        with self._snap_lock, self._snapshot_errors(f"snapshot collection {self.name!r}"):
            return self._run_snapshot(force=False, due_only=False)

    def wait_for_snapshot(self, timeout: float | None = None) -> bool:
        """Wait for the background snapshot in progress, if any; False if still running after
        ``timeout`` seconds."""
        thread = self._snap_thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _next_gen(self) -> int:
        gens = [ref.gen for ref in self._manifest.snapshots]
        gens += [g for p in self.path.iterdir() if (g := snapshot_gen(p.name)) is not None]
        return max(gens, default=0) + 1

    def _snapshot_due(self) -> bool:
        return (
            self._wal_records >= self.config.snapshot_wal_records
            or self._wal_bytes >= self.config.snapshot_wal_bytes
        )

    def _request_snapshot(self) -> None:
        """Start a background snapshot unless one runs or one failed lately. Holds _writer."""
        thread = self._snap_thread
        if self._closing or (thread is not None and thread.is_alive()):
            return
        if time.monotonic() < self._snap_retry_at:
            return
        thread = threading.Thread(
            target=self._background_snapshot, name=f"edge-agent-snapshot-{self.name}", daemon=True
        )
        self._snap_thread = thread
        thread.start()

    def _background_snapshot(self) -> None:
        try:
            with self._snap_lock:
                self._run_snapshot(force=False, due_only=True)
        except Exception as exc:
            # Every write is in the WAL, which stays the source of truth: report, retry later.
            self._snapshot_failed(exc)
            log.error(
                "%s: background snapshot failed (next try in %.0f s or more): %s",
                self.path,
                SNAPSHOT_RETRY_S,
                exc,
            )

    def _snapshot_failed(self, exc: BaseException) -> None:
        """Record why a snapshot failed (stats, the daemon's health) and hold off retries."""
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            exc = index_full(exc, f"snapshot collection {self.name!r}")  # say it as INDEX_FULL
        self._snap_error = describe_error(exc)
        self._snap_retry_at = time.monotonic() + SNAPSHOT_RETRY_S

    @contextmanager
    def _snapshot_errors(self, what: str) -> Iterator[None]:
        """For snapshot() and compact(): a failure is recorded like a background one, and a
        full disk is INDEX_FULL."""
        try:
            with disk_full(what):
                yield
        except InvalidArgument:
            raise  # a closed collection, not a failed snapshot
        except Exception as exc:
            self._snapshot_failed(exc)
            raise

    def _run_snapshot(self, *, force: bool, due_only: bool) -> int | None:
        """Capture with writers held, write the files with nothing held, commit the manifest
        with writers held. The caller holds ``_snap_lock``, not ``_writer``."""
        with self._writer:
            if due_only and (self._closed or self._failed is not None or not self._snapshot_due()):
                return None  # e.g. a snapshot committed while this one waited for the lock
            self._check_writable()
            memory = self._mem()
            size = graph_bytes(memory.elements, self.dim, self._manifest.m)
            mode = "copy" if size <= self.config.snapshot_copy_max_bytes else "dump"
            job = self._snapshot_begin(force=force, mode=mode)
        if job is None:
            return None
        try:
            self._snapshot_write(job)
        finally:
            job.release()
        with self._writer:
            self._snapshot_commit(job)
        # Only unpinned files go; _snap_lock keeps any other snapshot from writing meanwhile.
        self._remove_strays()
        fsync_dir(self.path)
        return job.gen

    def _snapshot_locked(self, *, force: bool) -> int | None:
        """A snapshot with writers held throughout (close, recovery, synchronous mode).
        The caller holds ``_snap_lock`` and ``_writer``."""
        job = self._snapshot_begin(force=force, mode="live")
        if job is None:
            return None
        try:
            self._snapshot_write(job)
        finally:
            job.release()
        self._snapshot_commit(job)
        self._remove_strays()
        fsync_dir(self.path)
        return job.gen

    def _snapshot_begin(self, *, force: bool, mode: str) -> _SnapshotJob | None:
        """Rotate the WAL and capture the state at the current LSN. Holds ``_writer``.

        ``mode``: "live" uses the index itself (the caller keeps ``_writer`` until the files
        are written), "copy" a GraphCopy, "dump" a GraphFile."""
        manifest = self._manifest
        newest = manifest.snapshots[0] if manifest.snapshots else None
        if not force and newest is not None and newest.lsn == self._lsn:
            return None
        memory = self._mem()
        if (
            memory.elements >= 1024
            and memory.deleted_slots >= self.config.compact_deleted_ratio * memory.elements
        ):
            self._compact_locked()
        # Rotate first, so the new segment starts right after the snapshot's LSN (segments
        # before the oldest kept snapshot are deleted whole).
        wal = self._wal
        if wal is None:
            raise InvalidArgument(f"collection {self.name!r} is closed")
        old: WalWriter | None = None
        if wal.path.name != segment_name(self._lsn + 1):
            # New segment first: if that fails, the current one is still open and usable.
            path = create_segment(self.path, self._lsn + 1, segment_info(manifest))
            self._wal = WalWriter(path, self.config.fsync, self.config.batch_window_ms / 1000)
            old = wal
        else:
            wal.sync()
        try:
            gen = self._next_gen()
            with self._rw.read():
                docs = dict(memory.docs)
                graph: GraphSource
                if mode == "live":
                    graph = memory.index
                elif mode == "copy":
                    graph = GraphCopy(memory.index)
                else:
                    hnsw_path, _ = snapshot_paths(self.path, gen)
                    graph = GraphFile(
                        memory.index, hnsw_path.with_name(f".{hnsw_path.name}.dump{TMP_SUFFIX}")
                    )
        except BaseException:
            if old is not None:
                old.close(sync=True)
            raise
        return _SnapshotJob(
            gen=gen,
            lsn=self._lsn,
            next_label=memory.next_label,
            fingerprint=manifest.fingerprint.to_json(),
            docs=docs,
            graph=graph,
            dim=manifest.dim,
            records=self._wal_records,
            bytes=self._wal_bytes,
            old_wal=old,
        )

    def _snapshot_write(self, job: _SnapshotJob) -> None:
        """The slow part: files written, fsynced and renamed. Needs no lock unless the graph
        is the live index. Until the manifest names them they are orphans, removed at open."""
        if job.old_wal is not None:
            # Holds only records up to the snapshot's LSN: synced here, off the write path.
            job.old_wal.close(sync=True)
            job.old_wal = None
        write_snapshot(self.path, job.gen, job.graph, job.state(), job.dim)

    def _snapshot_commit(self, job: _SnapshotJob) -> None:
        """The manifest write that makes the snapshot count. Holds ``_writer``."""
        if self._keywords is not None and self._keyword_error is None:
            # The snapshot lets the WAL before it go: the keyword rows up to it must be on
            # disk first (their file syncs lazily), or a power cut would lose them for good.
            self._keywords.sync()
        updated = self._manifest.with_snapshot(
            SnapshotRef(job.gen, job.lsn), self.config.keep_snapshots
        )
        updated.save(self.path)
        self._manifest = updated
        self._snap_error = None
        self._snap_retry_at = 0.0
        # What was written after the capture still counts toward the next snapshot.
        self._wal_records = max(0, self._wal_records - job.records)
        self._wal_bytes = max(0, self._wal_bytes - job.bytes)

    def compact(self) -> None:
        """Rebuild the graph from the live vectors only (drops deleted slots, restores graph
        quality after many deletes), then snapshot it. Searches continue meanwhile; writers
        wait for the rebuild."""
        with self._snap_lock, self._snapshot_errors(f"compact collection {self.name!r}"):
            with self._writer:
                self._check_writable()
                self._compact_locked()
            self._run_snapshot(force=True, due_only=False)

    def _compact_locked(self) -> None:
        memory = self._mem()
        manifest = self._manifest
        with self._rw.read():
            labels = [doc.label for doc in memory.docs.values()]
            vectors = memory.vectors_of(labels)
        index = hnswlib.Index(space="ip", dim=manifest.dim)
        index.init_index(
            max_elements=max(self.config.initial_capacity, int(len(labels) * 1.25) + 1),
            ef_construction=manifest.ef_construction,
            M=manifest.m,
            allow_replace_deleted=True,
        )
        if labels:
            index.add_items(vectors, np.asarray(labels, dtype=np.uint64), self.config.threads)
        index.set_ef(self.config.ef_search)
        index.set_num_threads(self.config.threads)
        with self._rw.write():
            memory.index = index

    # -- reads -----------------------------------------------------------------------------------

    def count(self) -> int:
        with self._rw.read():
            return len(self._mem().docs)

    def ids(self) -> list[str]:
        with self._rw.read():
            return list(self._mem().docs)

    def get(self, doc_id: str, *, with_vector: bool = False) -> Document | None:
        validate_id(doc_id, self.config)
        with self._rw.read():
            memory = self._mem()
            doc = memory.docs.get(doc_id)
            if doc is None:
                return None
            vector = memory.vector(doc.label) if with_vector else None
            return Document(doc_id, doc.text, dict(doc.metadata), vector)

    def search(
        self,
        fingerprint: ModelFingerprint,
        vector: np.ndarray,
        k: int = 10,
        *,
        where: Mapping[str, Any] | None = None,
        ef: int | None = None,
        with_text: bool = False,
        wait: bool = True,
    ) -> list[Hit] | None:
        """Top-k by cosine similarity, best first, optionally only documents matching
        ``where`` (see filters.compile_filter). Fewer than k only if fewer documents match.

        ``wait=False``: None instead of waiting when a write holds (or waits for) the index,
        or when ``ef`` needs the index to itself; for a caller that must not block."""
        self._check_model(fingerprint)
        _check_k(k)
        ef_used = self._ef(ef, k)
        query = normalize_vectors(vector, self.dim, 1, where="vector")[0]
        flt = compile_filter(where)
        # hnswlib keeps ef in the index, so a query with another ef needs it to itself.
        custom = ef_used != self.config.ef_search
        if not wait:
            if custom:
                return None
            with self._rw.try_read() as taken:
                if not taken:
                    return None
                return self._search_read(query, k, flt, with_text, custom=False)
        with self._rw.write() if custom else self._rw.read():
            return self._search_read(query, k, flt, with_text, custom, ef_used)

    def search_keyword(
        self,
        text: str,
        k: int = 10,
        *,
        where: Mapping[str, Any] | None = None,
        with_text: bool = False,
    ) -> list[Hit]:
        """Top-k by BM25 over the stored texts (keywords.py), best first; score = BM25."""
        _check_k(k)
        flt = compile_filter(where)
        keywords = self._keyword_index()
        with self._rw.read():
            memory = self._mem()
            self._check_has_text(memory, keywords)
            selection = self._selection(memory, flt)
            ranked = self._keyword_ranking(memory, keywords, text, k, selection)
            return [
                self._hit(memory, label, score, with_text, keyword=score) for label, score in ranked
            ]

    def search_hybrid(
        self,
        fingerprint: ModelFingerprint,
        vector: np.ndarray,
        text: str,
        k: int = 10,
        *,
        where: Mapping[str, Any] | None = None,
        ef: int | None = None,
        with_text: bool = False,
        fusion: str = DEFAULT_FUSION,
        weight: float | None = None,
        candidates: int | None = None,
    ) -> list[Hit]:
        """Top-k of the dense and the keyword rankings fused (fusion.py), best first; each
        hit carries its fused score and both components (``dense_score``, ``keyword_score``).
        ``candidates``: how many of each ranking are fused (default max(50, 4k), at most
        MAX_K)."""
        self._check_model(fingerprint)
        _check_k(k)
        if fusion not in FUSIONS:
            raise InvalidArgument(
                f"fusion must be one of {FUSIONS}, got {fusion!r:.40}", argument="fusion"
            )
        if weight is not None and (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not 0.0 <= weight <= 1.0
        ):
            raise InvalidArgument(
                f"weight must be in [0, 1], got {weight!r:.40}", argument="weight"
            )
        pool = candidates if candidates is not None else min(MAX_K, max(50, 4 * k))
        if isinstance(pool, bool) or not isinstance(pool, int) or not k <= pool <= MAX_K:
            raise InvalidArgument(
                f"candidates must be an integer in [k, {MAX_K}], got {pool!r:.40}",
                argument="candidates",
            )
        ef_used = self._ef(ef, pool)
        query = normalize_vectors(vector, self.dim, 1, where="vector")[0]
        flt = compile_filter(where)
        keywords = self._keyword_index()
        custom = ef_used != self.config.ef_search
        with self._rw.write() if custom else self._rw.read():
            memory = self._mem()
            self._check_has_text(memory, keywords)
            selection = self._selection(memory, flt)
            if custom:
                memory.index.set_ef(ef_used)
            try:
                labels, scores = self._search_locked(memory, query, pool, selection)
            finally:
                if custom:
                    memory.index.set_ef(self.config.ef_search)
            dense = list(zip(labels.tolist(), scores.tolist(), strict=True))
            ranked = self._keyword_ranking(memory, keywords, text, pool, selection)
            seen = set(labels.tolist())
            missing = [label for label, _ in ranked if label not in seen]
            cosines: dict[int, float] = {}
            if missing:
                exact = memory.vectors_of(missing) @ query
                cosines = dict(zip(missing, exact.tolist(), strict=True))
            fused = fuse(
                dense,
                ranked,
                k,
                method=fusion,
                weight=DEFAULT_WEIGHT if weight is None else float(weight),
                cosines=cosines,
            )
            return [
                self._hit(
                    memory,
                    item.label,
                    item.score,
                    with_text,
                    dense=item.dense,
                    keyword=item.keyword,
                )
                for item in fused
            ]

    # -- search helpers (the read lock is held) --------------------------------------------------

    def _ef(self, ef: int | None, k: int) -> int:
        if ef is not None and (
            not isinstance(ef, int) or isinstance(ef, bool) or not 1 <= ef <= 65536
        ):
            raise InvalidArgument(f"ef must be an integer in [1, 65536], got {ef!r}")
        return max(ef if ef is not None else self.config.ef_search, k)

    def _keyword_file(self) -> KeywordIndex:
        keywords = self._keywords
        if keywords is None:
            raise InvalidArgument(f"collection {self.name!r} is closed")
        return keywords

    def _keyword_index(self) -> KeywordIndex:
        """The keyword index, up to date: one that fell behind (a failed write, a full disk
        at open) is rebuilt first; while that fails, the typed error says why."""
        if self._keyword_error is not None:
            with self._writer:
                if self._keyword_error is not None:
                    self._reconcile_keywords()
        return self._keyword_file()

    @property
    def has_text(self) -> bool:
        """Whether any live document was stored with its text (keyword search needs it)."""
        return self._text_docs > 0

    def _check_has_text(self, memory: Memory, keywords: KeywordIndex) -> None:
        """Keyword and hybrid search need texts: a collection whose documents were all stored
        without one has nothing to match words against (an empty one is fine: no hits)."""
        if memory.docs and self._text_docs <= 0:
            raise InvalidArgument(
                f"collection {self.name!r} stores no document text, so it cannot be searched"
                ' by keyword: use mode "dense", or add documents with their text',
                argument="mode",
                reason="no_text",
            )

    @staticmethod
    def _selection(memory: Memory, flt: Filter | None) -> Selection | None:
        if flt is None:
            return None
        return select_where(
            flt,
            memory.postings,
            memory.by_label.keys(),
            lambda label: memory.docs[memory.by_label[label]].metadata,
        )

    @staticmethod
    def _keyword_ranking(
        memory: Memory,
        keywords: KeywordIndex,
        text: str,
        k: int,
        selection: Selection | None,
    ) -> list[tuple[int, float]]:
        live = memory.by_label
        if selection is None:
            # The keyword file mirrors the live documents, so no predicate is needed (and
            # without one SQLite keeps just the top k); the check only guards a moment's lag.
            return [hit for hit in keywords.search(text, k) if hit[0] in live]
        return keywords.search(text, k, lambda label: label in live and selection.allowed(label))

    @staticmethod
    def _hit(
        memory: Memory,
        label: int,
        score: float,
        with_text: bool,
        *,
        dense: float | None = None,
        keyword: float | None = None,
    ) -> Hit:
        doc = memory.docs[memory.by_label[label]]
        return Hit(
            memory.by_label[label],
            float(score),
            dict(doc.metadata),
            doc.text if with_text else None,
            dense_score=dense,
            keyword_score=keyword,
        )

    def _search_read(
        self,
        query: np.ndarray,
        k: int,
        flt: Filter | None,
        with_text: bool,
        custom: bool,
        ef_used: int = 0,
    ) -> list[Hit]:
        """The search, with the read lock (or the write lock for a custom ef) held."""
        memory = self._mem()
        if custom:
            memory.index.set_ef(ef_used)
        try:
            labels, scores = self._search_locked(memory, query, k, self._selection(memory, flt))
        finally:
            if custom:
                memory.index.set_ef(self.config.ef_search)
        return [
            self._hit(memory, label, score, with_text)
            for label, score in zip(labels.tolist(), scores.tolist(), strict=True)
        ]

    def _search_locked(
        self, memory: Memory, query: np.ndarray, k: int, selection: Selection | None
    ) -> tuple[np.ndarray, np.ndarray]:
        allowed = selection.labels if selection is not None else None
        candidates = len(memory.docs) if allowed is None else len(allowed)
        k = min(k, candidates)
        if k == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        if memory.exact is not None:
            return memory.exact.search(query, k, allowed)
        if allowed is not None and len(allowed) <= memory.exact_max:
            return memory.exact_over(query, list(allowed), k)
        try:
            labels, distances = memory.index.knn_query(
                query,
                k=k,
                num_threads=1,
                filter=None if allowed is None else allowed.__contains__,
            )
        except RuntimeError:
            # The graph yielded fewer than k (deletes can cut it up; a filter can starve it):
            # answer exactly rather than short.
            pool = list(allowed) if allowed is not None else list(memory.by_label)
            return memory.exact_over(query, pool, k)
        return labels[0].astype(np.int64), (1.0 - distances[0]).astype(np.float32)

    def stats(self) -> CollectionStats:
        thread = self._snap_thread
        with self._rw.read():
            memory = self._mem()
            manifest = self._manifest
            newest = manifest.snapshots[0] if manifest.snapshots else None
            disk = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
            return CollectionStats(
                name=manifest.name,
                count=len(memory.docs),
                dim=manifest.dim,
                fingerprint=manifest.fingerprint.to_json(),
                elements=memory.elements,
                capacity=memory.capacity,
                deleted_slots=memory.deleted_slots,
                lsn=self._lsn,
                snapshot_gen=newest.gen if newest else None,
                snapshot_lsn=newest.lsn if newest else 0,
                wal_records=self._wal_records,
                wal_bytes=self._wal_bytes,
                disk_bytes=disk,
                exact_search=memory.exact is not None,
                fsync=self.config.fsync,
                reindex_pending=(self.path / REINDEX_DIR / MANIFEST_NAME).is_file(),
                snapshot_running=thread is not None and thread.is_alive(),
                snapshot_error=self._snap_error,
            )

    # -- reindex ---------------------------------------------------------------------------------

    def reindex(
        self,
        embed: Callable[[list[str]], np.ndarray],
        fingerprint: ModelFingerprint,
        *,
        batch_size: int = 64,
        show_progress: bool = True,
    ) -> ReindexReport:
        """Re-embed every stored text with ``embed`` into a new index for ``fingerprint``.

        The new index is built beside the old (``<collection>/reindex/``), which keeps
        answering searches and taking writes for the old model meanwhile; changes made
        meanwhile are caught up before the switch, which is one atomic manifest write. If
        interrupted, calling reindex again with the same fingerprint resumes: documents already
        embedded (same text and metadata) are not embedded again.
        """
        started = time.monotonic()
        if not isinstance(fingerprint, ModelFingerprint):
            raise InvalidArgument("fingerprint must be a ModelFingerprint")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidArgument(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = min(batch_size, self.config.max_batch)
        if fingerprint == self.fingerprint:
            return ReindexReport(0, self.count(), 0, 0.0, fingerprint.to_json())
        with self._rw.read():
            textless = [i for i, d in self._mem().docs.items() if d.text is None]
        if textless:
            raise InvalidArgument(
                f"{len(textless)} documents in {self.name!r} have no stored text (e.g."
                f" {textless[0]!r}) so they cannot be re-embedded: upsert them with text or"
                " delete them, then reindex",
                count=len(textless),
            )
        # The shadow's writes, snapshots and the switch all write files: a full disk is
        # INDEX_FULL, and the old collection stays as it was.
        with disk_full(f"reindex collection {self.name!r}"):
            shadow = self._open_shadow(fingerprint)
            embedded = removed = 0
            try:
                reused = shadow.count()
                progress: Progress | _QuietProgress = (
                    Progress(f"reindex {self.name}", total=self.count(), unit=" docs")
                    if show_progress
                    else _QuietProgress()
                )
                with progress:
                    progress.advance(reused, "resumed" if reused else "")
                    # Bounded: each round only catches up with writes made during the last one.
                    for _ in range(3):
                        todo, stale = self._reindex_diff(shadow)
                        if not todo and not stale:
                            break
                        e, r = self._reindex_fill(
                            shadow, fingerprint, embed, todo, stale, batch_size
                        )
                        embedded, removed = embedded + e, removed + r
                        progress.advance(e)
                    with self._snap_lock, self._writer:  # no snapshot of the old model may commit
                        self._check_writable()
                        todo, stale = self._reindex_diff(shadow)
                        e, r = self._reindex_fill(
                            shadow, fingerprint, embed, todo, stale, batch_size
                        )
                        embedded, removed = embedded + e, removed + r
                        progress.advance(e, "switching")
                        self._commit_reindex(shadow)
            finally:
                shadow.close()
        shutil.rmtree(self.path / REINDEX_DIR, ignore_errors=True)
        return ReindexReport(
            embedded, reused, removed, time.monotonic() - started, fingerprint.to_json()
        )

    def _open_shadow(self, fingerprint: ModelFingerprint) -> Collection:
        path = self.path / REINDEX_DIR
        # Resumable without per-write fsync: a lost tail is only re-embedded. Synchronous
        # snapshots: its graph is handed over at the switch, no thread of its own may read it.
        config = replace(
            self.config, fsync="batch", snapshot_on_close=True, snapshot_in_background=False
        )
        if (path / MANIFEST_NAME).is_file():
            try:
                shadow = Collection.open(path, config)
            except IndexCorrupt as exc:
                log.warning("%s: discarding a damaged partial reindex (%s)", self.path, exc)
                shutil.rmtree(path)
            else:
                if shadow.fingerprint == fingerprint:
                    return shadow
                shadow.close()
                log.info("%s: discarding a partial reindex for another model", self.path)
                shutil.rmtree(path)
        elif path.exists():
            shutil.rmtree(path)
        return Collection.create(path, fingerprint, config, name=self.name)

    def _reindex_diff(
        self, shadow: Collection
    ) -> tuple[list[tuple[str, str, dict[str, Any]]], list[str]]:
        """(documents the new index lacks or has stale, ids it has that are gone)."""
        with self._rw.read():
            source = [
                (doc_id, doc.text or "", doc.metadata) for doc_id, doc in self._mem().docs.items()
            ]
        done = shadow._mem().docs
        todo = [
            (doc_id, text, meta)
            for doc_id, text, meta in source
            if (have := done.get(doc_id)) is None or have.text != text or have.metadata != meta
        ]
        wanted = {doc_id for doc_id, _, _ in source}
        stale = [doc_id for doc_id in done if doc_id not in wanted]
        return todo, stale

    def _reindex_fill(
        self,
        shadow: Collection,
        fingerprint: ModelFingerprint,
        embed: Callable[[list[str]], np.ndarray],
        todo: list[tuple[str, str, dict[str, Any]]],
        stale: list[str],
        batch_size: int,
    ) -> tuple[int, int]:
        removed = 0
        for start in range(0, len(stale), batch_size):
            removed += shadow.delete(stale[start : start + batch_size])
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            texts = [text for _, text, _ in chunk]
            vectors = np.asarray(embed(texts))
            if vectors.shape != (len(chunk), fingerprint.vector_dims):
                raise InvalidArgument(
                    f"embed returned shape {vectors.shape} for {len(chunk)} texts; expected"
                    f" ({len(chunk)}, {fingerprint.vector_dims})"
                )
            shadow.upsert(
                fingerprint,
                [doc_id for doc_id, _, _ in chunk],
                vectors,
                texts,
                [meta for _, _, meta in chunk],
            )
        return len(todo), removed

    def _commit_reindex(self, shadow: Collection) -> None:
        """Switch to the new index: one manifest write is the commit point."""
        wal = self._wal
        if wal is None:
            raise InvalidArgument(f"collection {self.name!r} is closed")
        wal.sync()
        shadow_memory = shadow._mem()
        gen = self._next_gen()
        new = replace(
            self._manifest,
            fingerprint=shadow.fingerprint,
            dim=shadow.dim,
            m=shadow._manifest.m,
            ef_construction=shadow._manifest.ef_construction,
            snapshots=(SnapshotRef(gen, self._lsn),),
            wal_from=self._lsn + 1,
        )
        with shadow._rw.read():
            state = SnapshotState(
                lsn=self._lsn,
                next_label=shadow_memory.next_label,
                fingerprint=new.fingerprint.to_json(),
                docs=shadow_memory.snapshot_docs(),
            )
            write_snapshot(self.path, gen, shadow_memory.index, state, new.dim)
        # Until here a failure leaves the old collection fully working (the new snapshot is an
        # orphan, removed at the next open). From the manifest write on, the new one is live.
        wal.close(sync=True)
        self._wal = None
        try:
            new.save(self.path)  # the commit point
        except BaseException:
            self._wal = WalWriter(wal.path, self.config.fsync, self.config.batch_window_ms / 1000)
            raise
        # Hand the new graph over; the shadow's own handle must not touch it any more.
        shadow_memory.threads = self.config.threads
        shadow_memory.index.set_ef(self.config.ef_search)
        with self._rw.write():
            self._memory = shadow_memory
            self._manifest = new
        shadow._memory = Memory.empty(
            new.dim,
            m=new.m,
            ef_construction=new.ef_construction,
            capacity=1,
            threads=1,
            exact_max=0,
        )
        shadow.config = replace(shadow.config, snapshot_on_close=False)
        path = create_segment(self.path, self._lsn + 1, segment_info(new))
        self._wal = WalWriter(path, self.config.fsync, self.config.batch_window_ms / 1000)
        self._wal_records = self._wal_bytes = 0
        self._remove_strays()
        old_keywords, self._keywords = self._keywords, None
        if old_keywords is not None:
            old_keywords.close()
        self._open_keywords(base_lsn=0, base_next_label=0, replayed=True)
        log.info("%s: reindexed for %s", self.path, new.fingerprint.describe())
