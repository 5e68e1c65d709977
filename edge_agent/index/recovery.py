"""Recovery: the last valid snapshot, then the WAL after it.

Shared by Collection.open (which fixes a torn tail) and check (which only reports).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IndexCorrupt
from .documents import Put, decode_payload
from .manifest import CollectionManifest
from .wal import RECORD_HEADER, SegmentReader, segment_base, truncate_segment

__all__ = ["WalReplay", "list_segments", "repair_hint", "replay_wal"]

log = logging.getLogger("edge_agent.index")


def repair_hint(path: Path) -> str:
    return (
        f"the collection was not opened, nothing was changed. Run `edge-agent index check"
        f" {path}` for details, then `edge-agent index repair {path}` to rebuild it from every"
        " readable record (it moves unreadable bytes to a quarantine folder, deletes nothing)"
    )


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.iterdir():
        base = segment_base(path.name)
        if base is not None and path.is_file():
            found.append((base, path))
    return sorted(found)


@dataclass
class WalReplay:
    """The net effect of the WAL after ``after_lsn``: id -> last Put, or None if deleted."""

    after_lsn: int
    last_lsn: int
    final: dict[str, Put | None] = field(default_factory=dict)
    records: int = 0  # records after after_lsn
    bytes: int = 0  # their framed size
    segments: list[Path] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)  # tails cut off (or, with fix=False, to cut)
    stale_last_segment: Path | None = None  # empty, from another identity: to recreate


def _identity_matches(info: dict, manifest: CollectionManifest) -> bool:
    return info.get("dim") == manifest.dim and info.get("fingerprint") == (
        manifest.fingerprint.to_json()
    )


def replay_wal(
    directory: Path, manifest: CollectionManifest, after_lsn: int, *, fix: bool
) -> WalReplay:
    """Read every segment from ``manifest.wal_from`` on, checking LSN continuity.

    A torn tail (a bad record with nothing valid after it, in the last segment) is cut off
    when ``fix`` and logged. Anything else that does not read back raises IndexCorrupt.
    """
    segments = [(b, p) for b, p in list_segments(directory) if b >= manifest.wal_from]
    expected = manifest.wal_from
    replay = WalReplay(after_lsn=after_lsn, last_lsn=expected - 1)
    dim = manifest.dim

    def corrupt(detail: str, path: Path, **data: object) -> IndexCorrupt:
        return IndexCorrupt(
            f"collection {directory}: {detail}; {repair_hint(directory)}",
            path=str(directory),
            file=str(path),
            **data,
        )

    for position, (base, path) in enumerate(segments):
        is_last = position == len(segments) - 1
        if base != expected:
            raise corrupt(
                f"WAL gap: the next record is LSN {expected} but {path.name} follows", path
            )
        replay.segments.append(path)
        with SegmentReader(path) as reader:
            if not _identity_matches(reader.info, manifest):
                if is_last and reader.size == reader.header_size:
                    # Left by a reindex commit cut short after its manifest was written.
                    replay.stale_last_segment = path
                    continue
                raise corrupt(f"{path.name} belongs to another model or dimension", path)
            for offset, payload in reader.records():
                try:
                    lsn, ops = decode_payload(payload, dim)
                except ValueError as exc:
                    raise corrupt(
                        f"{path.name} offset {offset}: {exc}", path, offset=offset
                    ) from exc
                if lsn != expected:
                    raise corrupt(
                        f"{path.name} offset {offset}: LSN {lsn} where {expected} was expected",
                        path,
                        offset=offset,
                    )
                expected += 1
                if lsn <= after_lsn:
                    continue
                replay.records += 1
                replay.bytes += RECORD_HEADER.size + len(payload)
                for op in ops:
                    replay.final[op.id] = op if isinstance(op, Put) else None
            problem = reader.problem
            if problem is not None:
                where = f"{path.name} offset {problem.offset}"
                if problem.kind == "torn" and is_last:
                    cut = reader.size - problem.offset
                    message = f"torn WAL tail at {where} ({problem.detail}): {cut} bytes"
                    replay.torn.append(message)
                    if fix:
                        log.warning("%s: %s cut off (never acknowledged)", directory, message)
                        reader.close()
                        truncate_segment(path, problem.offset)
                elif problem.kind == "torn":
                    raise corrupt(f"{where}: {problem.detail} (not the last segment)", path)
                else:
                    raise corrupt(
                        f"WAL corrupt in the middle at {where} ({problem.detail}); valid records"
                        f" follow at offset {problem.resume_offset}",
                        path,
                        offset=problem.offset,
                    )
    replay.last_lsn = expected - 1
    if replay.last_lsn < after_lsn:
        raise corrupt(
            f"the WAL ends at LSN {replay.last_lsn} but the snapshot is at LSN {after_lsn}",
            directory,
        )
    return replay
