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

__all__ = [
    "MANIFEST_NAME",
    "RESERVED_NAMES",
    "CollectionManifest",
    "SnapshotRef",
    "validate_collection_name",
    "validate_new_collection_name",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Windows device names, with or without an extension: no directory can be called that on
# Windows (or on an SMB share), so the index could not be copied or backed up there.
_DEVICE = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?$", re.IGNORECASE)
# Names of what the index keeps on disk: the root's own name ("index"), and the files and
# directories in a collection (LOCK, manifest.json, reindex/). A collection so named could be
# mistaken for them by a person or a tool given a name or a path (`edge-agent index check`
# takes either). Compared case-insensitively, as macOS and Windows compare file names.
RESERVED_NAMES = frozenset({"index", "lock", "manifest", "manifest.json", "reindex"})
# Suffixes and prefixes of files the index creates, renames or deletes on its own: temporary
# files (removed as strays), damaged snapshots set aside, repair's quarantine folders, and the
# snapshot and WAL file names.
_RESERVED_FORMS = re.compile(
    r"(\.tmp|\.corrupt)$|^(quarantine-|snap-[0-9]{10}\.|wal-[0-9]{20}\.)", re.IGNORECASE
)


def validate_collection_name(name: object) -> str:
    """The syntax every collection name has (checked on every use, old collections too)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument(
            f"collection name {name!r:.80} must be 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit",
            argument="name",
            rule="syntax",
        )
    return name


def validate_new_collection_name(name: object) -> str:
    """The syntax, and no reserved name: checked when a collection is created (collections
    made before this rule existed still open under their names)."""
    name = validate_collection_name(name)
    if _DEVICE.match(name):
        raise InvalidArgument(
            f"collection name {name!r} is reserved: CON, PRN, AUX, NUL, COM0-9 and LPT0-9 (any"
            " case, with or without an extension) are Windows device names",
            argument="name",
            rule="device_name",
        )
    if name.endswith("."):
        raise InvalidArgument(
            f"collection name {name!r} must not end with '.' (Windows drops a trailing dot)",
            argument="name",
            rule="trailing_dot",
        )
    if name.lower() in RESERVED_NAMES or _RESERVED_FORMS.search(name):
        raise InvalidArgument(
            f"collection name {name!r} is reserved: it is (or looks like) a file the index"
            " keeps on disk (index, LOCK, manifest, manifest.json, reindex, *.tmp, *.corrupt,"
            " quarantine-*, snapshot and WAL file names; any case)",
            argument="name",
            rule="reserved_file_name",
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
