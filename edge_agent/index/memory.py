"""The in-memory side of a collection: the hnswlib graph, the id map, postings, exact cache.

Not thread-safe by itself: the Collection serialises mutations and guards reads with its
readers-writer lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .filters import Postings

if TYPE_CHECKING:
    import hnswlib

__all__ = ["ExactCache", "Memory", "StoredDoc", "top_k"]


@dataclass(slots=True)
class StoredDoc:
    label: int
    text: str | None
    metadata: dict[str, Any]


def top_k(labels: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (label, score) pairs, best first."""
    if k < len(scores):
        part = np.argpartition(-scores, k - 1)[:k]
        labels, scores = labels[part], scores[part]
    order = np.argsort(-scores, kind="stable")
    return labels[order], scores[order]


class ExactCache:
    """A dense copy of the live vectors, kept only while the collection is small enough for
    an exact scan to be as fast as the graph (and perfect in recall)."""

    def __init__(self, dim: int, capacity: int = 64) -> None:
        self._vecs = np.empty((capacity, dim), dtype=np.float32)
        self._labels = np.empty(capacity, dtype=np.int64)
        self._row: dict[int, int] = {}
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def add(self, labels: Iterable[int], vectors: np.ndarray) -> None:
        labels = list(labels)
        need = self.n + len(labels)
        if need > len(self._labels):
            size = max(need, 2 * len(self._labels))
            vecs = np.empty((size, self._vecs.shape[1]), dtype=np.float32)
            vecs[: self.n] = self._vecs[: self.n]
            lab = np.empty(size, dtype=np.int64)
            lab[: self.n] = self._labels[: self.n]
            self._vecs, self._labels = vecs, lab
        self._vecs[self.n : need] = vectors
        self._labels[self.n : need] = labels
        for offset, label in enumerate(labels):
            self._row[label] = self.n + offset
        self.n = need

    def remove(self, label: int) -> None:
        row = self._row.pop(label)
        last = self.n - 1
        if row != last:
            moved = int(self._labels[last])
            self._vecs[row] = self._vecs[last]
            self._labels[row] = moved
            self._row[moved] = row
        self.n = last

    def vector(self, label: int) -> np.ndarray:
        return self._vecs[self._row[label]].copy()

    def search(
        self, query: np.ndarray, k: int, allowed: AbstractSet[int] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if allowed is None:
            labels = self._labels[: self.n]
            scores = self._vecs[: self.n] @ query
        else:
            rows = np.fromiter((self._row[label] for label in allowed), np.int64, len(allowed))
            labels = self._labels[rows]
            scores = self._vecs[rows] @ query
        return top_k(labels, scores, k)


class Memory:
    """Graph + id map. Every hnswlib label is used once (never reused after a delete): hnswlib
    loses track of a label that is re-added while an older deleted slot still carries it."""

    def __init__(
        self,
        index: hnswlib.Index,
        dim: int,
        *,
        next_label: int,
        threads: int,
        exact_max: int,
    ) -> None:
        self.index = index
        self.dim = dim
        self.next_label = next_label
        self.threads = threads
        self.exact_max = exact_max
        self.docs: dict[str, StoredDoc] = {}
        self.by_label: dict[int, str] = {}
        self.postings = Postings()
        self.exact: ExactCache | None = ExactCache(dim) if exact_max > 0 else None

    @classmethod
    def empty(
        cls, dim: int, *, m: int, ef_construction: int, capacity: int, threads: int, exact_max: int
    ) -> Memory:
        # Imported when a collection first needs a graph: a daemon that only embeds never
        # loads hnswlib (~1 MB of RSS; docs/benchmarks.md, "Serving RSS against llama-server").
        import hnswlib

        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(
            max_elements=capacity, ef_construction=ef_construction, M=m, allow_replace_deleted=True
        )
        return cls(index, dim, next_label=0, threads=threads, exact_max=exact_max)

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def elements(self) -> int:
        return int(self.index.element_count)

    @property
    def capacity(self) -> int:
        return int(self.index.max_elements)

    @property
    def deleted_slots(self) -> int:
        return self.elements - len(self.docs)

    def slots_needed(self, puts: int, replacing: int) -> int:
        """Graph slots in use after ``puts`` inserts, ``replacing`` of which replace a live
        document (whose slot is freed first and reused)."""
        reusable = self.deleted_slots + replacing
        return self.elements + max(0, puts - reusable)

    def reserve(self, slots: int) -> None:
        if slots > self.capacity:
            self.index.resize_index(max(slots, self.capacity * 2))

    # -- mutations -----------------------------------------------------------------------------

    def load_docs(
        self, docs: list[tuple[str, int, str | None, dict[str, Any]]], vectors: np.ndarray | None
    ) -> None:
        """Adopt a snapshot's id map (its graph is already ``self.index``)."""
        for doc_id, label, text, metadata in docs:
            self.docs[doc_id] = StoredDoc(label, text, metadata)
            self.by_label[label] = doc_id
            self.postings.add(label, metadata)
        if self.exact is not None:
            if len(docs) > self.exact_max:
                self.exact = None
            elif docs:
                if vectors is None:
                    vectors = self.vectors_of([label for _, label, _, _ in docs])
                self.exact.add((label for _, label, _, _ in docs), vectors)

    def remove(self, doc_id: str) -> bool:
        doc = self.docs.pop(doc_id, None)
        if doc is None:
            return False
        self.index.mark_deleted(doc.label)
        del self.by_label[doc.label]
        self.postings.remove(doc.label, doc.metadata)
        if self.exact is not None:
            self.exact.remove(doc.label)
        return True

    def put_many(
        self,
        ids: list[str],
        vectors: np.ndarray,
        texts: list[str | None],
        metadatas: list[dict[str, Any]],
    ) -> None:
        """Insert or replace; ``ids`` are distinct and the capacity was reserved."""
        for doc_id in ids:
            self.remove(doc_id)
        self.reserve(self.slots_needed(len(ids), 0))
        labels = np.arange(self.next_label, self.next_label + len(ids), dtype=np.uint64)
        if len(ids):
            self.index.add_items(vectors, labels, num_threads=self.threads, replace_deleted=True)
        self.next_label += len(ids)
        for doc_id, label, text, metadata in zip(
            ids, labels.tolist(), texts, metadatas, strict=True
        ):
            self.docs[doc_id] = StoredDoc(label, text, metadata)
            self.by_label[label] = doc_id
            self.postings.add(label, metadata)
        if self.exact is not None:
            if len(self.docs) > self.exact_max:
                self.exact = None  # grown out of it: the graph answers from now on
            else:
                self.exact.add(labels.tolist(), vectors)
        elif 0 < len(self.docs) <= self.exact_max // 2:
            self.rebuild_exact()

    def rebuild_exact(self) -> None:
        """Back to exact search once deletes shrink the collection well under the bound (the
        factor 2 keeps a collection near the bound from rebuilding on every write)."""
        cache = ExactCache(self.dim, capacity=max(64, len(self.docs)))
        labels = [doc.label for doc in self.docs.values()]
        if labels:
            cache.add(labels, self.vectors_of(labels))
        self.exact = cache

    def after_deletes(self) -> None:
        if self.exact is None and self.exact_max and len(self.docs) <= self.exact_max // 2:
            self.rebuild_exact()

    # -- reads ---------------------------------------------------------------------------------

    def vectors_of(self, labels: list[int], chunk: int = 8192) -> np.ndarray:
        out = np.empty((len(labels), self.dim), dtype=np.float32)
        for start in range(0, len(labels), chunk):
            part = labels[start : start + chunk]
            out[start : start + len(part)] = self.index.get_items(part, return_type="numpy")
        return out

    def vector(self, label: int) -> np.ndarray:
        if self.exact is not None:
            return self.exact.vector(label)
        return np.asarray(self.index.get_items([label], return_type="numpy")[0], np.float32)

    def exact_over(
        self, query: np.ndarray, labels: list[int], k: int, chunk: int = 8192
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over any subset, a chunk at a time so memory stays bounded."""
        best_labels = np.empty(0, dtype=np.int64)
        best_scores = np.empty(0, dtype=np.float32)
        for start in range(0, len(labels), chunk):
            part = np.asarray(labels[start : start + chunk], dtype=np.int64)
            scores = self.vectors_of(part.tolist()) @ query
            best_labels, best_scores = top_k(
                np.concatenate([best_labels, part]), np.concatenate([best_scores, scores]), k
            )
        return best_labels, best_scores

    def snapshot_docs(self) -> list[tuple[str, int, str | None, dict[str, Any]]]:
        return [(i, d.label, d.text, d.metadata) for i, d in self.docs.items()]
