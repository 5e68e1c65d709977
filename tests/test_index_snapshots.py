"""Background snapshots: the graph copy, writers not waiting for snapshot files, failures,
close, and SIGKILL at each stage of a background snapshot (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edge_agent.index.snapshotting as snapshotting_module  # noqa: E402
from edge_agent.index import Collection, IndexConfig, ModelFingerprint  # noqa: E402
from edge_agent.index.manifest import CollectionManifest  # noqa: E402
from edge_agent.index.snapshot import (  # noqa: E402
    GraphCopy,
    GraphFile,
    SnapshotState,
    pack_body,
    validate_snapshot,
)

DIM = 16
FP = ModelFingerprint("snap", "b" * 64, DIM, "mean")
WAIT = 20.0  # seconds: generous for a loaded CI box; a hang shows up as a failure, not forever


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def config(**changes: Any) -> IndexConfig:
    base: dict[str, Any] = {"snapshot_wal_records": 5, "exact_search_max": 0}
    base.update(changes)
    return IndexConfig(**base)


@pytest.mark.parametrize(("n", "dim", "m"), [(0, 8, 4), (1, 8, 4), (700, 16, 4), (2500, 24, 16)])
def test_graph_copy_writes_exactly_what_save_index_writes(
    tmp_path: Path, n: int, dim: int, m: int
) -> None:
    rng = np.random.default_rng(n)
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=2 * n + 4, M=m, ef_construction=40, allow_replace_deleted=True)
    if n:
        index.add_items(unit(rng, n, dim), np.arange(n))
        for label in range(0, n, 7):  # deleted slots carry a flag in the level-0 block
            index.mark_deleted(label)
    index.save_index(str(tmp_path / "then.hnsw"))
    copy = GraphCopy(index)
    # Changes after the copy (new elements, new links, a deletion) are not in it.
    index.add_items(unit(rng, 3, dim), np.arange(n, n + 3))
    index.mark_deleted(n + 1)
    copy.save_index(str(tmp_path / "copy.hnsw"))
    assert copy.element_count == n
    assert (tmp_path / "copy.hnsw").read_bytes() == (tmp_path / "then.hnsw").read_bytes()


def test_graph_copy_matches_the_live_index_file_byte_for_byte(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    index = hnswlib.Index(space="ip", dim=DIM)
    index.init_index(max_elements=3000, M=16, ef_construction=64, allow_replace_deleted=True)
    index.add_items(unit(rng, 2000), np.arange(2000))
    for label in range(0, 2000, 5):
        index.mark_deleted(label)
    index.add_items(unit(rng, 100), np.arange(2000, 2100), replace_deleted=True)
    index.save_index(str(tmp_path / "live.hnsw"))
    GraphCopy(index).save_index(str(tmp_path / "copy.hnsw"))
    assert (tmp_path / "copy.hnsw").read_bytes() == (tmp_path / "live.hnsw").read_bytes()


def test_snapshot_body_is_packed_in_pieces_to_the_same_bytes() -> None:
    import msgpack

    docs = [(f"d{i}", i, None if i % 3 else f"text {i}", {"i": i, "b": b"x"}) for i in range(500)]
    for state in (
        SnapshotState(9, 500, FP.to_json(), docs),
        SnapshotState(0, 0, FP.to_json(), []),
    ):
        whole = {
            "fingerprint": state.fingerprint,
            "next_label": state.next_label,
            "docs": [list(doc) for doc in state.docs],
        }
        # Chunks of 15 and 16 straddle msgpack's fixarray / array16 header sizes.
        for chunk in (1, 15, 16, 1024):
            assert pack_body(state, chunk) == msgpack.packb(whole, use_bin_type=True)


class Gate:
    """Holds the background snapshot inside write_snapshot until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = snapshotting_module.write_snapshot

        def gated(*args: Any, **kwargs: Any) -> int:
            self.threads.append(threading.current_thread().name)
            self.entered.set()
            assert self.release.wait(WAIT), "the test never released the snapshot"
            return real(*args, **kwargs)

        monkeypatch.setattr(snapshotting_module, "write_snapshot", gated)


def test_writers_and_searches_do_not_wait_for_a_background_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(11)
    vectors = unit(rng, 40)
    gate = Gate()
    gate.install(monkeypatch)
    coll = Collection.create(tmp_path / "c", FP, config())
    try:
        for i in range(5):  # the 5th crosses snapshot_wal_records
            coll.upsert(FP, [f"d{i}"], vectors[i])
        assert gate.entered.wait(WAIT)
        assert gate.threads[0].startswith("edge-agent-snapshot-")
        # The snapshot is stuck in its file writes: writes and searches still go through.
        for i in range(5, 30):
            coll.upsert(FP, [f"d{i}"], vectors[i])
        coll.delete(["d0"])
        assert coll.search(FP, vectors[29], k=1)[0].id == "d29"
        stats = coll.stats()
        assert stats.snapshot_running and stats.snapshot_gen is None and stats.lsn == 31
        gate.release.set()
        assert coll.wait_for_snapshot(WAIT)
        stats = coll.stats()
        # It covers LSN 5 (the capture); the 26 writes after it count toward the next one.
        assert stats.snapshot_lsn == 5 and stats.wal_records == 26
        assert not stats.snapshot_running and stats.snapshot_error is None
        manifest = CollectionManifest.load(coll.path)
        assert [ref.lsn for ref in manifest.snapshots] == [5]
        state, _, _ = validate_snapshot(coll.path, manifest.snapshots[0].gen, dim=DIM, m=16)
        assert sorted(doc[0] for doc in state.docs) == sorted(f"d{i}" for i in range(5))
    finally:
        gate.release.set()
        coll.close()
    with Collection.open(tmp_path / "c", config()) as coll:
        assert coll.count() == 29 and coll.lsn == 31


def test_close_waits_for_the_background_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(12)
    gate = Gate()
    gate.install(monkeypatch)
    coll = Collection.create(tmp_path / "c", FP, config(snapshot_on_close=False))
    for i in range(5):
        coll.upsert(FP, [f"d{i}"], unit(rng, 1))
    assert gate.entered.wait(WAIT)  # captured at LSN 5
    coll.delete(["d0", "d1"])
    coll.upsert(FP, ["e0"], unit(rng, 1))
    closer = threading.Thread(target=coll.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close() returned while a snapshot was still being written"
    gate.release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    manifest = CollectionManifest.load(tmp_path / "c")
    assert manifest.snapshots and manifest.snapshots[0].lsn == 5
    with Collection.open(tmp_path / "c", config()) as coll:  # LSN 6-7 from the WAL
        assert sorted(coll.ids()) == ["d2", "d3", "d4", "e0"] and coll.lsn == 7


def test_a_failed_background_snapshot_is_reported_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(13)
    vectors = unit(rng, 30)
    real = snapshotting_module.write_snapshot
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(snapshotting_module, "write_snapshot", flaky)
    monkeypatch.setattr(snapshotting_module, "SNAPSHOT_RETRY_S", 60.0)
    with Collection.create(tmp_path / "c", FP, config()) as coll:
        for i in range(5):
            coll.upsert(FP, [f"d{i}"], vectors[i])
        assert coll.wait_for_snapshot(WAIT)
        stats = coll.stats()
        assert "No space left" in (stats.snapshot_error or "") and stats.snapshot_gen is None
        # Within the retry delay no new attempt starts, whatever is written.
        coll.upsert(FP, ["d5"], vectors[5])
        assert coll.wait_for_snapshot(WAIT) and len(calls) == 1
        coll._snap_retry_at = 0.0  # as if the 60 s had passed
        coll.upsert(FP, ["d6"], vectors[6])
        assert coll.wait_for_snapshot(WAIT) and len(calls) == 2
        stats = coll.stats()
        assert stats.snapshot_error is None and stats.snapshot_lsn == 7 and stats.wal_records == 0
        assert not list(coll.path.glob("*.tmp")) and not list(coll.path.glob(".*.tmp"))
    with Collection.open(tmp_path / "c", config()) as coll:
        assert coll.count() == 7


def test_a_graph_too_big_to_copy_is_dumped_under_the_writer_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(14)
    made: list[str] = []

    class Spy(GraphFile):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append("dump")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(snapshotting_module, "GraphFile", Spy)
    vectors = unit(rng, 60)
    with Collection.create(tmp_path / "c", FP, config(snapshot_copy_max_bytes=0)) as coll:
        for start in range(0, 50, 10):
            ids = [f"d{i}" for i in range(start, start + 10)]
            coll.upsert(FP, ids, vectors[start : start + 10])
        assert coll.wait_for_snapshot(WAIT)
        assert made == ["dump"] and coll.stats().snapshot_lsn == 5
        coll.upsert(FP, [f"d{i}" for i in range(50, 60)], vectors[50:])
    with Collection.open(tmp_path / "c", config()) as coll:
        assert coll.count() == 60
        assert coll.search(FP, vectors[42], k=1)[0].id == "d42"


def test_many_background_snapshots_under_concurrent_writes_and_searches(tmp_path: Path) -> None:
    rng = np.random.default_rng(15)
    vectors = unit(rng, 400)
    model: dict[str, int] = {}
    errors: list[BaseException] = []
    stop = threading.Event()
    coll = Collection.create(
        tmp_path / "c", FP, config(snapshot_wal_records=7, fsync="off", keep_snapshots=2)
    )

    def search() -> None:
        try:
            while not stop.is_set():
                coll.search(FP, vectors[0], k=5)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    searcher = threading.Thread(target=search)
    searcher.start()
    try:
        for i in range(400):
            doc = f"d{i % 150}"
            if i % 9 == 8 and model:
                victim = next(iter(model))
                coll.delete([victim])
                del model[victim]
            else:
                coll.upsert(FP, [doc], vectors[i])
                model[doc] = i
    finally:
        stop.set()
        searcher.join()
    assert not errors
    assert coll.wait_for_snapshot(WAIT)
    stats = coll.stats()
    coll.close()
    # How many ran depends on the machine's speed; at least the first one committed.
    assert stats.snapshot_gen is not None and stats.snapshot_error is None
    with Collection.open(tmp_path / "c", config()) as coll:
        assert sorted(coll.ids()) == sorted(model)
        for doc, row in model.items():
            got = coll.get(doc, with_vector=True)
            assert got is not None and np.allclose(got.vector, vectors[row], atol=1e-6)  # type: ignore[arg-type]


# -- SIGKILL during a background snapshot -------------------------------------------------------


def kill_child(path: str, stage: str, marker: str, acks: str) -> None:
    """Writes forever; the first background snapshot stops at ``stage`` (and says so)."""
    import edge_agent.index.snapshot as snapshot_module

    def hang() -> None:
        Path(marker).write_text(stage)
        threading.Event().wait()  # until the parent's SIGKILL

    if stage == "writing":  # the graph file half written, nothing renamed
        real_save = snapshot_module.GraphCopy.save_index

        def half(self: GraphCopy, target: str) -> None:
            real_save(self, target)
            with open(target, "r+b") as handle:
                handle.truncate(os.path.getsize(target) // 2)
            hang()

        snapshot_module.GraphCopy.save_index = half  # type: ignore[method-assign]
    else:  # "renamed": snapshot files in place, manifest not yet written
        real_write = snapshotting_module.write_snapshot

        def written(*args: Any, **kwargs: Any) -> int:
            size = real_write(*args, **kwargs)
            hang()
            return size

        snapshotting_module.write_snapshot = written  # type: ignore[assignment]
    rng = np.random.default_rng(21)
    coll = Collection.open(Path(path), config(snapshot_wal_records=20))
    fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i in range(1_000_000):
        coll.upsert(FP, [f"d{i}"], unit(rng, 1), [f"t{i}"])
        os.write(fd, f"{i}\n".encode())  # acknowledged


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["writing", "renamed"])
def test_sigkill_during_a_background_snapshot_loses_nothing(tmp_path: Path, stage: str) -> None:
    path = tmp_path / "c"
    Collection.create(path, FP, config()).close()
    marker, acks = tmp_path / "marker", tmp_path / "acks"
    proc = subprocess.Popen(
        [sys.executable, __file__, "kill-child", str(path), stage, str(marker), str(acks)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            lines = acks.read_text().count("\n") if acks.exists() else 0
            if marker.exists() and lines >= 60:  # writes went on while the snapshot hung
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        assert marker.exists(), "the background snapshot never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()  # type: ignore[union-attr]
    acked = int(acks.read_text().split("\n")[:-1][-1]) + 1
    leftovers = sorted(p.name for p in path.iterdir() if p.name.startswith((".snap", "snap")))
    assert leftovers, "the killed snapshot left nothing behind: the test did not hit it"
    assert CollectionManifest.load(path).snapshots == ()  # never committed
    with Collection.open(path, config()) as coll:
        # Every acknowledged write is there (plus at most the one in flight), in the WAL.
        assert coll.count() in (acked, acked + 1)
        assert coll.get(f"d{acked - 1}") is not None
        assert not list(path.glob(".*.tmp")) and not list(path.glob("snap-*"))


if __name__ == "__main__" and sys.argv[1] == "kill-child":
    kill_child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
