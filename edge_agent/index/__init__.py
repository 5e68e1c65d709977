"""The persistent local vector index: named collections of documents, crash-safe on disk.

Lower layer: it takes vectors and a model fingerprint and never imports the embedder.
See docs/index.md for the on-disk format, recovery, fsync policies and limits.
"""

from .check import CheckReport, RepairReport, check_collection, repair_collection
from .collection import Collection, CollectionStats, ReindexReport
from .config import FSYNC_POLICIES, IndexConfig
from .documents import Document, Hit
from .fingerprint import ModelFingerprint
from .store import IndexStore

__all__ = [
    "FSYNC_POLICIES",
    "CheckReport",
    "Collection",
    "CollectionStats",
    "Document",
    "Hit",
    "IndexConfig",
    "IndexStore",
    "ModelFingerprint",
    "ReindexReport",
    "RepairReport",
    "check_collection",
    "repair_collection",
]
