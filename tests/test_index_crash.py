"""Crash safety with real processes: a writer is killed with SIGKILL at random points of a long
add/upsert/delete stream (snapshots, WAL rotation and compaction included), many times.

After each kill the parent reopens the collection and checks: every acknowledged write is
there, the one in flight is either wholly there or wholly absent, and the hnswlib graph and
the id map agree. The child reports a write on the ack file only AFTER the call returned.

Default: ~10 kills. EDGE_AGENT_SOAK=1 (``make soak``): hundreds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.index import Collection, IndexConfig, ModelFingerprint  # noqa: E402

DIM = 8
POOL = 150  # ids: small, so upserts replace and deletes hit
FP = ModelFingerprint("crash", "e" * 64, DIM, "mean")
SOAK = os.environ.get("EDGE_AGENT_SOAK") == "1"
KILLS = 300 if SOAK else 10
MAX_OPS = 1_000_000  # the child's loop bound; a kill always comes long before


def config(fsync: str) -> IndexConfig:
    # Tiny thresholds so kills land in snapshots, rotations, resizes and compactions too.
    return IndexConfig(
        fsync=fsync,
        batch_window_ms=5,
        snapshot_wal_records=37,
        keep_snapshots=2,
        exact_search_max=40,
        initial_capacity=16,
        compact_deleted_ratio=0.3,
    )


def op_for(seed: int, i: int) -> tuple[str, Any]:
    """Operation i of the stream: a pure function, so parent and child agree."""
    rng = np.random.default_rng([seed, i])
    kind = rng.random()
    if kind < 0.6:
        n = int(rng.integers(1, 12))
        ids = [f"doc-{j}" for j in rng.choice(POOL, size=n, replace=False)]
        vectors = rng.standard_normal((n, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        texts = [f"text {i}/{j}" if j % 3 else None for j in range(n)]
        metadata = [{"op": i, "pos": j, "even": j % 2 == 0} for j in range(n)]
        return "upsert", (ids, vectors, texts, metadata)
    if kind < 0.9:
        n = int(rng.integers(1, 8))
        return "delete", [f"doc-{j}" for j in rng.choice(POOL, size=n, replace=False)]
    if kind < 0.97:
        return "snapshot", None
    return "compact", None


Model = dict[str, tuple[np.ndarray, str | None, dict]]


def model_after(seed: int, count: int, start: int = 0, base: Model | None = None) -> Model:
    """The state after ops [0, count): ``base`` is the state after ``start`` ops, if known."""
    model: Model = dict(base or {})
    for i in range(start, count):
        kind, arg = op_for(seed, i)
        if kind == "upsert":
            ids, vectors, texts, metadata = arg
            for j, doc_id in enumerate(ids):
                model[doc_id] = (vectors[j], texts[j], metadata[j])
        elif kind == "delete":
            for doc_id in arg:
                model.pop(doc_id, None)
    return model


def child(path: str, seed: int, start: int, acks: str, fsync: str) -> None:
    coll = Collection.open(Path(path), config(fsync))
    fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i in range(start, start + MAX_OPS):
        kind, arg = op_for(seed, i)
        if kind == "upsert":
            coll.upsert(FP, *arg)
        elif kind == "delete":
            coll.delete(arg)
        elif kind == "snapshot":
            coll.snapshot()
        else:
            coll.compact()
        os.write(fd, f"{i}\n".encode())  # acknowledged: the call has returned


def read_acks(path: Path) -> list[int]:
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")[:-1]  # a torn last line (no newline) is no ack
    return [int(line) for line in lines]


def state_of(coll: Collection) -> dict[str, tuple[np.ndarray, str | None, dict]]:
    out = {}
    for doc_id in coll.ids():
        doc = coll.get(doc_id, with_vector=True)
        assert doc is not None and doc.vector is not None
        out[doc_id] = (doc.vector, doc.text, doc.metadata)
    return out


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(np.allclose(a[k][0], b[k][0], atol=1e-6) and a[k][1:] == b[k][1:] for k in a)


def check_graph_matches_id_map(coll: Collection) -> None:
    memory = coll._mem()
    labels = set(memory.by_label)
    graph = set(int(x) for x in memory.index.get_ids_list())
    assert labels <= graph, "a live document has no graph entry"
    for label in graph - labels:  # every other graph label must be a deleted slot
        with pytest.raises(RuntimeError):
            memory.index.get_items([label])
    assert memory.elements - memory.deleted_slots == len(labels) == coll.count()
    for doc_id, doc in memory.docs.items():
        assert memory.by_label[doc.label] == doc_id
    if coll.count():
        # Every document is its own nearest neighbour through the real search path.
        for doc_id in list(memory.docs)[:: max(1, coll.count() // 10)]:
            vector = coll.get(doc_id, with_vector=True).vector  # type: ignore[union-attr]
            assert coll.search(FP, vector, k=1)[0].score > 0.9999


def run_child(path: Path, seed: int, start: int, acks: Path, fsync: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "child", str(path), str(seed), str(start), str(acks), fsync],
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_sigkill_during_writes_loses_no_acknowledged_write(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    path = tmp_path / "coll"
    Collection.create(path, FP, config("always")).close()
    applied = 0  # ops wholly applied so far
    known: Model = {}  # the state after them
    kills = 0
    began = time.monotonic()
    for round_no in range(KILLS):
        fsync = ("always", "batch", "off")[round_no % 3]
        acks = tmp_path / f"acks-{round_no}"
        proc = run_child(path, seed, applied, acks, fsync)
        # Let it get going (startup + recovery), then kill it at a random moment.
        deadline = time.monotonic() + 60
        while not read_acks(acks) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"child died on its own: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
        time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()  # type: ignore[union-attr]
        kills += 1
        acked = read_acks(acks)
        assert acked == list(range(applied, applied + len(acked))), "acks out of order"
        done = applied + len(acked)
        with Collection.open(path, config("always")) as coll:
            state = state_of(coll)
            check_graph_matches_id_map(coll)
        # Acknowledged writes are all there; the one in flight is all there or not at all.
        expected = model_after(seed, done, applied, known)
        in_flight = model_after(seed, done + 1, done, expected)
        if same(state, expected):
            applied, known = done, expected
        elif same(state, in_flight):
            applied, known = done + 1, in_flight
        else:
            missing = sorted(expected.keys() - state.keys())[:5]
            extra = sorted(state.keys() - expected.keys())[:5]
            pytest.fail(
                f"seed {seed} round {round_no} ({fsync}): state after {done} acked ops matches"
                f" neither {done} nor {done + 1} ops; missing {missing}, extra {extra}"
            )
    assert kills == KILLS
    assert applied > KILLS, "the writer made almost no progress between kills"
    print(f"{kills} kills, {applied} ops, {time.monotonic() - began:.1f}s, seed {seed}")


def reindex_child(path: str) -> None:
    coll = Collection.open(Path(path), config("always"))
    new = ModelFingerprint("crash-new", "f" * 64, DIM, "cls")

    def slow_embed(texts: list[str]) -> np.ndarray:
        time.sleep(0.02)  # a real model takes a while: leaves room for the kill
        return np.stack(
            [np.random.default_rng(zlib.crc32(t.encode())).standard_normal(DIM) for t in texts]
        )

    report = coll.reindex(slow_embed, new, batch_size=5, show_progress=False)
    coll.close()
    print(json.dumps({"reused": report.reused, "embedded": report.embedded}))


@pytest.mark.slow
def test_sigkill_during_reindex_keeps_the_old_index_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "coll"
    rng = np.random.default_rng(7)
    with Collection.create(path, FP, config("always")) as coll:
        vectors = rng.standard_normal((300, DIM)).astype(np.float32)
        coll.upsert(FP, [f"d{i}" for i in range(300)], vectors, [f"t{i}" for i in range(300)])
    proc = subprocess.Popen(
        [sys.executable, __file__, "reindex", str(path)], cwd=ROOT, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    shadow_docs = 0
    while proc.poll() is None and time.monotonic() < deadline:
        wal = sorted((path / "reindex").glob("wal-*.log"))
        if wal and wal[-1].stat().st_size > 2000:  # some batches are in the new index
            break
        time.sleep(0.02)
    assert proc.poll() is None, "reindex finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with Collection.open(path, config("always")) as coll:
        assert coll.fingerprint == FP and coll.count() == 300  # the old index, untouched
        assert coll.stats().reindex_pending
        shadow = Collection.open(path / "reindex", config("always"))
        shadow_docs = shadow.count()
        shadow.close()
    assert 0 < shadow_docs < 300
    proc = subprocess.run(
        [sys.executable, __file__, "reindex", str(path)], cwd=ROOT, capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    report = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    # Resumed: what the killed run had embedded is not embedded again.
    assert report == {"reused": shadow_docs, "embedded": 300 - shadow_docs}
    with Collection.open(path, config("always")) as coll:
        assert coll.fingerprint.model == "crash-new" and coll.count() == 300
        doc = coll.get("d7", with_vector=True)
        assert doc is not None and doc.text == "t7"
        expected = np.random.default_rng(zlib.crc32(b"t7")).standard_normal(DIM)
        assert np.allclose(doc.vector, expected / np.linalg.norm(expected), atol=1e-6)
        assert not (path / "reindex").exists()


if __name__ == "__main__":
    if sys.argv[1] == "child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    elif sys.argv[1] == "reindex":
        reindex_child(sys.argv[2])
