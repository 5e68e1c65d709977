"""Index benchmark: build time, ingest throughput per fsync policy, write amplification, query
latency and recall@10, memory and disk, and where exact search stops paying.

    .venv/bin/python bench/index_bench.py                      # 10k and 100k, 384-d and 1024-d
    .venv/bin/python bench/index_bench.py --sizes 10000 --dims 384   # quick

Data: random unit vectors (Gaussian, normalised) for documents and queries, not embedded
text: random high-dimensional data has no cluster structure, which makes it a hard case for
HNSW recall. Each (size, dims) runs in its own process, so RSS is that configuration's only.
Everything goes through edge_agent.index.Collection (WAL, snapshots, locks), with raw
hnswlib alongside for the overhead ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_agent.index import Collection, IndexConfig, ModelFingerprint  # noqa: E402

K = 10
SWEEP = (32, 64, 128, 256, 512)
REF_N = 20_000


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 8192):  # chunks keep the float64 temporaries small
        rows = rng.standard_normal((min(8192, n - start), dim)).astype(np.float32)
        out[start : start + len(rows)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def written_bytes() -> int:
    """Bytes this process passed to write(2) and friends (Linux /proc/self/io wchar)."""
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def fingerprint(dim: int) -> ModelFingerprint:
    return ModelFingerprint("bench-random", "0" * 64, dim, "mean")


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 100):
        scores = queries[start : start + 100] @ data.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        out[start : start + 100] = np.take_along_axis(part, order, axis=1)
    return out


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    hits = [len(set(f) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / K)


def latencies(coll: Collection, fp: ModelFingerprint, queries: np.ndarray, **kw: Any) -> tuple:
    times = np.empty(len(queries))
    found = []
    for i, query in enumerate(queries):
        started = time.perf_counter()
        hits = coll.search(fp, query, k=K, **kw)
        times[i] = time.perf_counter() - started
        found.append([int(h.id) for h in hits])
    return times, found


def one(n: int, dim: int, queries_n: int, threads: int, ef: int, work: Path) -> dict[str, Any]:
    rng = np.random.default_rng(n * 7919 + dim)
    data = unit(rng, n, dim)
    queries = unit(rng, queries_n, dim)
    ids = [str(i) for i in range(n)]
    fp = fingerprint(dim)
    result: dict[str, Any] = {"n": n, "dim": dim}

    # Raw hnswlib on the first REF_N vectors: the reference for our overhead, compared with our
    # own first REF_N (same size, same data; a full-size reference would double the run time).
    import hnswlib

    ref_n = min(n, REF_N)
    raw = hnswlib.Index(space="ip", dim=dim)
    raw.init_index(max_elements=ref_n, ef_construction=200, M=16)
    started = time.perf_counter()
    raw.add_items(data[:ref_n], np.arange(ref_n), num_threads=threads)
    result["hnswlib_ref_s"] = time.perf_counter() - started
    result["ref_n"] = ref_n
    del raw

    # Our build: 1000-document upserts, WAL fsync "always", snapshots as configured.
    config = IndexConfig(threads=threads, ef_search=ef, fsync="always")
    path = work / f"c-{n}-{dim}"
    rss0 = rss_bytes()
    wchar0 = written_bytes()
    coll = Collection.create(path, fp, config)
    started = time.perf_counter()
    for start in range(0, n, 1000):
        coll.upsert(fp, ids[start : start + 1000], data[start : start + 1000])
        if start + 1000 >= ref_n and "ours_ref_s" not in result:
            result["ours_ref_s"] = time.perf_counter() - started
    result["build_s"] = time.perf_counter() - started
    started = time.perf_counter()
    coll.snapshot()
    result["snapshot_s"] = time.perf_counter() - started
    result["written_per_doc"] = (written_bytes() - wchar0) / n
    result["rss_mib"] = (rss_bytes() - rss0) / 2**20

    times, found = latencies(coll, fp, queries)
    truth = exact_topk(data, queries, K)
    result["p50_ms"] = float(np.percentile(times, 50) * 1e3)
    result["p99_ms"] = float(np.percentile(times, 99) * 1e3)
    result["recall"] = recall(found, truth)
    result["mode"] = "exact" if coll.stats().exact_search else "graph"
    coll.close()
    result["disk_mib"] = sum(p.stat().st_size for p in path.iterdir()) / 2**20
    started = time.perf_counter()
    Collection.open(path, config).close()
    result["open_s"] = time.perf_counter() - started
    # The ef trade-off of the graph itself, even where the default would scan exactly.
    sweep = {}
    part = min(len(queries), 300)
    with Collection.open(path, replace(config, exact_search_max=0)) as coll:
        for ef_value in SWEEP:
            times, found = latencies(coll, fp, queries[:part], ef=ef_value)
            sweep[ef_value] = (float(np.percentile(times, 50) * 1e3), recall(found, truth[:part]))
    result["sweep"] = sweep
    shutil.rmtree(path)
    return result


def ingest(dim: int, policy: str, batch: int, seconds: float, work: Path) -> dict[str, Any]:
    """Upserts of ``batch`` documents for ~``seconds``: docs/s and bytes written per doc."""
    rng = np.random.default_rng(dim)
    data = unit(rng, 4096, dim)
    fp = fingerprint(dim)
    path = work / f"ingest-{policy}-{batch}-{dim}"
    coll = Collection.create(path, fp, IndexConfig(fsync=policy, threads=1))
    wchar0 = written_bytes()
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline and done < 200_000:
        rows = data[(done % 4096) : (done % 4096) + batch]
        if len(rows) < batch:
            rows = data[:batch]
        coll.upsert(fp, [f"d{done + i}" for i in range(batch)], rows)
        done += batch
    elapsed = time.perf_counter() - started
    written = written_bytes() - wchar0
    coll.close()
    shutil.rmtree(path)
    return {"policy": policy, "batch": batch, "docs_s": done / elapsed, "bytes_doc": written / done}


def crossover(dim: int, sizes: list[int], queries_n: int, work: Path) -> list[dict[str, Any]]:
    """Exact scan vs graph latency at small sizes: where the graph starts to win."""
    rows = []
    rng = np.random.default_rng(dim + 1)
    fp = fingerprint(dim)
    for n in sizes:
        data = unit(rng, n, dim)
        queries = unit(rng, queries_n, dim)
        row: dict[str, Any] = {"dim": dim, "n": n}
        for mode, exact_max in (("exact", 1_000_000), ("hnsw", 0)):
            path = work / f"x-{mode}-{n}-{dim}"
            config = IndexConfig(exact_search_max=exact_max, fsync="off", threads=2)
            with Collection.create(path, fp, config) as coll:
                for start in range(0, n, 2000):
                    coll.upsert(
                        fp,
                        [str(i) for i in range(start, min(n, start + 2000))],
                        data[start : start + 2000],
                    )
                times, found = latencies(coll, fp, queries)
                truth = exact_topk(data, queries, K)
                row[f"{mode}_p50_ms"] = float(np.percentile(times, 50) * 1e3)
                row[f"{mode}_recall"] = recall(found, truth)
            shutil.rmtree(path)
        rows.append(row)
    return rows


def real_text(work: Path, held_out: int = 500) -> dict[str, Any] | None:
    """Recall on real embeddings (the STS sentences, default model) vs random vectors."""
    from edge_agent.embedder import Embedder, EmbedderConfig
    from edge_agent.models import DEFAULT_MODEL, ModelStore, prepare_default

    data_dir = REPO.parent / "shared" / "data" / "sts"
    files = sorted(data_dir.glob("*.tsv"))
    if not files:
        return None
    sentences: dict[str, None] = {}
    for file in files:
        for line in file.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                sentences.setdefault(parts[1].strip(), None)
                sentences.setdefault(parts[2].strip(), None)
    texts = [t for t in sentences if t]
    store = ModelStore(work / "models")
    prepare_default(store)
    with Embedder.open(store, DEFAULT_MODEL, "Q8_0", EmbedderConfig(threads=2)) as embedder:
        vectors = np.concatenate(
            [embedder.embed(texts[i : i + 256]).vectors for i in range(0, len(texts), 256)]
        )
    rng = np.random.default_rng(5)
    order = rng.permutation(len(texts))
    queries, data = vectors[order[:held_out]], vectors[order[held_out:]]
    out: dict[str, Any] = {
        "n": len(data),
        "dim": data.shape[1],
        "queries": held_out,
        "model": f"{DEFAULT_MODEL} Q8_0",
    }
    for name, (rows, qs) in {
        "real": (data, queries),
        "random": (unit(rng, len(data), data.shape[1]), unit(rng, held_out, data.shape[1])),
    }.items():
        fp = fingerprint(rows.shape[1])
        path = work / f"real-{name}"
        config = IndexConfig(exact_search_max=0, fsync="off", threads=2)
        with Collection.create(path, fp, config) as coll:
            coll.upsert(fp, [str(i) for i in range(len(rows))], rows)
            truth = exact_topk(rows, qs, K)
            sweep = {}
            for ef_value in SWEEP:
                times, found = latencies(coll, fp, qs, ef=ef_value)
                sweep[ef_value] = (float(np.percentile(times, 50) * 1e3), recall(found, truth))
            out[name] = sweep
        shutil.rmtree(path)
    return out


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "| " + " | ".join("-" * (w - 1) + ":" for w in widths) + " |"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.one:
        n, dim = args.one
        out = one(n, dim, args.queries, args.threads, args.ef, work)
    elif args.real_text:
        out = real_text(work)
    elif args.ingest:
        dim, policy, batch = int(args.ingest[0]), args.ingest[1], int(args.ingest[2])
        out = ingest(dim, policy, batch, args.seconds, work)
    else:
        out = crossover(args.crossover_dim, args.crossover_sizes, args.queries // 2, work)
    print("RESULT " + json.dumps(out))


def run_child(argv: list[str]) -> Any:
    proc = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {argv} failed")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    import hnswlib  # noqa: F401

    return (
        f"{cpu}, {os.cpu_count()} logical cores, load average {load}; Python"
        f" {platform.python_version()}, numpy {np.__version__}; {datetime.date.today()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="collection sizes, comma-separated")
    parser.add_argument("--dims", default="384,1024", help="vector sizes, comma-separated")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="hnswlib insert threads")
    parser.add_argument("--ef", type=int, default=64, help="ef_search (the default config's)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per ingest measurement")
    parser.add_argument("--crossover-sizes", default="1000,2000,4000,8000,16000")
    parser.add_argument("--skip-crossover", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument(
        "--skip-real-text",
        action="store_true",
        help="skip embedding the STS sentences with the default model (~1-2 min)",
    )
    parser.add_argument("--real-text", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ingest", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--crossover-dim", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.crossover_sizes = [int(x) for x in args.crossover_sizes.split(",")]
    if args.one or args.ingest or args.crossover_dim or args.real_text:
        child(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="edge-agent-index-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    common = [
        "--work",
        str(work),
        "--queries",
        str(args.queries),
        "--threads",
        str(args.threads),
        "--ef",
        str(args.ef),
        "--seconds",
        str(args.seconds),
        "--crossover-sizes",
        ",".join(map(str, args.crossover_sizes)),
    ]
    sizes = [int(x) for x in args.sizes.split(",")]
    dims = [int(x) for x in args.dims.split(",")]
    started = time.monotonic()
    print(machine())
    print(
        f"random unit vectors; M=16, ef_construction=200, ef_search={args.ef}, k={K},"
        f" {args.threads} insert threads, 1 query thread; command: {' '.join(sys.argv)}\n"
    )

    rows = []
    results = []
    for dim in dims:
        for n in sizes:
            r = run_child([*common, "--one", str(n), str(dim)])
            results.append(r)
            raw_rate = r["ref_n"] / r["hnswlib_ref_s"]
            ref_rate = r["ref_n"] / r["ours_ref_s"]
            rate = n / r["build_s"]
            rows.append(
                [
                    f"{n:,}",
                    str(dim),
                    r["mode"],
                    f"{rate:,.0f}",
                    f"{ref_rate:,.0f}",
                    f"{raw_rate:,.0f}",
                    f"{ref_rate / raw_rate:.2f}",
                    f"{r['snapshot_s']:.2f}",
                    f"{r['p50_ms']:.3f}",
                    f"{r['p99_ms']:.3f}",
                    f"{r['recall']:.4f}",
                    f"{r['rss_mib']:.0f}",
                    f"{r['disk_mib']:.0f}",
                    f"{r['written_per_doc']:,.0f}",
                    f"{r['written_per_doc'] / (4 * dim):.2f}",
                    f"{r['open_s']:.2f}",
                ]
            )
            print(f"  done {n}x{dim} ({time.monotonic() - started:.0f}s)", file=sys.stderr)
    print(
        "Build, search, memory, disk (build = upserts of 1000 documents, fsync always;"
        f" @ref: the first min(n, {REF_N:,}) vectors, hnswlib alone vs ours at the same point;"
        " written = bytes passed to write(2) per document, WAL + snapshots):\n"
    )
    print(
        table(
            [
                "vectors",
                "dims",
                "search",
                "build vec/s",
                "ours vec/s @ref",
                "hnswlib vec/s @ref",
                "ratio",
                "snapshot s",
                "p50 ms",
                "p99 ms",
                "recall@10",
                "RSS MiB",
                "disk MiB",
                "written B/doc",
                "x vector bytes",
                "reopen s",
            ],
            rows,
        )
    )

    print("\nRecall@10 / p50 ms of the graph by ef (300 queries; exact scan off):\n")
    print(
        table(
            ["vectors", "dims", *[f"ef={e}" for e in SWEEP]],
            [
                [f"{r['n']:,}", str(r["dim"])]
                + [f"{r['sweep'][str(e)][1]:.3f} / {r['sweep'][str(e)][0]:.2f}" for e in SWEEP]
                for r in results
            ],
        )
    )

    if not args.skip_real_text:
        r = run_child([*common, "--real-text"])
        if r:
            print(
                f"\nReal text vs random at the same size ({r['n']:,} STS sentences embedded with"
                f" {r['model']}, {r['dim']}-d; {r['queries']} held-out sentences as queries;"
                " graph forced, exact scan off):\n"
            )
            print(
                table(
                    ["data", *[f"ef={e}" for e in SWEEP]],
                    [
                        [name]
                        + [f"{r[name][str(e)][1]:.3f} / {r[name][str(e)][0]:.2f}" for e in SWEEP]
                        for name in ("real", "random")
                    ],
                )
            )

    if not args.skip_ingest:
        rows = []
        for dim in dims:
            results = {}
            for batch in (1, 100):
                for policy in ("always", "batch", "off"):
                    r = run_child([*common, "--ingest", str(dim), policy, str(batch)])
                    results[(policy, batch)] = r
            for batch in (1, 100):
                off = results[("off", batch)]["docs_s"]
                rows.append(
                    [str(dim), str(batch)]
                    + [f"{results[(p, batch)]['docs_s']:,.0f}" for p in ("always", "batch", "off")]
                    + [f"{results[(p, batch)]['docs_s'] / off:.2f}" for p in ("always", "batch")]
                    + [f"{results[('always', batch)]['bytes_doc']:,.0f}"]
                )
        print(
            f"\nIngest throughput by fsync policy (docs/s, ~{args.seconds:g} s each, 1 thread,"
            " starting empty; batch = documents per upsert call):\n"
        )
        print(
            table(
                [
                    "dims",
                    "batch",
                    "always",
                    "batch (20 ms)",
                    "off",
                    "always/off",
                    "batch/off",
                    "written B/doc",
                ],
                rows,
            )
        )

    if not args.skip_crossover:
        rows = []
        for dim in dims:
            for r in run_child([*common, "--crossover-dim", str(dim)]):
                rows.append(
                    [
                        f"{r['n']:,}",
                        str(dim),
                        f"{r['exact_p50_ms']:.3f}",
                        f"{r['hnsw_p50_ms']:.3f}",
                        f"{r['exact_p50_ms'] / r['hnsw_p50_ms']:.2f}",
                        f"{r['exact_recall']:.4f}",
                        f"{r['hnsw_recall']:.4f}",
                    ]
                )
        print("\nExact scan vs HNSW graph at small sizes (p50 per query, k=10):\n")
        print(
            table(
                [
                    "vectors",
                    "dims",
                    "exact p50 ms",
                    "hnsw p50 ms",
                    "exact/hnsw",
                    "exact recall",
                    "hnsw recall",
                ],
                rows,
            )
        )
    print(f"\ntotal {time.monotonic() - started:.0f}s")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
