"""Field faults (issue #12) on real collections on disk: vectors of extreme magnitude, a full
disk (a real, small tmpfs), reserved collection names, and what errors reveal."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from decimal import Decimal, localcontext
from pathlib import Path

import hnswlib
import numpy as np
import pytest
from disk import Filler, small_tmpfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.errors import CollectionNotFound, IndexFull, InvalidArgument
from edge_agent.index import Collection, IndexConfig, IndexStore, ModelFingerprint
from edge_agent.index.documents import normalize_vectors
from edge_agent.index.manifest import validate_new_collection_name
from edge_agent.index.snapshot import check_hnsw_complete

DIM = 16
FP = ModelFingerprint("faults", "c" * 64, DIM, "mean")
FP384 = ModelFingerprint("faults", "d" * 64, 384, "mean")

# Magnitudes float32 can hold, from the smallest subnormal to the largest finite value: the
# squares of those above ~1.8e19 overflow float32 and those below ~1e-23 underflow it.
MAGNITUDES = [
    1.4e-45,  # the smallest subnormal
    1e-44,
    1e-40,
    1.1754944e-38,  # the smallest normal
    1e-38,
    1e-30,
    1e-20,
    1e-10,
    1.0,
    1e10,
    1e19,
    1e20,
    1e30,
    3e38,
    3.4028235e38,  # the largest finite
]
component = st.one_of(
    st.just(0.0),
    st.builds(lambda m, s: m * s, st.sampled_from(MAGNITUDES), st.sampled_from([1.0, -1.0])),
    st.floats(width=32, allow_nan=False, allow_infinity=False),
)
extreme_vectors = (
    st.lists(component, min_size=DIM, max_size=DIM)
    .map(lambda xs: np.array(xs, dtype=np.float32))
    .filter(lambda v: bool(np.any(v != 0)))
)
PROPERTY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def reference_unit(vector: np.ndarray) -> np.ndarray:
    """The unit vector in exact decimal arithmetic: no float range to overflow."""
    with localcontext() as ctx:
        ctx.prec = 80
        exact = [Decimal(float(x)) for x in vector]
        norm = sum(x * x for x in exact).sqrt()
        return np.array([float(x / norm) for x in exact])


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# -- vectors of extreme magnitude ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: (
            np.eye(1, 384, 5, dtype=np.float32)[0] * np.float32(1e20)
            + np.eye(1, 384, 6, dtype=np.float32)[0]
        ),
        lambda: np.full(384, 3e38, dtype=np.float32),
        lambda: np.full(384, 3.4028235e38, dtype=np.float32),
        lambda: np.full(384, 1e-38, dtype=np.float32),
        lambda: np.full(384, 1.4e-45, dtype=np.float32),
        lambda: np.eye(1, 384, 0, dtype=np.float32)[0] * np.float32(-1e20),
    ],
    ids=["1e20-and-1", "3e38", "float32-max", "1e-38", "subnormal", "minus-1e20"],
)
def test_the_issue_vectors_are_stored_as_their_direction(tmp_path: Path, make: object) -> None:
    vector = make()  # type: ignore[operator]
    expected = reference_unit(vector)
    with Collection.create(tmp_path / "c", FP384) as coll:
        coll.upsert(FP384, ["x"], vector)
        stored = coll.get("x", with_vector=True)
        assert stored is not None and stored.vector is not None
        assert abs(float(np.linalg.norm(stored.vector)) - 1.0) < 1e-5  # was 0: all zeros
        np.testing.assert_allclose(stored.vector, expected, atol=1e-6)
        hits = coll.search(FP384, vector, k=1)
        assert hits[0].id == "x" and hits[0].score > 0.9999  # was 0
    with Collection.open(tmp_path / "c") as coll:  # and so it is in the WAL and the snapshot
        again = coll.get("x", with_vector=True)
        assert again is not None and np.allclose(again.vector, expected, atol=1e-6)  # type: ignore[arg-type]


@PROPERTY
@given(vector=extreme_vectors)
def test_normalize_gives_the_exact_direction_for_any_finite_nonzero_vector(
    vector: np.ndarray,
) -> None:
    out = normalize_vectors(vector, DIM)
    assert out.dtype == np.float32 and out.shape == (1, DIM)
    assert np.isfinite(out).all()
    assert abs(float(np.linalg.norm(out[0].astype(np.float64))) - 1.0) < 1e-5
    np.testing.assert_allclose(out[0], reference_unit(vector), atol=1e-6)


@pytest.mark.parametrize("magnitude", [1e300, 1e-300, 5e-324])
def test_float64_input_beyond_float32_range_keeps_its_direction(magnitude: float) -> None:
    vector = np.zeros(DIM)
    vector[[2, 7]] = magnitude, -magnitude
    out = normalize_vectors(vector, DIM)[0]
    expected = np.zeros(DIM)
    expected[[2, 7]] = 2**-0.5, -(2**-0.5)
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_add_and_search_keep_the_direction_of_extreme_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    with Collection.create(tmp_path / "c", FP, IndexConfig(snapshot_wal_records=50)) as coll:
        coll.upsert(FP, [f"base{i}" for i in range(40)], unit(rng, 40))
        counter = itertools.count()

        @PROPERTY
        @given(vector=extreme_vectors)
        def check(vector: np.ndarray) -> None:
            expected = reference_unit(vector)
            doc_id = f"x{next(counter)}"
            lsn = coll.upsert(FP, [doc_id], vector)
            stored = coll.get(doc_id, with_vector=True)
            assert stored is not None and stored.vector is not None
            np.testing.assert_allclose(stored.vector, expected, atol=1e-6)
            # Search by the extreme vector ranks exactly as search by its unit direction.
            raw = coll.search(FP, vector, k=5)
            normal = coll.search(FP, expected.astype(np.float32), k=5)
            assert raw[0].score > 0.9999
            np.testing.assert_allclose([h.score for h in raw], [h.score for h in normal], atol=1e-5)
            assert coll.lsn == lsn

        check()
        count = coll.count()
    with Collection.open(tmp_path / "c") as coll:
        assert coll.count() == count
        for doc_id in coll.ids():
            doc = coll.get(doc_id, with_vector=True)
            assert doc is not None and abs(float(np.linalg.norm(doc.vector)) - 1) < 1e-5  # type: ignore[arg-type]


bad_rows = st.tuples(
    st.integers(0, 2),
    st.integers(0, DIM - 1),
    st.sampled_from(["zero", float("nan"), float("inf"), float("-inf")]),
)


def test_unusable_vectors_are_refused_by_index_and_nothing_is_stored(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    with Collection.create(tmp_path / "c", FP) as coll:
        coll.upsert(FP, ["keep"], unit(rng, 1))

        @PROPERTY
        @given(bad=bad_rows, scale=st.sampled_from(MAGNITUDES))
        def check(bad: tuple[int, int, object], scale: float) -> None:
            row, column, kind = bad
            batch = unit(rng, 3) * np.float32(scale)
            batch[:, 0] = np.float32(scale)  # no row may underflow to zero but the bad one
            if kind == "zero":
                batch[row] = 0.0
            else:
                batch[row, column] = kind  # type: ignore[assignment]
            lsn = coll.lsn
            with pytest.raises(InvalidArgument) as info:
                coll.upsert(FP, ["a", "b", "c"], batch)
            assert f"vectors[{row}]" in info.value.message
            assert info.value.data["index"] == row
            assert coll.lsn == lsn and sorted(coll.ids()) == ["keep"]
            with pytest.raises(InvalidArgument) as info:
                coll.search(FP, batch[row], k=1)
            assert "vector[0]" in info.value.message and info.value.data["index"] == 0

        check()


# -- reserved names, and what errors reveal -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("LOCK", "reserved_file_name"),
        ("lock", "reserved_file_name"),
        ("index", "reserved_file_name"),
        ("Index", "reserved_file_name"),
        ("manifest", "reserved_file_name"),
        ("manifest.json", "reserved_file_name"),
        ("reindex", "reserved_file_name"),
        ("notes.tmp", "reserved_file_name"),
        ("notes.corrupt", "reserved_file_name"),
        ("quarantine-1", "reserved_file_name"),
        ("wal-00000000000000000001.log", "reserved_file_name"),
        ("snap-0000000001.hnsw", "reserved_file_name"),
        ("CON", "device_name"),
        ("con", "device_name"),
        ("Prn", "device_name"),
        ("aux", "device_name"),
        ("NUL", "device_name"),
        ("COM1", "device_name"),
        ("com9", "device_name"),
        ("LPT1", "device_name"),
        ("lpt9", "device_name"),
        ("con.txt", "device_name"),
        ("nul.tar.gz", "device_name"),
        ("notes.", "trailing_dot"),
    ],
)
def test_reserved_collection_names_are_refused_with_the_rule(
    tmp_path: Path, name: str, rule: str
) -> None:
    with IndexStore(tmp_path / "index") as store:
        with pytest.raises(InvalidArgument) as info:
            store.create(name, FP)
        assert info.value.data["rule"] == rule and name in info.value.message
        with pytest.raises(InvalidArgument):
            store.get_or_create(name, FP)
        assert store.names() == [] and not (tmp_path / "index" / name).exists()


@pytest.mark.parametrize(
    "name", ["console", "com10", "lpt", "conn", "index2", "locks", "my.notes", "wal-mart", "a"]
)
def test_ordinary_names_that_look_close_are_accepted(tmp_path: Path, name: str) -> None:
    assert validate_new_collection_name(name) == name
    with IndexStore(tmp_path) as store:
        store.create(name, FP)
        assert store.names() == [name]


def test_a_collection_made_before_the_rule_still_opens(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    with Collection.create(tmp_path / "index", FP) as coll:  # made without the store's rule
        coll.upsert(FP, ["a"], unit(rng, 1))
    with IndexStore(tmp_path) as store:
        assert store.names() == ["index"]
        assert store.open("index").count() == 1
        assert store.get_or_create("index", FP).count() == 1


def test_collection_not_found_names_neither_the_root_nor_other_collections(
    tmp_path: Path,
) -> None:
    with IndexStore(tmp_path / "secret-root") as store:
        store.create("private-notes", FP)
        with pytest.raises(CollectionNotFound) as info:
            store.open("missing")
        text = f"{info.value.message} {info.value.data}"
        assert "missing" in text
        assert "secret-root" not in text and "private-notes" not in text
        assert os.sep not in info.value.message


# -- a full disk (a real tmpfs) -----------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "disk") as mount:
        yield mount


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_full_disk_is_index_full_on_every_write_path_and_loses_nothing(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(5)
    filler = Filler(disk)
    config = IndexConfig(snapshot_in_background=False, snapshot_wal_records=1_000_000)
    store = IndexStore(disk / "index", config)
    coll = store.create("notes", FP)
    filler.fill(leave=96 << 10)
    acknowledged: dict[str, np.ndarray] = {}
    failure: IndexFull | None = None
    for batch in range(2000):
        ids = [f"d{batch}-{i}" for i in range(20)]
        vectors = unit(rng, 20)
        try:
            coll.upsert(FP, ids, vectors, [f"text {i} " * 20 for i in range(20)])
        except IndexFull as exc:
            failure = exc
            break
        acknowledged.update(zip(ids, vectors, strict=True))
    assert failure is not None and acknowledged, "the disk never filled up"
    assert failure.data["reason"] == "disk_full" and "disk full" in failure.message
    assert str(disk) not in f"{failure.message} {failure.data}"
    assert coll.count() == len(acknowledged)  # the failed write left nothing behind
    filler.fill()  # and whatever that write did not need: every new page is refused now

    # Every other write path says INDEX_FULL too, never a raw OSError.
    with pytest.raises(IndexFull):
        store.create("other", FP)
    assert sorted(p.name for p in (disk / "index").iterdir()) == ["notes"]  # no temp dir left
    with pytest.raises(IndexFull):
        coll.snapshot()
    assert "disk full" in (coll.stats().snapshot_error or "")
    assert str(disk) not in (coll.stats().snapshot_error or "")
    with pytest.raises(IndexFull):
        coll.compact()
    with pytest.raises(IndexFull):
        coll.upsert(FP, ["big"], unit(rng, 1), ["x" * 20_000])
    assert coll.count() == len(acknowledged)

    # Closing on the full disk: its snapshot fails, one log line, no exception.
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        store.close()
    logged = errors_logged(caplog)
    assert len(logged) == 1 and "snapshot on close failed" in logged[0], logged
    assert "nothing is lost" in logged[0]

    # Reopened on the still-full disk: every acknowledged write, from the WAL.
    with IndexStore(disk / "index", config) as store:
        coll = store.open("notes")
        assert coll.count() == len(acknowledged)
        for doc_id in list(acknowledged)[:: max(1, len(acknowledged) // 25)]:
            doc = coll.get(doc_id, with_vector=True)
            assert doc is not None and np.allclose(doc.vector, acknowledged[doc_id], atol=1e-6)  # type: ignore[arg-type]
        # Space again: every path works, and the snapshot error clears.
        filler.free()
        coll.upsert(FP, ["after"], unit(rng, 1))
        assert store.create("other", FP).count() == 0
        assert coll.snapshot() is not None and coll.stats().snapshot_error is None
        coll.compact()
    with IndexStore(disk / "index", config) as store:
        assert store.open("notes").count() == len(acknowledged) + 1


@pytest.mark.parametrize("copy_max", [1 << 30, 0], ids=["graph-copy", "hnswlib-dump"])
def test_a_snapshot_that_does_not_fit_fails_cleanly_and_is_retried(
    disk: Path, caplog: pytest.LogCaptureFixture, copy_max: int
) -> None:
    """Room for writes but not for a snapshot: writes go on, the snapshot says INDEX_FULL and
    leaves no file behind, close logs one line, and with keep_snapshots=1 nothing is lost."""
    rng = np.random.default_rng(9)
    filler = Filler(disk)
    config = IndexConfig(
        snapshot_in_background=False,
        snapshot_wal_records=1_000_000,
        snapshot_copy_max_bytes=copy_max,
        keep_snapshots=1,
    )
    vectors = unit(rng, 700)
    with Collection.create(disk / "c", FP, config) as coll:
        coll.upsert(FP, [f"d{i}" for i in range(600)], vectors[:600])
        assert coll.snapshot() == 1
        coll.upsert(FP, [f"d{i}" for i in range(600, 700)], vectors[600:])
        filler.fill(leave=24 << 10)  # the graph of 700 x 16-d is ~100 KiB
        before = sorted(p.name for p in coll.path.iterdir())
        with pytest.raises(IndexFull):
            coll.snapshot()
        # Nothing half-written stays behind (a new WAL segment may have started).
        after = sorted(p.name for p in coll.path.iterdir())
        assert not [n for n in after if n.endswith(".tmp")]
        assert [n for n in after if n.startswith("snap-")] == [
            n for n in before if n.startswith("snap-")
        ]
        assert coll.stats().snapshot_gen == 1 and coll.stats().snapshot_error
        coll.upsert(FP, ["small"], vectors[:1])  # writes still fit
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            coll.close()
        assert len(errors_logged(caplog)) == 1
    with Collection.open(disk / "c", config) as coll:
        assert coll.count() == 701
        doc = coll.get("d650", with_vector=True)
        assert doc is not None and np.allclose(doc.vector, vectors[650], atol=1e-6)  # type: ignore[arg-type]
        filler.free()
        assert coll.snapshot() is not None and coll.stats().snapshot_error is None
    with Collection.open(disk / "c", config) as coll:
        assert coll.count() == 701 and coll.stats().snapshot_gen == 2


def test_a_short_hnswlib_graph_file_is_refused(tmp_path: Path) -> None:
    """hnswlib's save_index ignores write errors; the check catches every short file."""
    rng = np.random.default_rng(2)
    index = hnswlib.Index(space="ip", dim=DIM)
    index.init_index(max_elements=600, M=4, ef_construction=40)
    index.add_items(unit(rng, 500), np.arange(500))
    whole = tmp_path / "g.hnsw"
    index.save_index(str(whole))
    check_hnsw_complete(whole, 500)
    data = whole.read_bytes()
    level0_end = 96 + 500 * (4 + 8 * 4 + 4 * DIM + 8)
    assert level0_end < len(data) - 4  # there are upper-level link lists to cut into
    for size in (0, 50, 96, level0_end - 1, level0_end + 2, len(data) - 1):
        short = tmp_path / f"short-{size}.hnsw"
        short.write_bytes(data[:size])
        with pytest.raises(OSError):
            check_hnsw_complete(short, 500)
    with pytest.raises(OSError):
        check_hnsw_complete(whole, 499)  # not the graph that was meant
