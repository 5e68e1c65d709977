"""A Collection's snapshots: when they are due, the background thread, the capture / write /
commit steps, WAL rotation and trimming, and compaction.

Lock order (collection.py): ``_snap_lock`` before ``_writer`` before ``_rw``. A background
snapshot holds ``_writer`` only while it captures the graph and while it commits the manifest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgument
from .collection_state import CollectionState, segment_info
from .fsutil import DISK_FULL_ERRNOS, TMP_SUFFIX, describe_error, disk_full, fsync_dir, index_full
from .manifest import SnapshotRef
from .memory import StoredDoc
from .snapshot import (
    GraphCopy,
    GraphFile,
    GraphSource,
    SnapshotState,
    graph_bytes,
    snapshot_gen,
    snapshot_paths,
    write_snapshot,
)
from .wal import WalWriter, create_segment, segment_name

log = logging.getLogger("edge_agent.index")

# After a failed background snapshot (disk full, I/O error) the next try waits this long, so
# a persistent failure does not turn into a snapshot attempt after every write.
SNAPSHOT_RETRY_S = 10.0


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


class Snapshotting(CollectionState):
    """Snapshots and compaction."""

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
        import hnswlib  # when a collection first needs a graph (index/memory.py says why)

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
