"""Index tuning and limits, validated once when the config is built."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument

__all__ = ["EXACT_SEARCH_FLOATS", "FSYNC_POLICIES", "IndexConfig"]

FSYNC_POLICIES = ("always", "batch", "off")
# Floats an exact scan may read per query: on a 2-core x86 box it beat the graph up to 8k
# vectors at 384 and 1024 dims and lost at 16k (bench/index_bench.py, crossover table; under
# load 8k x 1024 lost too), so 4M sits at the crossover for 384-d with a margin at 1024-d.
EXACT_SEARCH_FLOATS = 4_000_000


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidArgument(f"{name} must be an integer in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class IndexConfig:
    """How collections are built, made durable and searched.

    ``m`` and ``ef_construction`` apply when a collection is created (they are then stored in
    its manifest); everything else applies each time a collection is opened.
    """

    m: int = 16
    ef_construction: int = 200
    # Graph search candidates per query (raised to k). 96: the smallest measured value with
    # recall@10 >= 0.98 and a margin on 100k real text embeddings (384-d: 0.989 at p50 0.66 ms;
    # 64 gave 0.973-0.975, 80 gave 0.983), bench/index_text_recall.py, docs/benchmarks.md.
    ef_search: int = 96
    # Live vectors up to which search is an exact scan instead of the HNSW graph: perfect recall
    # and, at that size, no slower. None: EXACT_SEARCH_FLOATS // dims, where the measured
    # crossover lies (about 10k vectors at 384 dims, 4k at 1024; docs/benchmarks.md).
    exact_search_max: int | None = None
    # "always": fsync the WAL before a write returns. "batch": return after write(2) and fsync
    # within batch_window_ms. "off": leave flushing to the OS (snapshots are still fsynced).
    fsync: str = "always"
    batch_window_ms: int = 20
    # A snapshot is written when the WAL since the last one passes either bound.
    snapshot_wal_bytes: int = 64 << 20
    snapshot_wal_records: int = 50_000
    snapshot_on_close: bool = True
    # True: the write that crosses a bound only starts a background snapshot; writers wait
    # just for the point-in-time copy of the graph (~0.1 s at 100k x 384-d), not for the
    # file writes and fsyncs. False: that write takes the snapshot itself (deterministic).
    snapshot_in_background: bool = True
    # A background snapshot copies the graph in memory when it is at most this big; a bigger
    # one is dumped with hnswlib's save_index while writers wait (no second copy in RAM).
    snapshot_copy_max_bytes: int = 1 << 30
    # Snapshots kept (the newest plus fallbacks, each with the WAL after it): with 2, a corrupt
    # newest snapshot is recovered from the previous one plus the WAL, losing nothing.
    keep_snapshots: int = 2
    # Rebuild the graph at snapshot time when this share of its slots are deleted ones.
    compact_deleted_ratio: float = 0.5
    threads: int = 1  # hnswlib threads for inserts; queries always use the caller's thread
    initial_capacity: int = 1024
    max_vectors: int = 10_000_000
    max_id_bytes: int = 512
    max_metadata_bytes: int = 64 << 10
    max_text_bytes: int = 1 << 20
    max_batch: int = 10_000  # documents per write call (one WAL record, applied atomically)
    # Where new collections live (an existing one keeps its own, from its manifest):
    # "local", or "milvus" at milvus_uri (milvus_collection.py), each call within
    # milvus_timeout seconds, the token read from milvus_token_file.
    backend: str = "local"
    milvus_uri: str | None = None
    milvus_token_file: str | None = None
    milvus_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name, low, high in (
            ("m", 2, 128),
            ("ef_construction", 8, 4096),
            ("ef_search", 1, 65536),
            ("batch_window_ms", 1, 10_000),
            ("snapshot_wal_bytes", 1 << 10, 1 << 40),
            ("snapshot_wal_records", 1, 1 << 40),
            ("snapshot_copy_max_bytes", 0, 1 << 50),
            ("keep_snapshots", 1, 16),
            ("threads", 1, 512),
            ("initial_capacity", 1, 1 << 31),
            ("max_vectors", 1, 1 << 40),
            ("max_id_bytes", 1, 1 << 16),
            ("max_metadata_bytes", 16, 1 << 24),
            ("max_text_bytes", 1, 1 << 30),
            ("max_batch", 1, 1_000_000),
        ):
            _check_int(name, getattr(self, name), low, high)
        if self.exact_search_max is not None:
            _check_int("exact_search_max", self.exact_search_max, 0, 1_000_000)
        if self.fsync not in FSYNC_POLICIES:
            raise InvalidArgument(f"fsync must be one of {FSYNC_POLICIES}, got {self.fsync!r}")
        for flag in ("snapshot_on_close", "snapshot_in_background"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidArgument(f"{flag} must be a bool")
        if self.backend not in ("local", "milvus"):
            raise InvalidArgument(f"backend must be local or milvus, got {self.backend!r}")
        if self.milvus_token_file is not None and not isinstance(self.milvus_token_file, str):
            object.__setattr__(self, "milvus_token_file", str(self.milvus_token_file))
        timeout = self.milvus_timeout
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not (
            0.1 <= timeout <= 600
        ):
            raise InvalidArgument(f"milvus_timeout must be in [0.1, 600], got {timeout!r}")
        ratio = self.compact_deleted_ratio
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
            raise InvalidArgument(f"compact_deleted_ratio must be in (0, 1], got {ratio!r}")

    def exact_limit(self, dim: int) -> int:
        """Live vectors up to which a collection of ``dim``-d vectors is searched exactly."""
        if self.exact_search_max is not None:
            return self.exact_search_max
        return max(256, EXACT_SEARCH_FLOATS // max(1, dim))
