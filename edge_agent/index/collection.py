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
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    CollectionExists,
    CollectionNotFound,
    DocumentExists,
    EdgeAgentError,
    IndexFull,
    InvalidArgument,
)
from .collection_state import (
    LOCK_NAME,
    MAX_K,
    REINDEX_DIR,
    CollectionState,
    CollectionStats,
    ReindexReport,
    lock_directory,
    segment_info,
)
from .config import IndexConfig
from .documents import (
    Delete,
    Document,
    Put,
    encode_payload,
    normalize_vectors,
    validate_id,
    validate_metadata,
    validate_text,
)
from .fingerprint import ModelFingerprint
from .fsutil import TMP_SUFFIX, describe_error, disk_full, fsync_dir
from .manifest import MANIFEST_NAME, CollectionManifest, validate_collection_name
from .memory import Memory
from .recovering import Recovering
from .reindexing import Reindexing
from .searching import Searching
from .snapshotting import Snapshotting
from .wal import MAX_RECORD, create_segment, encode_record

__all__ = [
    "LOCK_NAME",
    "MAX_K",
    "REINDEX_DIR",
    "Collection",
    "CollectionStats",
    "ReindexReport",
    "lock_directory",
    "segment_info",
]

log = logging.getLogger("edge_agent.index")


class Collection(Searching, Snapshotting, Reindexing, Recovering, CollectionState):
    """Open with :meth:`open` or :meth:`create`; close (or use ``with``) to release the lock.

    This module holds the lifecycle, the writes and the plain reads; the fields are declared
    in collection_state.py, and the other parts are mixins: recovering.py, snapshotting.py,
    searching.py, reindexing.py."""

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

    # -- the keyword index -----------------------------------------------------------------------

    # -- properties ------------------------------------------------------------------------------

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

    # -- search helpers (the read lock is held) --------------------------------------------------

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
