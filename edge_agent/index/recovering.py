"""Bringing a Collection to its state at open, and the keyword index kept in step with it.

Recovery loads the newest usable snapshot, replays the WAL after it and, when it had to fall
back to an older snapshot, writes a fresh one. The keyword index (keywords.py) is derived
from the documents like the graph: reconciled at open, updated with every acknowledged
write, rebuilt when it fell behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import numpy as np

from ..errors import EdgeAgentError, IndexCorrupt
from .collection_state import _CORRUPT_SUFFIX, REINDEX_DIR, CollectionState, segment_info
from .fsutil import TMP_SUFFIX, describe_error
from .keywords import FILENAME as KEYWORDS_FILE
from .keywords import KeywordIndex
from .manifest import MANIFEST_NAME, CollectionManifest, SnapshotRef
from .memory import Memory
from .recovery import WalReplay, list_segments, repair_hint, replay_wal
from .snapshot import load_snapshot, snapshot_gen, snapshot_paths
from .wal import WalWriter, create_segment

log = logging.getLogger("edge_agent.index")


class Recovering(CollectionState):
    """Recovery at open, stray files, the keyword index."""

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

    def _load_base(self) -> tuple[Memory, WalReplay, SnapshotRef | None, int]:
        """The newest usable snapshot (or an empty graph) and the WAL read after it:
        (memory, replay, the snapshot used, its next label)."""
        manifest = self._manifest
        config = self.config
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
        return memory, replay, used, base_next_label

    def _recover(self) -> None:
        manifest = self._manifest
        config = self.config
        self._remove_strays(at_open=True)
        memory, replay, used, base_next_label = self._load_base()
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

    def _keyword_index(self) -> KeywordIndex:
        """The keyword index, up to date: one that fell behind (a failed write, a full disk
        at open) is rebuilt first; while that fails, the typed error says why."""
        if self._keyword_error is not None:
            with self._writer:
                if self._keyword_error is not None:
                    self._reconcile_keywords()
        return self._keyword_file()
