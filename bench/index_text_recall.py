"""Recall and latency of the index on realistic text embeddings, at 100k x 384-d.

    nice -n 10 .venv/bin/python bench/index_text_recall.py            # 100k (+ 10k) documents
    nice -n 10 .venv/bin/python bench/index_text_recall.py --embed-only

Random unit vectors are the worst case for HNSW (no structure: recall@10 at ef=64 is ~0.1 at
100k x 384-d) and not what anyone indexes. This benchmark builds 100k distinct texts from the
STS sentences in ../shared/data/sts (each text: 2-3 sentences drawn with a seeded RNG and
joined), plus 1,000 held-out texts of the same kind as queries (never indexed), embeds them
once with the default model (edge_agent.Embedder, default quant) and caches the vectors under
~/.cache/edge-agent/bench/ keyed by a hash of the model file and the texts: the first run
takes ~7 min of embedding, later runs reuse the cache. Then it builds a collection with the
default IndexConfig (M=16, ef_construction=200; fsync off, which does not change the graph)
through the Collection API and measures recall@10 against an exact scan, and p50/p99 per
query, at several ef values, with the exact-scan shortcut turned off for the 10k subset so
the graph itself is measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_DATA_DIR, machine_summary, markdown_table  # noqa: E402

from edge_agent.index import Collection, IndexConfig, ModelFingerprint  # noqa: E402

K = 10
EFS = (16, 32, 64, 96, 128)
CACHE_DIR = Path.home() / ".cache" / "edge-agent" / "bench"
SEED = 20240611
EMBED_BATCH = 256


def sts_sentences(data_dir: Path) -> list[str]:
    """Every distinct, non-empty sentence of the STS files, in first-seen order."""
    files = sorted(data_dir.glob("*.tsv")) if data_dir.is_dir() else []
    if not files:
        sys.exit(f"error: no STS data: {data_dir} is missing or holds no *.tsv files")
    seen: dict[str, None] = {}
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                for sentence in (parts[1].strip(), parts[2].strip()):
                    if sentence:
                        seen.setdefault(sentence)
    return list(seen)


def build_texts(sentences: list[str], total: int, seed: int = SEED) -> list[str]:
    """``total`` distinct texts, each 2 or 3 distinct sentences joined by a space."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < total:
        count = int(rng.integers(2, 4))
        picks = rng.choice(len(sentences), size=count, replace=False)
        out.setdefault(" ".join(sentences[i] for i in picks))
    return list(out)


def cache_key(texts: list[str], model_sha256: str, quant: str) -> str:
    digest = hashlib.sha256(f"{model_sha256}\0{quant}\0".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def embed_cached(texts: list[str], threads: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The default model's vectors for ``texts``, from the cache or embedded (and cached)."""
    from edge_agent.embedding.embedder import Embedder, EmbedderConfig
    from edge_agent.models import DEFAULT_MODEL, ModelStore
    from edge_agent.paths import default_paths

    store = ModelStore(default_paths().models_dir)
    resolved = store.resolve(DEFAULT_MODEL, None, verify=False)
    entry = resolved.manifest.files[resolved.quant]
    key = cache_key(texts, entry.sha256, resolved.quant)
    path = CACHE_DIR / f"text-{key}.npy"
    info = {"model": DEFAULT_MODEL, "quant": resolved.quant, "texts": len(texts), "cache": path}
    if path.is_file():
        vectors = np.load(path)
        if vectors.shape[0] == len(texts):
            info["embed_s"] = None
            return vectors, info
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    parts = []
    with Embedder.open(
        store, DEFAULT_MODEL, resolved.quant, EmbedderConfig(threads=threads)
    ) as embedder:
        for start in range(0, len(texts), EMBED_BATCH):
            parts.append(embedder.embed(texts[start : start + EMBED_BATCH]).vectors)
            done = start + len(parts[-1])
            if done % (EMBED_BATCH * 40) < EMBED_BATCH or done == len(texts):
                rate = done / (time.monotonic() - started)
                print(f"  embedded {done:,}/{len(texts):,} ({rate:.0f} texts/s)", file=sys.stderr)
    vectors = np.concatenate(parts).astype(np.float32)
    info["embed_s"] = time.monotonic() - started
    # Temp name + rename: an interrupted run never leaves a short cache file behind.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, vectors)
    os.replace(tmp, path)
    return vectors, info


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 100):
        scores = queries[start : start + 100] @ data.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        out[start : start + 100] = np.take_along_axis(part, order, axis=1)
    return out


def measure(
    data: np.ndarray, queries: np.ndarray, work: Path, threads: int, efs: tuple[int, ...]
) -> dict[str, Any]:
    """Build a collection of ``data`` with the default config, then sweep ef."""
    dim = data.shape[1]
    fp = ModelFingerprint("bench-text", "0" * 64, dim, "mean")
    # Default graph parameters; the exact-scan shortcut off so the graph is what is measured
    # (at 100k it is off by default anyway: the limit is 10,416 vectors at 384-d).
    config = replace(IndexConfig(), fsync="off", threads=threads, exact_search_max=0)
    path = work / f"text-{len(data)}"
    shutil.rmtree(path, ignore_errors=True)
    ids = [str(i) for i in range(len(data))]
    started = time.perf_counter()
    out: dict[str, Any] = {"n": len(data), "dim": dim, "queries": len(queries)}
    with Collection.create(path, fp, config) as coll:
        for start in range(0, len(data), 1000):
            coll.upsert(fp, ids[start : start + 1000], data[start : start + 1000])
        out["build_s"] = time.perf_counter() - started
        truth = exact_topk(data, queries, K)
        sweep = {}
        for ef in efs:
            coll.search(fp, queries[0], k=K, ef=ef)  # warm-up
            times = np.empty(len(queries))
            hits = 0
            for i, query in enumerate(queries):
                t0 = time.perf_counter()
                found = coll.search(fp, query, k=K, ef=ef)
                times[i] = time.perf_counter() - t0
                hits += len({int(h.id) for h in found} & set(truth[i].tolist()))
            sweep[ef] = {
                "recall": hits / (K * len(queries)),
                "p50_ms": float(np.percentile(times, 50) * 1e3),
                "p99_ms": float(np.percentile(times, 99) * 1e3),
            }
        out["sweep"] = sweep
    shutil.rmtree(path, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=100_000, help="indexed texts")
    parser.add_argument("--queries", type=int, default=1000, help="held-out query texts")
    parser.add_argument("--subset", type=int, default=10_000, help="also measure the first N")
    parser.add_argument(
        "--efs", default=",".join(map(str, EFS)), help="ef values to measure, comma-separated"
    )
    parser.add_argument("--threads", type=int, default=2, help="embedding and insert threads")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--embed-only", action="store_true", help="fill the cache and stop")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: temp)")
    args = parser.parse_args()
    started = time.monotonic()
    efs = tuple(int(x) for x in args.efs.split(","))
    sentences = sts_sentences(args.data_dir)
    texts = build_texts(sentences, args.docs + args.queries)
    vectors, info = embed_cached(texts, args.threads)
    embedded = "cached" if info["embed_s"] is None else f"embedded in {info['embed_s']:.0f} s"
    print(machine_summary())
    print(
        f"{len(sentences):,} distinct STS sentences -> {len(texts):,} distinct texts of 2-3"
        f" sentences (seed {SEED}); {info['model']} {info['quant']}, {vectors.shape[1]}-d,"
        f" {embedded} ({info['cache']}); command: {' '.join(sys.argv)}"
    )
    if args.embed_only:
        return
    # Queries are the last texts: built the same way, never indexed.
    data, queries = vectors[: args.docs], vectors[args.docs :]
    work = args.work or Path(tempfile.mkdtemp(prefix="edge-agent-text-recall-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        sizes = [n for n in (args.subset, args.docs) if 0 < n <= args.docs]
        for n in sorted(set(sizes)):
            results.append(measure(data[:n], queries, work, args.threads, efs))
            print(f"  done {n:,} ({time.monotonic() - started:.0f}s)", file=sys.stderr)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    for r in results:
        for ef in efs:
            s = r["sweep"][ef]
            rows.append(
                [
                    f"{r['n']:,}",
                    str(ef) + (" (default)" if ef == IndexConfig().ef_search else ""),
                    f"{s['recall']:.4f}",
                    f"{s['p50_ms']:.3f}",
                    f"{s['p99_ms']:.3f}",
                ]
            )
    print(
        f"\nRecall@10 vs exact and latency per query ({args.queries:,} held-out texts, k={K},"
        " 1 query thread, graph search; build with M=16, ef_construction=200):\n"
    )
    print(markdown_table(["documents", "ef", "recall@10", "p50 ms", "p99 ms"], rows))
    print("\nbuild: " + ", ".join(f"{r['n']:,} in {r['build_s']:.1f} s" for r in results))
    print(json.dumps({"results": results}, default=str), file=sys.stderr)
    print(f"\ntotal {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
