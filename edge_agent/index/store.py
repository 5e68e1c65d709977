"""Named collections under one root directory (the daemon's ``<data dir>/index``)."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path

from ..errors import CollectionExists, CollectionNotFound
from .collection import Collection
from .config import IndexConfig
from .fingerprint import ModelFingerprint
from .fsutil import TMP_SUFFIX, fsync_dir
from .manifest import (
    MANIFEST_NAME,
    CollectionManifest,
    validate_collection_name,
    validate_new_collection_name,
)
from .milvus_collection import MilvusCollection, MilvusTarget

# A collection of either backend: the local files (Collection) or Milvus (MilvusCollection).
AnyCollection = Collection | MilvusCollection

__all__ = ["AnyCollection", "IndexStore"]


class IndexStore:
    """Creates, opens (once each: handles are shared), lists and drops collections."""

    def __init__(self, root: Path, config: IndexConfig | None = None) -> None:
        self.root = Path(root)
        self.config = config or IndexConfig()
        self._open: dict[str, AnyCollection] = {}
        self._lock = threading.Lock()

    def path_of(self, name: str) -> Path:
        return self.root / validate_collection_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
        )

    def exists(self, name: str) -> bool:
        return (self.path_of(name) / MANIFEST_NAME).is_file()

    def create(
        self, name: str, fingerprint: ModelFingerprint, milvus: MilvusTarget | None = None
    ) -> AnyCollection:
        """A new collection (INVALID_ARGUMENT for a reserved name, see
        manifest.validate_new_collection_name; INDEX_FULL if the disk is full); in Milvus
        when ``milvus`` says where (the manifest here records it)."""
        with self._lock:
            path = self.root / validate_new_collection_name(name)
            if name in self._open or path.exists():
                raise CollectionExists(f"collection {name!r} already exists", name=name)
            collection: AnyCollection
            if milvus is not None:
                collection = MilvusCollection.create(
                    path, fingerprint, self.config, name=name, target=milvus
                )
            else:
                collection = Collection.create(path, fingerprint, self.config, name=name)
            self._open[name] = collection
            return collection

    def open(self, name: str) -> AnyCollection:
        """The open handle for ``name`` (opened and recovered on first use; a Milvus
        collection opens from its manifest without a network call)."""
        collection: AnyCollection | None
        with self._lock:
            collection = self._open.get(name)
            if collection is not None:
                return collection
            path = self.path_of(name)
            if not (path / MANIFEST_NAME).is_file() and not path.is_dir():
                # Neither the root nor the other collections' names: the message reaches
                # remote clients (`collections list` is the way to see what exists).
                raise CollectionNotFound(f"no collection {name!r}", name=name)
            manifest = CollectionManifest.load(path) if path.is_dir() else None
            if manifest is not None and MilvusCollection.target_of(manifest) is not None:
                collection = MilvusCollection.open(path, self.config, manifest)
            else:
                collection = Collection.open(path, self.config)
            self._open[name] = collection
            return collection

    def opened(self, name: str) -> AnyCollection | None:
        """The handle for ``name`` if it is open already, else None; never blocks (a single
        dict read, atomic under the GIL), so an event loop may call it."""
        return self._open.get(name)

    def open_names(self) -> list[str]:
        """Names of the collections open now; never blocks (one atomic copy of a dict)."""
        return list(self._open)

    def get_or_create(
        self, name: str, fingerprint: ModelFingerprint, milvus: MilvusTarget | None = None
    ) -> AnyCollection:
        try:
            return self.open(name)
        except CollectionNotFound:
            try:
                return self.create(name, fingerprint, milvus)
            except CollectionExists:
                return self.open(name)

    def close(self, name: str | None = None) -> None:
        """Close one collection, or all of them: every one is closed even if closing another
        fails (its lock released); then the first failure is raised."""
        with self._lock:
            names = [name] if name is not None else list(self._open)
            failure: BaseException | None = None
            for each in names:
                collection = self._open.pop(each, None)
                if collection is None:
                    continue
                try:
                    collection.close()
                except Exception as exc:
                    failure = failure or exc
            if failure is not None:
                raise failure

    def drop(self, name: str) -> None:
        """Delete a collection and its files (renamed away first, so a crash never leaves a
        half-deleted collection under its name). A Milvus collection is dropped in Milvus
        first (for every agent that shares it); if Milvus cannot be reached, nothing changes
        (BACKEND_UNAVAILABLE)."""
        with self._lock:
            path = self.path_of(name)
            collection = self._open.get(name)
            if collection is None and (path / MANIFEST_NAME).is_file():
                manifest = CollectionManifest.load(path)
                if MilvusCollection.target_of(manifest) is not None:
                    collection = MilvusCollection.open(path, self.config, manifest)
            if isinstance(collection, MilvusCollection):
                collection.drop_remote()
            collection = self._open.pop(name, None)
            if collection is not None:
                collection.close()
            if not path.is_dir():
                raise CollectionNotFound(f"no collection {name!r}", name=name)
            doomed = self.root / f".{name}.dropped-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
            os.rename(path, doomed)
            fsync_dir(self.root)
            shutil.rmtree(doomed, ignore_errors=True)

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
