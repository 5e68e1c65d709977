"""The collection manifest: which snapshots are current and where the WAL starts.

Rewritten atomically (temp, fsync, rename, dir fsync) at creation, after each snapshot and at
a reindex commit; it is the commit point of each. A CRC32 over its canonical JSON catches the
bit flips that would still parse.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import IndexCorrupt, InvalidArgument
from .fingerprint import ModelFingerprint
from .fsutil import write_file_atomic

__all__ = ["MANIFEST_NAME", "CollectionManifest", "SnapshotRef", "validate_collection_name"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_collection_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument(
            f"collection name {name!r:.80} must be 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class SnapshotRef:
    gen: int
    lsn: int


@dataclass(frozen=True)
class CollectionManifest:
    name: str
    fingerprint: ModelFingerprint
    dim: int
    m: int
    ef_construction: int
    created: float
    snapshots: tuple[SnapshotRef, ...] = ()  # newest first
    wal_from: int = 1  # base LSN of the oldest WAL segment recovery may need
    extra: dict[str, Any] = field(default_factory=dict)

    def bases(self) -> list[SnapshotRef | None]:
        """Recovery starting points, newest first; None is the empty collection at LSN 0,
        usable while the WAL still starts at LSN 1."""
        out: list[SnapshotRef | None] = list(self.snapshots)
        if self.wal_from == 1:
            out.append(None)
        return out

    def with_snapshot(self, ref: SnapshotRef, keep: int) -> CollectionManifest:
        """After a new snapshot: keep the newest ``keep`` bases and the WAL they need."""
        kept = [ref, *self.bases()][:keep]
        snapshots = tuple(b for b in kept if b is not None)
        wal_from = 1 if None in kept else min(b.lsn for b in snapshots) + 1
        return replace(self, snapshots=snapshots, wal_from=wal_from)

    def to_json(self) -> dict[str, Any]:
        body = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "fingerprint": self.fingerprint.to_json(),
            "dim": self.dim,
            "space": "cosine",
            "m": self.m,
            "ef_construction": self.ef_construction,
            "created": self.created,
            "snapshots": [{"gen": s.gen, "lsn": s.lsn} for s in self.snapshots],
            "wal_from": self.wal_from,
            "extra": self.extra,
        }
        body["crc32"] = zlib.crc32(_canonical(body))
        return body

    def save(self, directory: Path) -> None:
        data = json.dumps(self.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        write_file_atomic(directory / MANIFEST_NAME, data)

    @classmethod
    def load(cls, directory: Path) -> CollectionManifest:
        path = directory / MANIFEST_NAME
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise IndexCorrupt(f"{path} is missing", path=str(path)) from exc
        except (OSError, ValueError) as exc:
            raise IndexCorrupt(f"cannot read {path}: {exc}", path=str(path)) from exc
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: Any, path: Path) -> CollectionManifest:
        def bad(detail: str) -> IndexCorrupt:
            return IndexCorrupt(f"{path}: {detail}", path=str(path))

        if not isinstance(data, dict):
            raise bad("not a JSON object")
        body = {k: v for k, v in data.items() if k != "crc32"}
        if data.get("crc32") != zlib.crc32(_canonical(body)):
            raise bad("checksum mismatch")
        if data.get("format") != MANIFEST_FORMAT:
            raise bad(f"format {data.get('format')!r} is not {MANIFEST_FORMAT}")
        try:
            manifest = cls(
                name=validate_collection_name(data["name"]),
                fingerprint=ModelFingerprint.from_json(data["fingerprint"]),
                dim=int(data["dim"]),
                m=int(data["m"]),
                ef_construction=int(data["ef_construction"]),
                created=float(data["created"]),
                snapshots=tuple(
                    SnapshotRef(int(s["gen"]), int(s["lsn"])) for s in data["snapshots"]
                ),
                wal_from=int(data["wal_from"]),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"malformed ({exc!r})") from exc
        if manifest.dim != manifest.fingerprint.vector_dims:
            raise bad(f"dim {manifest.dim} disagrees with the fingerprint")
        if manifest.wal_from < 1 or any(s.lsn < manifest.wal_from - 1 for s in manifest.snapshots):
            raise bad("a snapshot predates the start of the WAL")
        return manifest


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
