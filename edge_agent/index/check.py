"""`edge-agent index check|repair`: inspect a collection's files, and rebuild a damaged one.

check never writes. repair rebuilds the collection from every record that still reads back:
the newest valid snapshot plus all valid WAL records after it (including those past a
corrupt stretch), in LSN order. It deletes nothing: unreadable bytes and superseded files go
to ``<collection>/quarantine-<time>/``, and the report names every LSN it could not recover.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CollectionNotFound, IndexCorrupt, InvalidArgument
from .collection import LOCK_NAME, REINDEX_DIR, lock_directory, segment_info
from .config import IndexConfig
from .documents import Put, decode_payload
from .fingerprint import ModelFingerprint
from .fsutil import TMP_SUFFIX, fsync_dir
from .manifest import MANIFEST_NAME, CollectionManifest, SnapshotRef
from .memory import Memory
from .recovery import list_segments, replay_wal
from .snapshot import (
    SnapshotState,
    snapshot_gen,
    snapshot_paths,
    validate_snapshot,
    write_snapshot,
)
from .wal import SegmentReader, create_segment

__all__ = ["CheckReport", "RepairReport", "check_collection", "repair_collection"]

log = logging.getLogger("edge_agent.index")


@dataclass
class CheckReport:
    path: str
    ok: bool = True
    name: str | None = None
    fingerprint: dict[str, Any] | None = None
    documents: int | None = None  # after recovery, when it can be computed
    lsn: int | None = None
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # recovery would refuse or lose data
    warnings: list[str] = field(default_factory=list)  # recovery handles these by itself

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.path}: {'OK' if self.ok else 'DAMAGED'}"]
        if self.name:
            lines.append(f"  collection {self.name}, {self.documents} documents, LSN {self.lsn}")
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        if not self.ok:
            lines.append(f"  fix: edge-agent index repair {self.path}")
        return "\n".join(lines)


@dataclass
class RepairReport:
    path: str
    changed: bool = False
    documents: int = 0
    lsn: int = 0
    lost_lsns: list[tuple[int, int]] = field(default_factory=list)  # inclusive ranges
    quarantine: str | None = None
    actions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        head = "repaired" if self.changed else "nothing to repair"
        lines = [f"{self.path}: {head}; {self.documents} documents at LSN {self.lsn}"]
        lines += [f"  {a}" for a in self.actions]
        if self.lost_lsns:
            spans = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in self.lost_lsns)
            lines.append(f"  NOT recovered: writes with LSN {spans}")
        if self.quarantine:
            lines.append(f"  set aside (inspect, then delete when satisfied): {self.quarantine}")
        return "\n".join(lines)


def _require_dir(path: Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CollectionNotFound(f"no collection at {path}", path=str(path))
    return path


def check_collection(path: Path, *, deep: bool = True) -> CheckReport:
    """Validate every file recovery would read; ``deep`` also loads the graph in hnswlib.

    Raises IndexBusy while a process has the collection open (its files are changing).
    """
    path = _require_dir(path)
    report = CheckReport(path=str(path))
    lock_fd = lock_directory(path, shared=True)
    try:
        _check(path, report, deep)
    finally:
        os.close(lock_fd)
    return report


def _check(path: Path, report: CheckReport, deep: bool) -> None:
    try:
        manifest = CollectionManifest.load(path)
    except IndexCorrupt as exc:
        report.problem(exc.message)
        return
    report.name = manifest.name
    report.fingerprint = manifest.fingerprint.to_json()
    if manifest.extra.get("backend") == "milvus":
        report.warnings.append(
            f"a Milvus collection ({manifest.extra.get('uri')}): its documents are in Milvus,"
            " only the manifest is here (docs/scale.md)"
        )
        return
    referenced = {ref.gen for ref in manifest.snapshots}
    for entry in sorted(path.iterdir()):
        if entry.name.endswith(TMP_SUFFIX):
            report.warnings.append(f"stray temporary file {entry.name} (removed at open)")
        elif entry.name.endswith(".corrupt"):
            report.warnings.append(f"{entry.name} was set aside as corrupt earlier")
        elif (gen := snapshot_gen(entry.name)) is not None and gen not in referenced:
            report.warnings.append(f"{entry.name} is not referenced (removed at open)")
    base_docs: set[str] | None = None
    base: SnapshotRef | None = None
    for ref in manifest.bases():
        if ref is None:
            base, base_docs = None, set()
            break
        try:
            state, _, _ = validate_snapshot(path, ref.gen, dim=manifest.dim, m=manifest.m)
            if state.lsn != ref.lsn or state.fingerprint != manifest.fingerprint.to_json():
                raise IndexCorrupt(f"snapshot {ref.gen} disagrees with the manifest (lsn/model)")
        except IndexCorrupt as exc:
            report.snapshots.append({"gen": ref.gen, "lsn": ref.lsn, "status": exc.message})
            continue
        report.snapshots.append(
            {"gen": ref.gen, "lsn": ref.lsn, "status": "ok", "documents": len(state.docs)}
        )
        base, base_docs = ref, {doc[0] for doc in state.docs}
        break
    newest = manifest.snapshots[0] if manifest.snapshots else None
    if base_docs is None:
        report.problem("no usable snapshot: " + "; ".join(s["status"] for s in report.snapshots))
        return
    if newest is not None and base != newest:
        report.warnings.append(
            f"newest snapshot {newest.gen} is unusable; open() recovers from "
            f"{'snapshot ' + str(base.gen) if base else 'the start'} plus the WAL, losing nothing"
        )
    try:
        replay = replay_wal(path, manifest, base.lsn if base else 0, fix=False)
    except IndexCorrupt as exc:
        report.problem(exc.message.split("; the collection was not opened")[0])
        return
    for segment in replay.segments:
        report.segments.append({"file": segment.name, "bytes": segment.stat().st_size})
    report.warnings += [f"{t} (cut off at open; never acknowledged)" for t in replay.torn]
    for doc_id, op in replay.final.items():
        if op is None:
            base_docs.discard(doc_id)
        else:
            base_docs.add(doc_id)
    report.documents = len(base_docs)
    report.lsn = replay.last_lsn
    if deep and base is not None:
        try:
            from .snapshot import load_snapshot

            loaded = load_snapshot(path, base.gen, dim=manifest.dim, m=manifest.m, capacity=1)
            live = [doc[1] for doc in loaded.state.docs]
            sample = live[:: max(1, len(live) // 256)]
            if sample:
                norms = np.linalg.norm(loaded.index.get_items(sample, return_type="numpy"), axis=1)
                if not np.allclose(norms, 1.0, atol=1e-3):
                    report.problem(f"snapshot {base.gen} holds vectors that are not unit length")
        except (IndexCorrupt, RuntimeError) as exc:
            report.problem(f"snapshot {base.gen} does not load: {exc}")


# -- repair ----------------------------------------------------------------------------------


def _identity(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Name, fingerprint, dim, m, ef_construction: from the manifest, else any segment header
    (each carries them), else a snapshot. Also notes on where it came from."""
    notes: list[str] = []
    try:
        manifest = CollectionManifest.load(path)
        return {
            "name": manifest.name,
            "fingerprint": manifest.fingerprint.to_json(),
            "dim": manifest.dim,
            "m": manifest.m,
            "ef_construction": manifest.ef_construction,
            "created": manifest.created,
        }, notes
    except IndexCorrupt as exc:
        notes.append(f"manifest unreadable ({exc.message}); identity taken from other files")
    for _, segment in reversed(list_segments(path)):
        try:
            with SegmentReader(segment) as reader:
                info = reader.info
            ModelFingerprint.from_json(info.get("fingerprint"))
            return {
                "name": info.get("name") or path.name,
                "fingerprint": info["fingerprint"],
                "dim": int(info["dim"]),
                "m": int(info["m"]),
                "ef_construction": int(info["ef_construction"]),
                "created": time.time(),
            }, notes
        except (IndexCorrupt, InvalidArgument, KeyError, TypeError, ValueError):
            continue
    raise IndexCorrupt(
        f"{path}: neither the manifest nor any WAL segment says which model this collection"
        " belongs to; it cannot be repaired automatically",
        path=str(path),
    )


def _spans(numbers: list[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for n in numbers:
        if spans and spans[-1][1] == n - 1:
            spans[-1] = (spans[-1][0], n)
        else:
            spans.append((n, n))
    return spans


def repair_collection(path: Path, config: IndexConfig | None = None) -> RepairReport:
    """Rebuild a collection that check finds damaged; a healthy one is left alone.

    Raises IndexBusy while a process has the collection open.
    """
    path = _require_dir(path)
    config = config or IndexConfig()
    report = RepairReport(path=str(path))
    lock_fd = lock_directory(path)
    try:
        before = CheckReport(path=str(path))
        _check(path, before, deep=True)
        if before.ok:
            report.documents = before.documents or 0
            report.lsn = before.lsn or 0
            report.actions += before.warnings
            return report
        _repair(path, config, report)
    finally:
        os.close(lock_fd)
    return report


def _repair(path: Path, config: IndexConfig, report: RepairReport) -> None:
    identity, notes = _identity(path)
    report.actions += notes
    fingerprint = ModelFingerprint.from_json(identity["fingerprint"])
    dim, m = identity["dim"], identity["m"]
    quarantine = path / f"quarantine-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    quarantine.mkdir()
    report.quarantine = str(quarantine)

    # The newest snapshot that validates completely (vectors are taken from it: the graph is
    # rebuilt, never trusted).
    docs: dict[str, Put] = {}
    base_lsn = 0
    gens = sorted(
        {g for p in path.iterdir() if (g := snapshot_gen(p.name)) is not None}, reverse=True
    )
    for gen in gens:
        try:
            state, _, vectors = validate_snapshot(path, gen, dim=dim, m=m, vectors_up_to=1 << 62)
            if state.fingerprint != fingerprint.to_json():
                raise IndexCorrupt(f"snapshot {gen} is for another model")
        except IndexCorrupt as exc:
            report.actions.append(f"snapshot {gen} unusable: {exc.message}")
            continue
        rows = vectors if vectors is not None else np.empty((0, dim), np.float32)
        for row, (doc_id, _, text, metadata) in enumerate(state.docs):
            docs[doc_id] = Put(doc_id, rows[row], text, metadata)
        base_lsn = state.lsn
        report.actions.append(f"starting from snapshot {gen} (LSN {base_lsn}, {len(docs)} docs)")
        break
    else:
        report.actions.append("no usable snapshot: rebuilding from the WAL alone")

    # Every record that reads back, from every segment, past corrupt stretches.
    records: dict[int, list[Any]] = {}
    for _, segment in list_segments(path):
        try:
            reader = SegmentReader(segment)
        except IndexCorrupt as exc:
            shutil.copy2(segment, quarantine / segment.name)
            report.actions.append(f"{segment.name} unreadable ({exc.message}); copied aside")
            continue
        with reader:
            start: int | None = None
            while True:
                for offset, payload in reader.records(start):
                    try:
                        lsn, ops = decode_payload(payload, dim)
                    except ValueError as exc:
                        report.actions.append(f"{segment.name}@{offset}: {exc}; skipped")
                        continue
                    records.setdefault(lsn, ops)
                problem = reader.problem
                if problem is None:
                    break
                stop = problem.resume_offset if problem.kind == "corrupt" else reader.size
                bad = quarantine / f"{segment.name}.{problem.offset}-{stop}.bad"
                with segment.open("rb") as source:
                    source.seek(problem.offset)
                    bad.write_bytes(source.read((stop or reader.size) - problem.offset))
                report.actions.append(
                    f"{segment.name}: {problem.kind} bytes {problem.offset}-{stop}"
                    f" ({problem.detail}) copied to {bad.name}"
                )
                if problem.kind != "corrupt":
                    break
                start = problem.resume_offset
    last_lsn = max([base_lsn, *records])
    lost = [lsn for lsn in range(base_lsn + 1, last_lsn + 1) if lsn not in records]
    report.lost_lsns = _spans(lost)
    for lsn in sorted(n for n in records if n > base_lsn):
        for op in records[lsn]:
            if isinstance(op, Put):
                docs[op.id] = op
            else:
                docs.pop(op.id, None)

    # Build, then commit with a new manifest; superseded files are moved aside afterwards.
    memory = Memory.empty(
        dim,
        m=m,
        ef_construction=identity["ef_construction"],
        capacity=max(config.initial_capacity, len(docs) + 1),
        threads=config.threads,
        exact_max=0,
    )
    items = list(docs.values())
    for start in range(0, len(items), 4096):
        chunk = items[start : start + 4096]
        memory.put_many(
            [p.id for p in chunk],
            np.stack([p.vector for p in chunk]),
            [p.text for p in chunk],
            [p.metadata for p in chunk],
        )
    gen = max(gens, default=0) + 1
    old_files = [
        p
        for p in path.iterdir()
        if p.is_file()
        and p.name not in (MANIFEST_NAME, LOCK_NAME)
        and not p.name.startswith("quarantine-")
    ]
    state = SnapshotState(
        last_lsn, memory.next_label, fingerprint.to_json(), memory.snapshot_docs()
    )
    write_snapshot(path, gen, memory.index, state, dim)
    manifest = CollectionManifest(
        name=identity["name"],
        fingerprint=fingerprint,
        dim=dim,
        m=m,
        ef_construction=identity["ef_construction"],
        created=identity["created"],
        snapshots=(SnapshotRef(gen, last_lsn),),
        wal_from=last_lsn + 1,
        extra={"repaired_at": time.time(), "lost_lsns": [list(s) for s in report.lost_lsns]},
    )
    old_manifest = path / MANIFEST_NAME
    if old_manifest.exists():
        shutil.copy2(old_manifest, quarantine / MANIFEST_NAME)
    manifest.save(path)
    fresh = path / create_segment(path, last_lsn + 1, segment_info(manifest)).name
    new_files = {*snapshot_paths(path, gen), fresh}
    for file in old_files:
        if file not in new_files and file.exists():
            file.rename(quarantine / file.name)
    if (path / REINDEX_DIR).is_dir():
        report.actions.append("a partial reindex was left as is (reindex again to resume)")
    fsync_dir(path)
    report.changed = True
    report.documents = len(docs)
    report.lsn = last_lsn
    report.actions.append(
        f"wrote snapshot {gen} with {len(docs)} documents at LSN {last_lsn} and a fresh WAL"
    )
    log.warning("%s", report.summary())
