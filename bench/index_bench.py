"""Index benchmark: build time, ingest throughput per fsync policy, write amplification, query
latency and recall@10, memory and disk, write latency while a snapshot is taken, reopen time
after a crash, and where exact search stops paying.

    nice .venv/bin/python bench/index_bench.py          # default run, < 8 min on 2 cores
    nice .venv/bin/python bench/index_bench.py --full   # + 100k x 1024-d, crossover, big tails
    nice .venv/bin/python bench/index_bench.py --sizes 10000 --dims 384   # one minute

The default run measures 10k and 100k at 384-d and 10k at 1024-d; --full adds 100k x 1024-d
(a 4-minute build alone on this box), the exact-vs-graph crossover table and the crash replay
of a full WAL (the default snapshot bound, 64 MiB).

Data: random unit vectors (Gaussian, normalised) for documents and queries, not embedded
text: random high-dimensional data has no cluster structure, which makes it the worst case
for HNSW recall; bench/index_text_recall.py measures recall on 100k real text embeddings.
Each (size, dims) runs in its own process, so RSS is that configuration's only; the
snapshot-stall and crash-reopen measurements reuse that configuration's collection.
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
import signal
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
SWEEP = (32, 64, 96, 128, 256, 512)
REF_N = 20_000
STALL_WRITES = 200  # single-document upserts (fsync always) timed one by one
STALL_EVERY = 100  # snapshot_wal_records during them: a snapshot starts at write 100 and 200
QUICK_MAX_FLOATS = 100_000 * 384  # the default run skips bigger configurations (--full)
BUDGET_S = 480


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


def one(
    n: int, dim: int, queries_n: int, threads: int, ef: int, work: Path, tails: list[int]
) -> dict[str, Any]:
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
    result["stall"] = {
        mode: write_stall(path, config, fp, dim, background=mode == "background")
        for mode in ("inline", "background")
    }
    result["crash"] = [crash_reopen(path, config, dim, tail) for tail in tails]
    shutil.rmtree(path)
    return result


def write_stall(
    path: Path, config: IndexConfig, fp: ModelFingerprint, dim: int, *, background: bool
) -> dict[str, Any]:
    """Per-write latency of single-document upserts while snapshots of the whole collection
    are taken: inline (the writer crossing the bound writes it, the old behaviour) or in the
    background thread (writers wait only for the graph copy and the manifest commit)."""
    rng = np.random.default_rng(dim + int(background))
    rows = unit(rng, STALL_WRITES, dim)
    cfg = replace(config, snapshot_wal_records=STALL_EVERY, snapshot_in_background=background)
    times = np.empty(STALL_WRITES)
    with Collection.open(path, cfg) as coll:
        gen0 = coll.stats().snapshot_gen or 0
        for i in range(STALL_WRITES):
            started = time.perf_counter()
            coll.upsert(fp, [str(i)], rows[i])  # replaces a document: the size stays n
            times[i] = time.perf_counter() - started
        coll.wait_for_snapshot()
        snapshots = (coll.stats().snapshot_gen or 0) - gen0
    return {
        "max_ms": float(times.max() * 1e3),
        "p50_ms": float(np.percentile(times, 50) * 1e3),
        "p99_ms": float(np.percentile(times, 99) * 1e3),
        "snapshots": snapshots,
        "stream_s": float(times.sum()),
    }


def crash_reopen(path: Path, config: IndexConfig, dim: int, tail: int) -> dict[str, Any]:
    """Open time after SIGKILL: a child adds ``tail`` documents (100 per write, fsync always,
    no snapshot: they are all WAL tail) and is killed; the open replays them."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--crash-tail", str(path), str(dim), str(tail)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    if not line.startswith("READY"):
        raise SystemExit(f"crash-tail child failed before it was killed: {line!r}")
    started = time.perf_counter()
    coll = Collection.open(path, config)
    seconds = time.perf_counter() - started
    stats = coll.stats()
    coll.close()  # snapshots the tail: the next measurement starts clean again
    return {"tail": tail, "wal_mib": stats.wal_bytes / 2**20, "open_s": seconds, "n": stats.count}


def crash_tail_child(path: Path, dim: int, tail: int) -> None:
    rng = np.random.default_rng(tail + dim)
    fp = fingerprint(dim)
    # No snapshot may cover the tail: bounds out of reach, none at close (there is no close).
    config = IndexConfig(threads=2, snapshot_wal_records=1 << 40, snapshot_wal_bytes=1 << 40)
    coll = Collection.open(path, config)
    for start in range(0, tail, 100):
        count = min(100, tail - start)
        coll.upsert(fp, [f"tail-{tail}-{start + i}" for i in range(count)], unit(rng, count, dim))
    print("READY", flush=True)
    time.sleep(3600)  # the parent kills it


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


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "| " + " | ".join("-" * (w - 1) + ":" for w in widths) + " |"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def tails_for(n: int, dim: int, full: bool) -> list[int]:
    """WAL tails (documents) replayed after a crash: 1,000, n/10 and, with --full, a full
    WAL (the default snapshot_wal_bytes bound: the most a crash can leave to replay)."""
    tails = {1000, n // 10}
    if full:
        tails.add(IndexConfig().snapshot_wal_bytes // (4 * dim + 40))
    return sorted(t for t in tails if t > 0)


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.one:
        n, dim = args.one
        out = one(n, dim, args.queries, args.threads, args.ef, work, tails_for(n, dim, args.full))
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
    parser.add_argument(
        "--full",
        action="store_true",
        help="also sizes x dims over 100k x 384 (a 4-minute build at 100k x 1024), the"
        " crossover table and full-WAL crash replays (~15 min)",
    )
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="hnswlib insert threads")
    parser.add_argument(
        "--ef", type=int, default=IndexConfig().ef_search, help="ef_search (default: the config's)"
    )
    parser.add_argument("--seconds", type=float, default=1.5, help="per ingest measurement")
    parser.add_argument("--crossover-sizes", default="1000,2000,4000,8000,16000")
    parser.add_argument("--crossover", action="store_true", help="run the crossover table")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ingest", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--crossover-dim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--crash-tail", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.crossover_sizes = [int(x) for x in args.crossover_sizes.split(",")]
    if args.crash_tail:
        crash_tail_child(Path(args.crash_tail[0]), int(args.crash_tail[1]), int(args.crash_tail[2]))
        return
    if args.one or args.ingest or args.crossover_dim:
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
        *(["--full"] if args.full else []),
    ]
    sizes = [int(x) for x in args.sizes.split(",")]
    dims = [int(x) for x in args.dims.split(",")]
    configs = [(n, dim) for dim in dims for n in sizes]
    skipped = [c for c in configs if not args.full and c[0] * c[1] > QUICK_MAX_FLOATS]
    configs = [c for c in configs if c not in skipped]
    started = time.monotonic()
    print(machine())
    print(
        f"random unit vectors; M=16, ef_construction=200, ef_search={args.ef}, k={K},"
        f" {args.threads} insert threads, 1 query thread; command: {' '.join(sys.argv)}"
    )
    if skipped:
        print("skipped (--full runs them): " + ", ".join(f"{n:,} x {d}" for n, d in skipped))
    print()

    rows = []
    results = []
    for n, dim in configs:
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

    print(
        f"\nWrite latency while snapshots are taken ({STALL_WRITES} single-document upserts,"
        f" fsync always, snapshot_wal_records={STALL_EVERY}: a snapshot of the whole collection"
        " starts at writes 100 and 200; inline = written by the writer that crosses the bound,"
        " the old behaviour; background = the default):\n"
    )
    rows = []
    for r in results:
        for mode in ("inline", "background"):
            st = r["stall"][mode]
            rows.append(
                [
                    f"{r['n']:,}",
                    str(r["dim"]),
                    mode,
                    f"{st['max_ms']:.1f}",
                    f"{st['p99_ms']:.2f}",
                    f"{st['p50_ms']:.2f}",
                    str(st["snapshots"]),
                    f"{st['stream_s']:.2f}",
                ]
            )
    print(
        table(
            [
                "vectors",
                "dims",
                "snapshot",
                "max ms",
                "p99 ms",
                "p50 ms",
                "snapshots",
                "200 writes s",
            ],
            rows,
        )
    )

    print(
        "\nOpen after SIGKILL with a WAL tail to replay (tail = documents written after the last"
        " snapshot, 100 per write; clean = open after a clean close, no tail):\n"
    )
    rows = []
    for r in results:
        rows.append([f"{r['n']:,}", str(r["dim"]), "0 (clean)", "0.0", f"{r['open_s']:.2f}", ""])
        for c in r["crash"]:
            replay = c["open_s"] - r["open_s"]
            rows.append(
                [
                    f"{r['n']:,}",
                    str(r["dim"]),
                    f"{c['tail']:,}",
                    f"{c['wal_mib']:.1f}",
                    f"{c['open_s']:.2f}",
                    f"{c['tail'] / replay:,.0f}" if replay > 0 else "",
                ]
            )
    print(table(["vectors", "dims", "tail docs", "WAL MiB", "open s", "replay docs/s"], rows))

    if not args.skip_ingest:
        rows = []
        for dim in dims:
            ingested = {}
            for batch in (1, 100):
                for policy in ("always", "batch", "off"):
                    r = run_child([*common, "--ingest", str(dim), policy, str(batch)])
                    ingested[(policy, batch)] = r
            for batch in (1, 100):
                off = ingested[("off", batch)]["docs_s"]
                rows.append(
                    [str(dim), str(batch)]
                    + [f"{ingested[(p, batch)]['docs_s']:,.0f}" for p in ("always", "batch", "off")]
                    + [f"{ingested[(p, batch)]['docs_s'] / off:.2f}" for p in ("always", "batch")]
                    + [f"{ingested[('always', batch)]['bytes_doc']:,.0f}"]
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

    if args.full or args.crossover:
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
    print("\nRecall on real text embeddings: bench/index_text_recall.py")
    took = time.monotonic() - started
    over = "" if args.full or took <= BUDGET_S else f" (over the {BUDGET_S} s budget)"
    print(f"\ntotal {took:.0f}s{over}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
