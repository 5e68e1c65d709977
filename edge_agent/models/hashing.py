"""Streamed sha256 with a cache keyed by (size, mtime) so start-up does not re-hash big files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import IntegrityError, ModelFileError
from ..progress import Progress
from .manifest import write_json_atomic

__all__ = ["VerifyCache", "sha256_file"]

CHUNK = 1 << 20


def sha256_file(path: Path, show_progress: bool = False) -> str:
    digest = hashlib.sha256()
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            if show_progress:
                with Progress(f"sha256 {path.name}", total=size / CHUNK, unit=" MiB") as bar:
                    while chunk := handle.read(CHUNK):
                        digest.update(chunk)
                        bar.advance(len(chunk) / CHUNK)
            else:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc}", path=str(path)) from exc
    return digest.hexdigest()


class VerifyCache:
    """Remembers which (path, size, mtime_ns) already hashed to which digest.

    A changed size or mtime forces a re-hash; the cache can only skip work, never vouch for a
    file whose metadata changed since it was hashed.
    """

    def __init__(self, cache_file: Path) -> None:
        self.cache_file = cache_file

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def verify(self, path: Path, expected_sha256: str, expected_size: int) -> None:
        """Raise IntegrityError (naming the file) unless the file has the expected digest."""
        try:
            stat = path.stat()
        except OSError as exc:
            raise ModelFileError(f"model file missing: {path} ({exc})", path=str(path)) from exc
        if stat.st_size != expected_size:
            raise IntegrityError(
                f"{path}: size {stat.st_size} bytes, manifest says {expected_size}",
                path=str(path),
            )
        entries = self._load()
        key = str(path.resolve())
        cached = entries.get(key)
        if (
            cached
            and cached.get("size") == stat.st_size
            and cached.get("mtime_ns") == stat.st_mtime_ns
            and cached.get("sha256") == expected_sha256
        ):
            return
        actual = sha256_file(path, show_progress=stat.st_size > 64 * CHUNK)
        if actual != expected_sha256:
            raise IntegrityError(
                f"{path}: sha256 {actual} does not match the manifest's {expected_sha256}",
                path=str(path),
                expected=expected_sha256,
                actual=actual,
            )
        entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": actual}
        try:
            write_json_atomic(self.cache_file, entries)
        except OSError:
            pass  # a read-only store still verifies, it just re-hashes next time
