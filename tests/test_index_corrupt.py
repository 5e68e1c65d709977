"""Damaged files: truncated or flipped snapshots, crafted headers, torn and corrupt WALs, stray
temporary files, a lost manifest. Each gives recovery from the WAL or a typed error naming the
repair command; never a crash, never silently lost data. Then check and repair."""

from __future__ import annotations

import logging
import os
import random
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import IndexBusy, IndexCorrupt
from edge_agent.index import (
    Collection,
    IndexConfig,
    ModelFingerprint,
    check_collection,
    repair_collection,
)
from edge_agent.index.snapshot import snapshot_paths
from edge_agent.index.wal import RECORD_HEADER, SegmentReader, encode_record

DIM = 8
FP = ModelFingerprint("corrupt", "c" * 64, DIM, "mean")
META = struct.Struct("<8sIIQQQQIIQIQII")
Model = dict[str, np.ndarray]


def cfg(**changes: object) -> IndexConfig:
    # Synchronous snapshots, so they land at known LSNs (10, 20, 30...).
    base: dict[str, object] = {
        "snapshot_wal_records": 10,
        "exact_search_max": 0,
        "snapshot_in_background": False,
    }
    base.update(changes)
    return IndexConfig(**base)  # type: ignore[arg-type]


def populate(path: Path, writes: int, **changes: object) -> Model:
    """``writes`` single-document upserts (some replacing, every 5th a delete); the model."""
    rng = np.random.default_rng(99)
    model: Model = {}
    coll = Collection.create(path, FP, cfg(**changes))
    for i in range(writes):
        if i % 5 == 4:
            victim = f"d{i - 3}"
            coll.delete([victim])
            model.pop(victim, None)
            continue
        doc_id = f"d{i % 40}"
        vector = rng.standard_normal(DIM).astype(np.float32)
        vector /= np.linalg.norm(vector)
        coll.upsert(FP, [doc_id], vector, [f"text {i}"], [{"i": i}])
        model[doc_id] = vector
    # Close without the closing snapshot, so the WAL holds writes after the last snapshot.
    coll.config = replace(coll.config, snapshot_on_close=False)
    coll.close()
    return model


def assert_content(path: Path, model: Model, **changes: object) -> None:
    with Collection.open(path, cfg(**changes)) as coll:
        assert sorted(coll.ids()) == sorted(model)
        for doc_id, vector in model.items():
            doc = coll.get(doc_id, with_vector=True)
            assert doc is not None and np.allclose(doc.vector, vector, atol=1e-6)  # type: ignore[arg-type]
            assert coll.search(FP, vector, k=1)[0].id == doc_id


def newest_gen(path: Path) -> int:
    return max(int(p.name[5:15]) for p in path.glob("snap-*.meta"))


def last_segment(path: Path) -> Path:
    return sorted(path.glob("wal-*.log"))[-1]


def record_offsets(segment: Path) -> list[int]:
    with SegmentReader(segment) as reader:
        return [offset for offset, _ in reader.records()]


# -- snapshots ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["hnsw", "meta"])
@pytest.mark.parametrize("damage", ["empty", "header-only", "random-cut", "flipped-byte"])
def test_damaged_newest_snapshot_recovers_from_the_previous_plus_wal(
    tmp_path: Path, suffix: str, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c"
    model = populate(path, 37)  # snapshots at LSN 10, 20, 30; WAL kept from LSN 21
    gen = newest_gen(path)
    target = snapshot_paths(path, gen)[0 if suffix == "hnsw" else 1]
    data = bytearray(target.read_bytes())
    rnd = random.Random(f"{suffix}{damage}")
    if damage == "empty":
        data = bytearray()
    elif damage == "header-only":
        data = data[: 96 if suffix == "hnsw" else META.size]
    elif damage == "random-cut":
        data = data[: rnd.randrange(1, len(data))]
    else:
        data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
    target.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="edge_agent.index"):
        assert_content(path, model)
    assert "nothing lost" in caplog.text
    assert target.with_name(target.name + ".corrupt").exists()  # kept for inspection
    assert check_collection(path).ok


def test_damaged_only_snapshot_falls_back_to_the_whole_wal(tmp_path: Path) -> None:
    path = tmp_path / "c"
    model = populate(path, 14)  # one snapshot (LSN 10); the WAL still starts at LSN 1
    snapshot_paths(path, 1)[0].write_bytes(b"")
    assert_content(path, model)


def test_without_a_fallback_it_refuses_then_repair_reports_the_loss(tmp_path: Path) -> None:
    path = tmp_path / "c"
    model = populate(path, 37, keep_snapshots=1)
    snapshot_paths(path, newest_gen(path))[1].write_bytes(b"EASNAP\r\n")
    with pytest.raises(IndexCorrupt, match="edge-agent index repair") as info:
        Collection.open(path, cfg(keep_snapshots=1))
    assert "no usable snapshot" in info.value.message
    report = check_collection(path)
    assert not report.ok and "repair" in report.summary()
    repaired = repair_collection(path)
    assert repaired.changed and repaired.lost_lsns == [(1, 30)]  # the snapshot held those
    assert "NOT recovered" in repaired.summary()
    assert Path(repaired.quarantine or "").is_dir()
    with Collection.open(path, cfg()) as coll:
        assert coll.lsn == 37
        assert set(coll.ids()) <= set(model) | {f"d{i}" for i in range(40)}
    assert check_collection(path).ok


def rewrite_meta(meta: Path, hnsw: Path | None = None, **fields: int) -> None:
    """Craft a snapshot whose checksums are all valid (a hostile or buggy writer)."""
    data = bytearray(meta.read_bytes())
    names = [
        "magic", "version", "dim", "lsn", "count", "elements", "next_label", "m",
        "ef_construction", "hnsw_size", "hnsw_crc", "body_size", "body_crc", "header_crc",
    ]  # fmt: skip
    values = dict(zip(names, META.unpack_from(data), strict=True))
    values.update(fields)
    if hnsw is not None:
        blob = hnsw.read_bytes()
        values["hnsw_size"], values["hnsw_crc"] = len(blob), zlib.crc32(blob)
    head = META.pack(*[values[n] for n in names])[:-4]
    data[: META.size] = head + struct.pack("<I", zlib.crc32(head))
    meta.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "craft",
    ["wrong-dim", "huge-element-count", "neighbour-out-of-range", "bad-link-list-size"],
)
def test_crafted_snapshot_is_rejected_before_hnswlib_sees_it(tmp_path: Path, craft: str) -> None:
    path = tmp_path / "c"
    model = populate(path, 14, keep_snapshots=1)  # keep=1: no fallback, so the error shows
    hnsw, meta = snapshot_paths(path, newest_gen(path))
    blob = bytearray(hnsw.read_bytes())
    if craft == "wrong-dim":
        rewrite_meta(meta, dim=DIM * 2)
        expected = "dimension"
    elif craft == "huge-element-count":
        struct.pack_into("<QQ", blob, 8, 1 << 40, 1 << 40)  # max_elements, cur_element_count
        hnsw.write_bytes(bytes(blob))
        rewrite_meta(meta, hnsw)
        expected = "cur_element_count"
    elif craft == "neighbour-out-of-range":
        struct.pack_into("<I", blob, 96 + 4, 10**6)  # element 0's first level-0 neighbour
        hnsw.write_bytes(bytes(blob))
        rewrite_meta(meta, hnsw)
        expected = "out of range"
    else:
        blob += struct.pack("<I", 7) + b"\0" * 7
        hnsw.write_bytes(bytes(blob))
        rewrite_meta(meta, hnsw)
        expected = "link list|unexpected bytes"
    with pytest.raises(IndexCorrupt, match=expected):
        Collection.open(path, cfg(keep_snapshots=1))
    # The snapshot held LSN 1-10 and, with keep=1, is the only copy: repair says so.
    report = repair_collection(path)
    assert report.changed and report.lost_lsns == [(1, 10)]
    with Collection.open(path, cfg()) as coll:
        assert coll.count() <= len(model)


# -- the WAL -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["mid-header", "mid-payload", "garbage-tail", "zero-filled"])
def test_torn_wal_tail_is_cut_and_logged(
    tmp_path: Path, cut: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c"
    model = populate(path, 13)  # LSN 11-13 live in the last segment
    segment = last_segment(path)
    offsets = record_offsets(segment)
    data = segment.read_bytes()
    good = data
    if cut == "mid-header":
        good, data = data[: offsets[-1]], data[: offsets[-1] + 5]
    elif cut == "mid-payload":
        good, data = data[: offsets[-1]], data[: offsets[-1] + RECORD_HEADER.size + 10]
    elif cut == "garbage-tail":
        data = data + b"\x13\x37" * 50
    else:  # the filesystem extended the file but the data never landed
        data = data + b"\0" * 4096
    segment.write_bytes(data)
    if cut in ("mid-header", "mid-payload"):
        # The torn record was never acknowledged (it was d12's upsert at LSN 13).
        del model["d12"]
    with caplog.at_level(logging.WARNING, logger="edge_agent.index"):
        assert_content(path, model)
    assert "torn WAL tail" in caplog.text
    assert segment.read_bytes()[: len(good)] == good


def test_corrupt_record_in_the_middle_refuses_then_repair_skips_only_it(tmp_path: Path) -> None:
    path = tmp_path / "c"
    model = populate(path, 9)  # no snapshot yet: LSN 1-9 in one segment
    segment = last_segment(path)
    offsets = record_offsets(segment)
    data = bytearray(segment.read_bytes())
    data[offsets[2] + RECORD_HEADER.size + 3] ^= 0xFF  # inside LSN 3 (d2's upsert)
    segment.write_bytes(bytes(data))
    with pytest.raises(IndexCorrupt, match="in the middle") as info:
        Collection.open(path, cfg())
    assert "edge-agent index repair" in info.value.message
    assert segment.read_bytes() == bytes(data)  # refused means untouched
    report = check_collection(path)
    assert not report.ok and any("in the middle" in p for p in report.problems)
    repaired = repair_collection(path)
    assert repaired.lost_lsns == [(3, 3)]
    quarantined = list(Path(repaired.quarantine or "").iterdir())
    assert any(p.name.endswith(".bad") for p in quarantined)
    del model["d2"]
    assert_content(path, model)


def test_crafted_record_with_valid_crc_but_wrong_dimension(tmp_path: Path) -> None:
    path = tmp_path / "c"
    populate(path, 3)
    import msgpack

    payload = msgpack.packb([4, [[0, "x", b"\0" * (4 * DIM + 4), None, {}]]], use_bin_type=True)
    with last_segment(path).open("ab") as handle:
        handle.write(encode_record(payload))
    with pytest.raises(IndexCorrupt, match="float32"):
        Collection.open(path, cfg())


def test_missing_segment_is_a_gap_not_silence(tmp_path: Path) -> None:
    path = tmp_path / "c"
    populate(path, 25)  # segments from LSN 11 and 21 (snapshots at 10 and 20)
    segments = sorted(path.glob("wal-*.log"))
    assert len(segments) == 2
    segments[0].unlink()
    with pytest.raises(IndexCorrupt, match="gap"):
        Collection.open(path, cfg())


# -- other files -------------------------------------------------------------------------------


def test_stray_temporary_files_are_removed_at_open(tmp_path: Path) -> None:
    path = tmp_path / "c"
    model = populate(path, 12)
    strays = [
        path / ".snap-0000000009.hnsw.tmp",
        path / ".snap-0000000009.meta.tmp",
        path / ".manifest.json.4242.tmp",
        path / ".wal-00000000000000000099.log.tmp",
        path / "snap-0000000042.meta",  # an interrupted snapshot, never pinned
    ]
    for stray in strays:
        stray.write_bytes(os.urandom(100))
    report = check_collection(path)
    assert report.ok and len(report.warnings) == len(strays)
    assert_content(path, model)
    assert not any(s.exists() for s in strays)


def test_flipped_manifest_is_refused_and_repair_rebuilds_it(tmp_path: Path) -> None:
    path = tmp_path / "c"
    model = populate(path, 15)
    manifest = path / "manifest.json"
    text = manifest.read_text().replace('"wal_from": 1', '"wal_from": 2')
    manifest.write_text(text)
    with pytest.raises(IndexCorrupt, match="checksum"):
        Collection.open(path, cfg())
    report = repair_collection(path)
    assert report.changed and report.lost_lsns == []
    assert any("identity taken from other files" in a for a in report.actions)
    assert_content(path, model)


def test_check_refuses_while_open_and_repair_leaves_healthy_alone(tmp_path: Path) -> None:
    path = tmp_path / "c"
    model = populate(path, 12)
    with Collection.open(path, cfg()):
        with pytest.raises(IndexBusy):
            check_collection(path)
        with pytest.raises(IndexBusy):
            repair_collection(path)
    report = repair_collection(path)
    assert not report.changed and report.documents == len(model)
    assert not any(p.name.startswith("quarantine-") for p in path.iterdir())
