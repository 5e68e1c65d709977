"""Reading a Collection by similarity: dense (hnswlib or exact), keyword (BM25) and hybrid
(both fused, fusion.py) search, with metadata filters (filters.py).

Any number of searches run at once under the read lock; a query with its own ``ef`` takes the
index to itself, since hnswlib keeps ef in the index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InvalidArgument
from .collection_state import MAX_K, CollectionState, _check_k
from .documents import Hit, normalize_vectors
from .filters import Filter, Selection, compile_filter
from .filters import select as select_where
from .fingerprint import ModelFingerprint
from .fusion import DEFAULT_FUSION, DEFAULT_WEIGHT, FUSIONS, fuse
from .keywords import KeywordIndex
from .memory import Memory


class Searching(CollectionState):
    """search, search_keyword, search_hybrid."""

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
        keyword_ranking: list[tuple[int, float]] | None = None,
        wait: bool = True,
    ) -> list[Hit] | None:
        """Top-k of the dense and the keyword rankings fused (fusion.py), best first; each
        hit carries its fused score and both components (``dense_score``, ``keyword_score``).
        ``candidates``: how many of each ranking are fused (default max(50, 4k), at most
        MAX_K). ``keyword_ranking``: the keyword side computed beforehand by
        ``keyword_candidates`` (the daemon runs it while the query is being embedded);
        documents deleted or filtered out since are dropped from it. ``wait=False``: as for
        ``search`` (None rather than waiting for the index)."""
        self._check_model(fingerprint)
        _check_k(k)
        pool = self._hybrid_pool(k, fusion, weight, candidates)
        ef_used = self._ef(ef, pool)
        query = normalize_vectors(vector, self.dim, 1, where="vector")[0]
        flt = compile_filter(where)
        keywords = self._keyword_index()
        custom = ef_used != self.config.ef_search

        def fused_hits() -> list[Hit]:
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
            if keyword_ranking is None:
                ranked = self._keyword_ranking(
                    memory, keywords, text, pool, selection, rare_only=True
                )
            else:
                ranked = [
                    (label, score)
                    for label, score in keyword_ranking
                    if label in memory.by_label
                    and (selection is None or selection.allowed(label))
                ]
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

        if not wait:
            # Only with the keyword side given: ranking the words here could take
            # milliseconds, too long for a caller that must not block.
            if custom or keyword_ranking is None:
                return None
            with self._rw.try_read() as taken:
                return fused_hits() if taken else None
        with self._rw.write() if custom else self._rw.read():
            return fused_hits()

    @staticmethod
    def hybrid_pool(k: int) -> int:
        """Candidates each side gives a hybrid search of ``k`` by default."""
        return min(MAX_K, max(50, 4 * k))

    def keyword_candidates(
        self, text: str, k: int, *, where: Mapping[str, Any] | None = None
    ) -> list[tuple[int, float]]:
        """The keyword side of a hybrid search on its own: (label, BM25), best first."""
        _check_k(k)
        flt = compile_filter(where)
        keywords = self._keyword_index()
        with self._rw.read():
            memory = self._mem()
            self._check_has_text(memory, keywords)
            # The fusion needs candidates and a score to rank them by, not exact BM25: the
            # rare words alone give both at a fifth of the cost (keywords.search).
            return self._keyword_ranking(
                memory, keywords, text, k, self._selection(memory, flt), rare_only=True
            )

    @staticmethod
    def _hybrid_pool(k: int, fusion: str, weight: float | None, candidates: int | None) -> int:
        """Checks search_hybrid's fusion arguments; how many of each ranking to fuse."""
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
        pool = candidates if candidates is not None else min(MAX_K, max(50, 4 * k))  # hybrid_pool
        if isinstance(pool, bool) or not isinstance(pool, int) or not k <= pool <= MAX_K:
            raise InvalidArgument(
                f"candidates must be an integer in [k, {MAX_K}], got {pool!r:.40}",
                argument="candidates",
            )
        return pool

    def _ef(self, ef: int | None, k: int) -> int:
        if ef is not None and (
            not isinstance(ef, int) or isinstance(ef, bool) or not 1 <= ef <= 65536
        ):
            raise InvalidArgument(f"ef must be an integer in [1, 65536], got {ef!r}")
        return max(ef if ef is not None else self.config.ef_search, k)

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
        *,
        rare_only: bool = False,
    ) -> list[tuple[int, float]]:
        live = memory.by_label
        if selection is None:
            # The keyword file mirrors the live documents, so no predicate is needed (and
            # without one SQLite keeps just the top k); the check only guards a moment's lag.
            return [
                hit for hit in keywords.search(text, k, rare_only=rare_only) if hit[0] in live
            ]
        return keywords.search(
            text,
            k,
            lambda label: label in live and selection.allowed(label),
            rare_only=rare_only,
        )

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
