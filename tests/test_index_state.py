"""Hypothesis state machine: random add/upsert/delete/search/keyword search/filters/restart/
crash/snapshot/compact sequences against a plain dict model, on a real collection on disk."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge_agent.errors import DocumentExists
from edge_agent.index import Collection, IndexConfig, ModelFingerprint

DIM = 6
FP = ModelFingerprint("state", "5" * 64, DIM, "mean")
IDS = st.sampled_from([f"id{i}" for i in range(24)])
GROUPS = st.integers(0, 3)
WORDS = [f"alpha{i}" for i in range(4)]


def text_for(seed: int, group: int) -> str:
    return f"{WORDS[seed % 4]} beta{group} common"


# Filters in every form, with the plain-Python rule each one means for a group value g.
FILTERS: list[tuple[dict[str, Any], Any]] = [
    ({"g": {"gte": 1, "lt": 3}}, lambda g: 1 <= g < 3),
    ({"g": {"ne": 2}}, lambda g: g != 2),
    ({"g": {"nin": [0, 3]}}, lambda g: g not in (0, 3)),
    ({"or": [{"g": 0}, {"g": {"gt": 2}}]}, lambda g: g == 0 or g > 2),
    ({"not": {"g": {"in": [1, 2]}}}, lambda g: g not in (1, 2)),
    ({"g": {"exists": True}}, lambda g: True),
    ({"g": {"exists": False}}, lambda g: False),
    ({"and": [{"g": {"lte": 2}}, {"not": {"g": 0}}]}, lambda g: 0 < g <= 2),
]


def vector(seed: int) -> np.ndarray:
    row = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return row / np.linalg.norm(row)


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="edge-agent-state-"))
        self.path = self.dir / "c"
        # Small bounds, so both the exact scan and the graph answer, and snapshots happen.
        self.config = IndexConfig(
            exact_search_max=8, snapshot_wal_records=6, initial_capacity=4, fsync="off"
        )
        self.coll = Collection.create(self.path, FP, self.config)
        self.model: dict[str, tuple[np.ndarray, int, str | None]] = {}

    def teardown(self) -> None:
        self.coll.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        docs=st.lists(st.tuples(IDS, st.integers(0, 10**6), GROUPS), min_size=1, max_size=6),
        with_text=st.booleans(),
    )
    def upsert(self, docs: list[tuple[str, int, int]], with_text: bool) -> None:
        unique = {doc_id: (seed, group) for doc_id, seed, group in docs}
        ids = list(unique)
        vectors = np.stack([vector(unique[i][0]) for i in ids])
        texts = [text_for(*unique[i]) if with_text else None for i in ids]
        self.coll.upsert(FP, ids, vectors, texts, [{"g": unique[i][1]} for i in ids])
        for doc_id, row, text in zip(ids, vectors, texts, strict=True):
            self.model[doc_id] = (row, unique[doc_id][1], text)

    @rule(doc_id=IDS, seed=st.integers(0, 10**6))
    def add(self, doc_id: str, seed: int) -> None:
        try:
            self.coll.add(FP, [doc_id], vector(seed), metadata=[{"g": 0}])
        except DocumentExists:
            assert doc_id in self.model
            return
        assert doc_id not in self.model
        self.model[doc_id] = (vector(seed), 0, None)

    @rule(ids=st.lists(IDS, min_size=1, max_size=5))
    def delete(self, ids: list[str]) -> None:
        removed = self.coll.delete(ids)
        assert removed == len({i for i in ids if i in self.model})
        for doc_id in ids:
            self.model.pop(doc_id, None)

    @rule(seed=st.integers(0, 10**6), k=st.integers(1, 30), group=st.none() | GROUPS)
    def search(self, seed: int, k: int, group: int | None) -> None:
        query = vector(seed)
        where = None if group is None else {"g": group}
        hits = self.coll.search(FP, query, k=k, where=where, ef=int(k + 10))
        allowed = {i for i, (_, g, _) in self.model.items() if group is None or g == group}
        ids = [h.id for h in hits]
        assert set(ids) <= allowed, "a deleted or filtered-out id came back"
        assert len(ids) == len(set(ids)) == min(k, len(allowed))
        for hit in hits:
            assert abs(hit.score - float(self.model[hit.id][0] @ query)) < 1e-4
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)

    @rule(seed=st.integers(0, 10**6), k=st.integers(1, 30), which=st.integers(0, len(FILTERS) - 1))
    def search_filtered(self, seed: int, k: int, which: int) -> None:
        where, rule_of = FILTERS[which]
        hits = self.coll.search(FP, vector(seed), k=k, where=where)
        allowed = {i for i, (_, g, _) in self.model.items() if rule_of(g)}
        ids = [h.id for h in hits]
        assert set(ids) <= allowed
        assert len(ids) == len(set(ids)) == min(k, len(allowed))

    @rule(
        word=st.sampled_from([*WORDS, "beta1", "common", "absent"]),
        k=st.integers(1, 30),
        which=st.none() | st.integers(0, len(FILTERS) - 1),
    )
    def search_keyword(self, word: str, k: int, which: int | None) -> None:
        if not any(text for _, _, text in self.model.values()):
            return  # a collection without texts refuses keyword search (tested elsewhere)
        where, rule_of = FILTERS[which] if which is not None else (None, lambda g: True)
        hits = self.coll.search_keyword(word, k, where=where)
        matching = {
            i
            for i, (_, g, text) in self.model.items()
            if text is not None and word in text.split() and rule_of(g)
        }
        ids = [h.id for h in hits]
        assert set(ids) <= matching, "a document without the word (or filtered out) came back"
        assert len(ids) == len(set(ids)) == min(k, len(matching))
        assert all(h.score > 0 for h in hits)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def find_own_vector(self, data: st.DataObject) -> None:
        doc_id = data.draw(st.sampled_from(sorted(self.model)))
        hit = self.coll.search(FP, self.model[doc_id][0], k=1)[0]
        assert hit.score > 0.9999  # itself, or an identical vector

    @rule()
    def restart(self) -> None:
        self.coll.close()
        self.coll = Collection.open(self.path, self.config)

    @rule()
    def crash(self) -> None:
        """Abandon the handle as a killed process would: no snapshot, no clean close."""
        wal, lock = self.coll._wal, self.coll._lock_fd
        if wal is not None:
            wal.close(sync=False)
        if lock is not None:
            os.close(lock)
        self.coll._wal = None
        self.coll._lock_fd = None
        self.coll.config = replace(self.coll.config, snapshot_on_close=False)
        self.coll.close()
        self.coll = Collection.open(self.path, self.config)

    @rule()
    def snapshot(self) -> None:
        self.coll.snapshot()

    @rule()
    def compact(self) -> None:
        self.coll.compact()

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.coll.count() == len(self.model)
        assert sorted(self.coll.ids()) == sorted(self.model)
        for doc_id, (row, group, text) in self.model.items():
            doc = self.coll.get(doc_id, with_vector=True)
            assert doc is not None and doc.metadata == {"g": group} and doc.text == text
            assert np.allclose(doc.vector, row, atol=1e-6)  # type: ignore[arg-type]


IndexMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIndexMachine = IndexMachine.TestCase
