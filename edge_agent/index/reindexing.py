"""Re-embedding a Collection's texts for a new model: a shadow collection built beside the old
one (``<collection>/reindex/``), caught up with the writes made meanwhile, switched to with one
manifest write. Interrupted, it resumes.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Self

import numpy as np

from ..errors import IndexCorrupt, InvalidArgument
from ..progress import Progress
from .collection_state import REINDEX_DIR, CollectionState, ReindexReport, segment_info
from .fingerprint import ModelFingerprint
from .fsutil import disk_full
from .manifest import MANIFEST_NAME, SnapshotRef
from .memory import Memory
from .snapshot import SnapshotState, write_snapshot
from .wal import WalWriter, create_segment

log = logging.getLogger("edge_agent.index")


class _QuietProgress:
    """Progress's interface, saying nothing (reindex with show_progress=False)."""

    def __enter__(self) -> _QuietProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, amount: float = 1, detail: str = "") -> None:
        return None


class Reindexing(CollectionState):
    """reindex and its steps."""

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

    def _open_shadow(self, fingerprint: ModelFingerprint) -> Self:
        path = self.path / REINDEX_DIR
        # Resumable without per-write fsync: a lost tail is only re-embedded. Synchronous
        # snapshots: its graph is handed over at the switch, no thread of its own may read it.
        config = replace(
            self.config, fsync="batch", snapshot_on_close=True, snapshot_in_background=False
        )
        if (path / MANIFEST_NAME).is_file():
            try:
                shadow = type(self).open(path, config)
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
        return type(self).create(path, fingerprint, config, name=self.name)

    def _reindex_diff(
        self, shadow: Self
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
        shadow: Self,
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

    def _commit_reindex(self, shadow: Self) -> None:
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
