"""The index's API on a real hnswlib index on disk: documents, search, filters, models,
limits, concurrency, store, reindex, compaction."""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import (
    CollectionExists,
    CollectionNotFound,
    DocumentExists,
    EdgeAgentError,
    ErrorCode,
    IndexBusy,
    IndexFull,
    InvalidArgument,
    ModelMismatch,
    error_for_code,
)
from edge_agent.index import Collection, IndexConfig, IndexStore, ModelFingerprint

DIM = 16
FP = ModelFingerprint("tiny", "a" * 64, DIM, "mean")


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def make(tmp_path: Path, **config: object) -> Collection:
    return Collection.create(tmp_path / "c", FP, IndexConfig(**config))  # type: ignore[arg-type]


def test_error_codes_are_registered_in_the_6xx_range() -> None:
    for code, cls in (
        (600, CollectionNotFound),
        (601, ModelMismatch),
        (603, CollectionExists),
        (604, IndexBusy),
        (605, IndexFull),
        (606, DocumentExists),
    ):
        assert ErrorCode(code).name == cls.code.name
        assert error_for_code(code) is cls
    assert error_for_code(602).__name__ == "IndexCorrupt"
    assert ErrorCode.INTERNAL == 500  # the existing codes are untouched


def test_upsert_get_delete_count_and_reopen(tmp_path: Path, rng: np.random.Generator) -> None:
    vectors = unit(rng, 3)
    with make(tmp_path) as coll:
        lsn = coll.upsert(
            FP, ["a", "b", "c"], vectors, ["text a", None, "text c"], [{"k": 1}, None, {"k": 2}]
        )
        assert lsn == 1 and coll.count() == 3
        doc = coll.get("a", with_vector=True)
        assert doc is not None and doc.text == "text a" and doc.metadata == {"k": 1}
        assert doc.vector is not None and np.allclose(doc.vector, vectors[0], atol=1e-6)
        assert coll.get("b").text is None  # type: ignore[union-attr]
        # Upsert replaces by id.
        coll.upsert(FP, ["a"], vectors[2] * 3.0, ["new a"], [{"k": 9}])
        doc = coll.get("a", with_vector=True)
        assert doc is not None and doc.text == "new a" and doc.metadata == {"k": 9}
        assert np.allclose(doc.vector, vectors[2], atol=1e-6)  # type: ignore[arg-type]
        assert coll.count() == 3
        assert coll.delete(["b", "missing"]) == 1
        assert coll.delete(["missing"]) == 0
        assert coll.get("b") is None and coll.count() == 2
    with Collection.open(tmp_path / "c") as coll:
        assert sorted(coll.ids()) == ["a", "c"]
        assert coll.get("a").text == "new a"  # type: ignore[union-attr]
        assert coll.lsn == 3


def test_add_refuses_existing_ids_atomically(tmp_path: Path, rng: np.random.Generator) -> None:
    with make(tmp_path) as coll:
        coll.add(FP, ["a"], unit(rng, 1))
        with pytest.raises(DocumentExists):
            coll.add(FP, ["b", "a"], unit(rng, 2))
        assert coll.get("b") is None and coll.count() == 1


@pytest.mark.parametrize("exact_max", [10_000, 0], ids=["exact", "hnsw"])
def test_search_ranks_by_cosine(tmp_path: Path, rng: np.random.Generator, exact_max: int) -> None:
    vectors = unit(rng, 500)
    with make(tmp_path, exact_search_max=exact_max) as coll:
        coll.upsert(FP, [f"d{i}" for i in range(500)], vectors)
        query = vectors[7] + 0.05 * unit(rng, 1)[0]
        hits = coll.search(FP, query, k=10)
        truth = np.argsort(-(vectors @ (query / np.linalg.norm(query))))[:10]
        assert hits[0].id == "d7"
        assert len({h.id for h in hits} & {f"d{i}" for i in truth}) >= 9
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0
        assert abs(hits[0].score - float(vectors[7] @ (query / np.linalg.norm(query)))) < 1e-5
        assert coll.stats().exact_search is (exact_max > 0)
        # A larger ef than the default takes the exclusive path and restores the default.
        assert coll.search(FP, query, k=10, ef=300)[0].id == "d7"
        assert coll._mem().index.ef == coll.config.ef_search


def test_exact_search_limit_follows_the_vector_size(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    assert IndexConfig().exact_limit(384) == 10_416 and IndexConfig().exact_limit(1024) == 3_906
    assert IndexConfig(exact_search_max=7).exact_limit(1024) == 7
    with make(tmp_path) as coll:  # 16-d: 250k vectors would still be scanned exactly
        coll.upsert(FP, [f"d{i}" for i in range(300)], unit(rng, 300))
        assert coll.stats().exact_search


def test_search_never_returns_deleted_and_k_exceeding_count(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    vectors = unit(rng, 50)
    with make(tmp_path, exact_search_max=0) as coll:
        coll.upsert(FP, [f"d{i}" for i in range(50)], vectors)
        coll.delete([f"d{i}" for i in range(0, 50, 2)])
        hits = coll.search(FP, vectors[0], k=100)
        assert len(hits) == 25
        assert all(int(h.id[1:]) % 2 for h in hits)


@pytest.mark.parametrize("exact_max", [10_000, 100, 0], ids=["cache", "subset", "graph"])
def test_filters_find_k_even_when_selective(
    tmp_path: Path, rng: np.random.Generator, exact_max: int
) -> None:
    n = 3000
    vectors = unit(rng, n)
    metadata = [
        {"lang": "en" if i % 100 else "fr", "bucket": i % 7, "flag": i % 2 == 0} for i in range(n)
    ]
    with make(tmp_path, exact_search_max=exact_max) as coll:
        coll.upsert(FP, [f"d{i}" for i in range(n)], vectors, metadata=metadata)
        query = unit(rng, 1)[0]
        # 30 French documents out of 3000: 1% selectivity, must still give k=10 exact hits.
        hits = coll.search(FP, query, k=10, where={"lang": "fr"})
        french = [i for i in range(n) if i % 100 == 0]
        truth = sorted(french, key=lambda i: -float(vectors[i] @ query))[:10]
        assert [h.id for h in hits] == [f"d{i}" for i in truth]
        hits = coll.search(FP, query, k=20, where={"bucket": {"in": [1, 3]}, "flag": True})
        assert len(hits) == 20
        assert all(h.metadata["bucket"] in (1, 3) and h.metadata["flag"] is True for h in hits)
        # Typed: True must not match the integer 1.
        assert coll.search(FP, query, k=5, where={"bucket": True}) == []
        assert coll.search(FP, query, k=5, where={"lang": "de"}) == []
        with pytest.raises(InvalidArgument):
            coll.search(FP, query, where={"lang": {"like": "e%"}})


def test_model_mismatch_is_a_typed_error(tmp_path: Path, rng: np.random.Generator) -> None:
    other = ModelFingerprint("tiny", "b" * 64, DIM, "mean")
    with make(tmp_path) as coll:
        with pytest.raises(ModelMismatch, match="sha256") as info:
            coll.upsert(other, ["a"], unit(rng, 1))
        assert info.value.code == ErrorCode.MODEL_MISMATCH
        coll.upsert(FP, ["a"], unit(rng, 1))
        with pytest.raises(ModelMismatch):
            coll.search(ModelFingerprint("tiny", "a" * 64, DIM, "cls"), unit(rng, 1)[0])
        with pytest.raises(ModelMismatch):
            coll.search(ModelFingerprint("tiny", "a" * 64, 32, "mean", dimensions=16), unit(rng, 1))


def test_input_limits_are_typed_errors(tmp_path: Path, rng: np.random.Generator) -> None:
    with make(tmp_path, max_id_bytes=8, max_metadata_bytes=64, max_batch=4, max_vectors=5) as coll:
        bad_calls = [
            lambda: coll.upsert(FP, ["x" * 9], unit(rng, 1)),
            lambda: coll.upsert(FP, [""], unit(rng, 1)),
            lambda: coll.upsert(FP, ["a", "a"], unit(rng, 2)),
            lambda: coll.upsert(FP, ["a"], unit(rng, 1, DIM + 1)),
            lambda: coll.upsert(FP, ["a"], np.zeros((1, DIM))),
            lambda: coll.upsert(FP, ["a"], np.full((1, DIM), np.nan)),
            lambda: coll.upsert(FP, ["a", "b"], unit(rng, 1)),
            lambda: coll.upsert(FP, list("abcde"), unit(rng, 5)),
            lambda: coll.upsert(FP, ["a"], unit(rng, 1), metadata=[{"k": "v" * 100}]),
            lambda: coll.upsert(FP, ["a"], unit(rng, 1), metadata=[{"k": {"nested": 1}}]),
            lambda: coll.upsert(FP, ["a"], unit(rng, 1), metadata=[{"k": float("inf")}]),
            lambda: coll.upsert(FP, ["a"], unit(rng, 1), texts=[b"bytes"]),  # type: ignore[list-item]
            lambda: coll.upsert(FP, "abc", unit(rng, 3)),
            lambda: coll.search(FP, unit(rng, 1)[0], k=0),
            lambda: coll.search(FP, unit(rng, 1)[0], ef=0),
            lambda: coll.delete("abc"),
        ]
        for call in bad_calls:
            with pytest.raises(InvalidArgument):
                call()
        assert coll.count() == 0 and coll.lsn == 0  # nothing reached the WAL
        coll.upsert(FP, list("abcd"), unit(rng, 4))
        with pytest.raises(IndexFull):
            coll.upsert(FP, ["e", "f"], unit(rng, 2))
        coll.upsert(FP, ["a", "e"], unit(rng, 2))  # one replaced, one new: 5 fits
        assert coll.count() == 5
    with pytest.raises(InvalidArgument):
        IndexConfig(fsync="sometimes")
    with pytest.raises(InvalidArgument):
        ModelFingerprint("m", "not-a-sha", 8, "mean")


def test_growth_by_resize_and_slot_reuse(tmp_path: Path, rng: np.random.Generator) -> None:
    with make(tmp_path, initial_capacity=16, exact_search_max=0) as coll:
        for batch in range(10):
            coll.upsert(FP, [f"d{batch}-{i}" for i in range(10)], unit(rng, 10))
        stats = coll.stats()
        assert stats.count == 100 and stats.capacity >= 100 and stats.elements == 100
        coll.delete([f"d0-{i}" for i in range(10)])
        assert coll.stats().deleted_slots == 10
        coll.upsert(FP, [f"new{i}" for i in range(10)], unit(rng, 10))
        stats = coll.stats()
        assert stats.elements == 100 and stats.deleted_slots == 0  # deleted slots reused
        # Replacing by id frees and reuses the old slot too.
        coll.upsert(FP, [f"d1-{i}" for i in range(10)], unit(rng, 10))
        assert coll.stats().elements == 100


def test_compaction_drops_deleted_slots(tmp_path: Path, rng: np.random.Generator) -> None:
    vectors = unit(rng, 400)
    with make(tmp_path, exact_search_max=0) as coll:
        coll.upsert(FP, [f"d{i}" for i in range(400)], vectors)
        coll.delete([f"d{i}" for i in range(300)])
        assert coll.stats().elements == 400
        coll.compact()
        stats = coll.stats()
        assert stats.elements == 100 and stats.deleted_slots == 0 and stats.count == 100
        assert coll.search(FP, vectors[350], k=1)[0].id == "d350"
    with Collection.open(tmp_path / "c", IndexConfig(exact_search_max=0)) as coll:
        assert coll.stats().elements == 100
        assert coll.search(FP, vectors[399], k=1)[0].id == "d399"


def test_a_second_open_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    with make(tmp_path) as coll, pytest.raises(IndexBusy):
        Collection.open(coll.path)
    Collection.open(tmp_path / "c").close()  # released on close
    with pytest.raises(CollectionExists):
        make(tmp_path)
    with pytest.raises(CollectionNotFound):
        Collection.open(tmp_path / "nope")


def test_snapshots_rotate_the_wal_and_keep_a_fallback(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    # Synchronous snapshots: each lands exactly on the write that crosses the bound.
    with make(
        tmp_path, snapshot_wal_records=5, keep_snapshots=2, snapshot_in_background=False
    ) as coll:
        for i in range(23):
            coll.upsert(FP, [f"d{i}"], unit(rng, 1))
        names = sorted(p.name for p in coll.path.iterdir())
        stats = coll.stats()
    assert stats.snapshot_lsn == 20 and stats.wal_records == 3
    snaps = [n for n in names if n.endswith(".meta")]
    wals = [n for n in names if n.startswith("wal-")]
    # Two snapshots (LSN 15 and 20) and the WAL from the older one on.
    assert len(snaps) == 2 and wals == [
        "wal-00000000000000000016.log",
        "wal-00000000000000000021.log",
    ]
    with Collection.open(tmp_path / "c") as coll:
        assert coll.count() == 23 and coll.lsn == 23


def test_readers_and_a_writer_run_concurrently(tmp_path: Path, rng: np.random.Generator) -> None:
    vectors = unit(rng, 2000)
    errors: list[BaseException] = []
    stop = threading.Event()
    with make(tmp_path, exact_search_max=0, fsync="off") as coll:
        coll.upsert(FP, [f"d{i}" for i in range(1000)], vectors[:1000])

        def reader() -> None:
            local = np.random.default_rng(threading.get_ident() % 1000)
            try:
                while not stop.is_set():
                    query = vectors[int(local.integers(0, 1000))]
                    hits = coll.search(FP, query, k=5, ef=int(local.choice([64, 128])))
                    if not hits or hits[0].score < 0.999:
                        raise AssertionError(f"own vector not found: {hits[:1]}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            for start in range(1000, 2000, 50):  # grows past capacity: resizes under load
                coll.upsert(
                    FP, [f"d{i}" for i in range(start, start + 50)], vectors[start : start + 50]
                )
                if start % 200 == 0:
                    coll.delete([f"d{start}"])
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        assert not errors, errors[0]
        assert coll.count() == 2000 - 5


def test_search_without_waiting_never_blocks_on_a_write(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """What the daemon's event loop uses: the same hits when the index is free, None at once
    (never a wait) while a write holds the index or waits for it."""
    vectors = unit(rng, 300)
    with make(tmp_path, exact_search_max=0, fsync="off") as coll:
        coll.upsert(FP, [f"d{i}" for i in range(300)], vectors)
        query = vectors[7]
        free = coll.search(FP, query, k=5, wait=False)
        assert free is not None and free == coll.search(FP, query, k=5)
        assert free[0].id == "d7"
        assert coll.search(FP, query, k=5, ef=200, wait=False) is None  # ef needs the index alone
        holding, release = threading.Event(), threading.Event()

        def writer() -> None:
            with coll._rw.write():
                holding.set()
                release.wait(10)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            assert holding.wait(10)
            started = time.monotonic()
            assert coll.search(FP, query, k=5, wait=False) is None
            assert time.monotonic() - started < 0.5
        finally:
            release.set()
            thread.join(10)
        assert coll.search(FP, query, k=5, wait=False) == free


def test_batch_fsync_policy_syncs_within_the_window(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    calls: list[float] = []
    import edge_agent.index.wal as wal_module

    real = wal_module.fsync_fd
    window = 0.05

    def counting(fd: int) -> None:
        calls.append(time.monotonic())
        real(fd)

    with make(tmp_path, fsync="batch", batch_window_ms=int(window * 1000)) as coll:
        wal_module.fsync_fd = counting
        try:
            started = time.monotonic()
            for i in range(40):
                coll.upsert(FP, [f"d{i}"], unit(rng, 1))
            last_write = time.monotonic()
            deadline = last_write + 5
            while not [t for t in calls if t >= last_write] and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            wal_module.fsync_fd = real
    during = [t for t in calls if t < last_write]
    after = [t for t in calls if t >= last_write]
    # The last acknowledged write reached the disk within the window (slack for a busy box)...
    assert after and after[0] - last_write <= window + 0.5
    # ...and syncs were grouped: at most one per window, not one per write.
    assert len(during) <= (last_write - started) / window + 2


def test_index_store_lists_opens_once_and_drops(tmp_path: Path, rng: np.random.Generator) -> None:
    with IndexStore(tmp_path / "index") as store:
        assert store.names() == []
        first = store.create("notes", FP)
        assert store.open("notes") is first
        first.upsert(FP, ["a"], unit(rng, 1))
        store.get_or_create("mail", FP)
        assert store.names() == ["mail", "notes"]
        with pytest.raises(CollectionExists):
            store.create("notes", FP)
        with pytest.raises(InvalidArgument):
            store.open("../escape")
        with pytest.raises(CollectionNotFound):
            store.open("nothing")
        store.drop("mail")
        assert store.names() == ["notes"]
    with IndexStore(tmp_path / "index") as store:
        assert store.open("notes").count() == 1


def fake_embed(dim: int, calls: list[int]) -> Callable[[list[str]], np.ndarray]:
    def embed(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        rows = np.stack(
            [np.random.default_rng(zlib.crc32(t.encode())).standard_normal(dim) for t in texts]
        ).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    return embed


def test_reindex_switches_model_and_resumes(tmp_path: Path, rng: np.random.Generator) -> None:
    new = ModelFingerprint("bigger", "c" * 64, 32, "cls")
    calls: list[int] = []
    with make(tmp_path) as coll:
        coll.upsert(
            FP,
            [f"d{i}" for i in range(100)],
            unit(rng, 100),
            [f"text {i}" for i in range(100)],
            [{"i": i} for i in range(100)],
        )
        failing_after = 3

        def flaky(texts: list[str]) -> np.ndarray:
            if len(calls) >= failing_after:
                raise RuntimeError("model crashed")
            return fake_embed(32, calls)(texts)

        with pytest.raises(RuntimeError):
            coll.reindex(flaky, new, batch_size=10, show_progress=False)
        # The old index still serves, and stays pinned to the old model.
        assert coll.fingerprint == FP and coll.count() == 100
        assert coll.stats().reindex_pending
        coll.upsert(FP, ["late"], unit(rng, 1), ["late text"])  # a write during the reindex
        report = coll.reindex(fake_embed(32, calls), new, batch_size=10, show_progress=False)
        assert report.reused == 30 and report.embedded == 71
        assert coll.fingerprint == new and coll.dim == 32 and coll.count() == 101
        with pytest.raises(ModelMismatch):
            coll.search(FP, unit(rng, 1)[0])
        target = fake_embed(32, [])(["text 42"])[0]
        hit = coll.search(new, target, k=1)[0]
        assert hit.id == "d42" and hit.metadata == {"i": 42} and hit.score > 0.999
        assert not (coll.path / "reindex").exists()
    with Collection.open(tmp_path / "c") as coll:
        assert coll.fingerprint == new and coll.count() == 101
        assert coll.search(new, target, k=1)[0].id == "d42"
        coll.upsert(new, ["after"], unit(rng, 1, 32))
    with Collection.open(tmp_path / "c") as coll:
        assert coll.count() == 102


def test_reindex_needs_stored_text(tmp_path: Path, rng: np.random.Generator) -> None:
    with make(tmp_path) as coll:
        coll.upsert(FP, ["a", "b"], unit(rng, 2), ["text", None])
        with pytest.raises(InvalidArgument, match="no stored text"):
            coll.reindex(fake_embed(8, []), ModelFingerprint("x", "d" * 64, 8, "cls"))
        assert isinstance(InvalidArgument("x"), EdgeAgentError)


@pytest.mark.parametrize("snapshot_first", [False, True], ids=["busy-segment", "empty-segment"])
def test_reindex_cut_short_after_its_commit_opens_as_the_new_model(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, snapshot_first: bool
) -> None:
    from edge_agent.index import collection, recovering, reindexing, snapshotting

    new = ModelFingerprint("bigger", "c" * 64, 32, "cls")
    coll = make(tmp_path)
    coll.upsert(FP, [f"d{i}" for i in range(20)], unit(rng, 20), [f"text {i}" for i in range(20)])
    if snapshot_first:  # the current segment is then empty and carries the old identity
        coll.snapshot()
    real = reindexing.create_segment

    def power_cut(directory: Path, base: int, info: dict) -> Path:
        if info["fingerprint"]["model"] == "bigger" and directory == coll.path:
            raise OSError("power cut")
        return real(directory, base, info)

    # The collection's parts each write segments: every one of them loses power.
    for module in (collection, recovering, reindexing, snapshotting):
        monkeypatch.setattr(module, "create_segment", power_cut)
    with pytest.raises(OSError, match="power cut"):
        coll.reindex(fake_embed(32, []), new, show_progress=False)
    # The process "dies" here: no clean close, just the lock released.
    os.close(coll._lock_fd)  # type: ignore[arg-type]
    coll._lock_fd, coll._closed = None, True
    monkeypatch.undo()
    with Collection.open(tmp_path / "c") as coll:
        assert coll.fingerprint == new and coll.count() == 20
        target = fake_embed(32, [])(["text 3"])[0]
        assert coll.search(new, target, k=1)[0].id == "d3"
        assert not (coll.path / "reindex").exists()
        coll.upsert(new, ["more"], unit(rng, 1, 32))
    with Collection.open(tmp_path / "c") as coll:
        assert coll.count() == 21


def test_the_index_never_imports_the_embedder() -> None:
    import subprocess
    import sys

    code = (
        "import sys, edge_agent.index; "
        "heavy = ('llama_cpp', 'edge_agent.embedding.embedder', 'edge_agent.embedding.engine'); "
        "bad = [m for m in heavy if m in sys.modules]; "
        "sys.exit(repr(bad) if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
