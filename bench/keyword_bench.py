"""The keyword (BM25) index: build speed, query latency, memory and disk, and quality.

    nice -n 10 .venv/bin/python bench/keyword_bench.py               # 100k documents
    nice -n 10 .venv/bin/python bench/keyword_bench.py --docs 30000
    .venv/bin/python bench/keyword_bench.py --quality                # TREC QA MRR@10 only

Speed: a corpus of --docs texts built from the TREC QA answer sentences in
../shared/data/retrieval (every distinct sentence, each followed by a seeded random run of
5-15 words of another, so the texts are distinct and the vocabulary is real English news),
queried with the TREC QA questions. Each engine runs in its own child process so that its
RSS delta (VmRSS after building and querying minus before) is its own. SQLite FTS5
(edge_agent.index.keywords.KeywordIndex) is loaded the way a collection feeds it: batches
of 1,000 documents, one transaction (with its lsn) each, then ``optimize()``; latencies are
single queries, k=10, unfiltered and with a filter accepting 1 label in 10. ``bm25s`` (an
in-memory sparse-matrix BM25) is compared when it is importable (``pip install bm25s``; it
is not a dependency of edge-agent): its default tokenizer with English stop words, no
stemmer, one query at a time, filtered with its ``weight_mask``. The FTS5 notes also give
plain BM25 without the common-word cutoff (latency, and how many of its top 10 the default
finds) and the cost of ``reconcile()`` when a collection opens.

Quality (--quality, and printed after the speed table): open-corpus retrieval on
trecqa-train and trecqa-dev (the corpus is every distinct answer sentence, the queries the
questions with a relevant one), MRR@10 and recall@10, for FTS5 with and without the Porter
stemmer (and bm25s).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_summary, markdown_table  # noqa: E402

from edge_agent.index.keywords import KeywordIndex  # noqa: E402

DATA_DIR = REPO.parent / "shared" / "data" / "retrieval"
SEED = 20240611
BATCH = 1000
K = 10


# -- data ------------------------------------------------------------------------------------------


def read_split(data_dir: Path, split: str) -> tuple[list[str], dict[str, set[int]]]:
    """(distinct answer sentences, question -> indexes of its relevant sentences)."""
    path = data_dir / f"trecqa-{split}.csv"
    if not path.is_file():
        sys.exit(f"error: no TREC QA data: {path} is missing (see {data_dir}/README.md)")
    sentences: dict[str, int] = {}
    relevant: dict[str, set[int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            index = sentences.setdefault(row["atext"], len(sentences))
            if row["label"].strip() == "1":
                relevant.setdefault(row["qtext"], set()).add(index)
    return list(sentences), relevant


def corpus(data_dir: Path, docs: int) -> tuple[list[str], dict[str, set[int]]]:
    """``docs`` distinct texts, and the questions to query them with, each with the texts
    that begin with one of its relevant sentences."""
    sentences: dict[str, None] = {}
    good: dict[str, set[str]] = {}
    for split in ("train", "dev"):
        texts, relevant = read_split(data_dir, split)
        sentences.update(dict.fromkeys(texts))
        for question, indexes in relevant.items():
            good.setdefault(question, set()).update(texts[i] for i in indexes)
    base = list(sentences)
    rng = random.Random(SEED)
    out = []
    for i in range(docs):
        words = base[rng.randrange(len(base))].split()
        n = rng.randint(5, 15)
        start = rng.randrange(max(1, len(words) - n))
        out.append(f"{base[i % len(base)]} {' '.join(words[start : start + n])}")
    judged = {
        question: {i for i in range(docs) if base[i % len(base)] in relevant}
        for question, relevant in good.items()
    }
    return out, judged


# -- measurements ------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000


def mrr_at_k(ranked: list[int], good: set[int]) -> float:
    return next((1.0 / (i + 1) for i, label in enumerate(ranked[:K]) if label in good), 0.0)


def run_fts5(
    texts: list[str], queries: list[str], workdir: Path, judged: dict[str, set[int]]
) -> dict[str, Any]:
    rss0 = rss_bytes()
    start = time.perf_counter()
    index = KeywordIndex(workdir / "keywords.sqlite")
    for lsn, offset in enumerate(range(0, len(texts), BATCH), start=1):
        rows = [(offset + i, t) for i, t in enumerate(texts[offset : offset + BATCH])]
        index.upsert(rows, lsn=lsn)
    build = time.perf_counter() - start
    start = time.perf_counter()
    index.optimize()
    optimize = time.perf_counter() - start
    for query in queries[:20]:
        index.search(query, K)
    times = []
    for query in queries:
        t0 = time.perf_counter()
        index.search(query, K)
        times.append(time.perf_counter() - t0)
    filtered = []
    for query in queries:
        t0 = time.perf_counter()
        index.search(query, K, allowed=lambda label: label % 10 == 0)
        filtered.append(time.perf_counter() - t0)
    rss1 = rss_bytes()
    # What a collection's open costs: keep the rows of labels its snapshot had given out,
    # rewrite the last 1,000 (the ones its WAL replay gave out again).
    start = time.perf_counter()
    index.reconcile(
        dict(enumerate(texts)),
        lsn=index.applied_lsn + 1,
        base_lsn=1,
        base_next_label=max(0, len(texts) - 1000),
    )
    reconcile = time.perf_counter() - start
    # The same file without the common-word cutoff: plain BM25 over every matching document.
    exact = KeywordIndex(workdir / "keywords.sqlite", common_fraction=1.0, common_min_df=2**62)
    exact_times, agree, mrr, mrr_exact = [], 0.0, 0.0, 0.0
    for query, good in judged.items():
        t0 = time.perf_counter()
        want = [label for label, _ in exact.search(query, K)]
        exact_times.append(time.perf_counter() - t0)
        got = [label for label, _ in index.search(query, K)]
        agree += len(set(want) & set(got)) / max(1, len(want))
        mrr += mrr_at_k(got, good)
        mrr_exact += mrr_at_k(want, good)
    exact.close()
    index.close()
    p50, p99 = percentiles(times)
    f50, f99 = percentiles(filtered)
    e50, e99 = percentiles(exact_times)
    return {
        "engine": "SQLite FTS5 (porter unicode61)",
        "build_docs_s": len(texts) / build,
        "optimize_s": optimize,
        "p50_ms": p50,
        "p99_ms": p99,
        "filtered_p50_ms": f50,
        "filtered_p99_ms": f99,
        "rss_delta": rss1 - rss0,
        "disk": dir_bytes(workdir),
        "exact_p50_ms": e50,
        "exact_p99_ms": e99,
        "agreement": agree / len(exact_times),
        "mrr": mrr / len(judged),
        "mrr_exact": mrr_exact / len(judged),
        "judged": len(judged),
        "reconcile_s": reconcile,
    }


def run_bm25s(
    texts: list[str], queries: list[str], workdir: Path, judged: dict[str, set[int]]
) -> dict[str, Any]:
    import bm25s

    rss0 = rss_bytes()
    start = time.perf_counter()
    tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    build = time.perf_counter() - start

    import numpy as np

    # bm25s filters with a weight per document (a mask built once here; a caller would have
    # to build one per filter, which is not timed).
    mask = (np.arange(len(texts)) % 10 == 0).astype(np.float32)

    def search(query: str, weight_mask: Any = None) -> None:
        q = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if q.vocab:
            retriever.retrieve(q, k=K, show_progress=False, n_threads=1, weight_mask=weight_mask)

    for query in queries[:20]:
        search(query)
    times = []
    for query in queries:
        t0 = time.perf_counter()
        search(query)
        times.append(time.perf_counter() - t0)
    filtered = []
    for query in queries:
        t0 = time.perf_counter()
        search(query, mask)
        filtered.append(time.perf_counter() - t0)
    rss1 = rss_bytes()
    retriever.save(str(workdir / "bm25s"))
    p50, p99 = percentiles(times)
    f50, f99 = percentiles(filtered)
    return {
        "engine": f"bm25s {getattr(bm25s, '__version__', '')} (in memory)",
        "build_docs_s": len(texts) / build,
        "optimize_s": None,
        "p50_ms": p50,
        "p99_ms": p99,
        "filtered_p50_ms": f50,
        "filtered_p99_ms": f99,
        "rss_delta": rss1 - rss0,
        "disk": dir_bytes(workdir / "bm25s"),
    }


def child(args: argparse.Namespace) -> None:
    texts, judged = corpus(args.data_dir, args.docs)
    questions = list(judged)
    rng = random.Random(SEED + 1)
    queries = [questions[rng.randrange(len(questions))] for _ in range(args.queries)]
    workdir = Path(tempfile.mkdtemp(prefix="kwbench-"))
    try:
        run = run_fts5 if args.engine == "fts5" else run_bm25s
        result = run(texts, queries, workdir, judged)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


# -- quality -------------------------------------------------------------------------------------


def quality(data_dir: Path) -> list[list[str]]:
    rows = []
    for split in ("train", "dev"):
        sentences, relevant = read_split(data_dir, split)
        engines: list[tuple[str, Any]] = []
        workdir = Path(tempfile.mkdtemp(prefix="kwquality-"))
        plain = {"common_fraction": 1.0, "common_min_df": 2**62}
        variants = [
            ("FTS5 porter unicode61 (default)", {}),
            ("FTS5 porter unicode61, plain BM25 (no common-word cutoff)", plain),
            ("FTS5 unicode61 (no stemmer)", {"stem": False}),
        ]
        for n, (name, options) in enumerate(variants):
            index = KeywordIndex(workdir / f"kw-{n}.sqlite", **options)
            index.upsert(list(enumerate(sentences)), lsn=1)
            engines.append((name, index))
        try:
            import bm25s

            retriever = bm25s.BM25()
            retriever.index(
                bm25s.tokenize(sentences, stopwords="en", show_progress=False), show_progress=False
            )
            engines.append(("bm25s (en stop words)", (bm25s, retriever)))
        except ImportError:
            pass
        for name, engine in engines:
            mrr = recall = 0.0
            for question, good in relevant.items():
                if isinstance(engine, KeywordIndex):
                    ranked = [label for label, _ in engine.search(question, K)]
                else:
                    lib, retriever = engine
                    q = lib.tokenize([question], stopwords="en", show_progress=False)
                    docs, _ = retriever.retrieve(q, k=K, show_progress=False)
                    ranked = [int(d) for d in docs[0]]
                first = next((i for i, label in enumerate(ranked) if label in good), None)
                mrr += 0.0 if first is None else 1.0 / (first + 1)
                recall += len(good.intersection(ranked)) / len(good)
            n = len(relevant)
            rows.append([f"trecqa-{split}", name, f"{mrr / n:.3f}", f"{recall / n:.3f}"])
            if isinstance(engine, KeywordIndex):
                engine.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


# -- main ----------------------------------------------------------------------------------------


def mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--quality", action="store_true", help="only the TREC QA quality table")
    parser.add_argument("--engine", choices=("fts5", "bm25s"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        child(args)
        return
    print(machine_summary())
    if not args.quality:
        engines = ["fts5"]
        try:
            import bm25s  # noqa: F401

            engines.append("bm25s")
        except ImportError:
            print("(bm25s is not installed: FTS5 only)")
        rows, notes = [], []
        for engine in engines:
            cmd = [
                sys.executable,
                __file__,
                "--engine",
                engine,
                "--docs",
                str(args.docs),
                "--queries",
                str(args.queries),
                "--data-dir",
                str(args.data_dir),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])

            def ms(key: str, r: dict[str, Any] = r) -> str:
                return "n/a" if r[key] is None else f"{r[key]:.2f}"

            if "agreement" in r:
                agreement = f"{r['agreement']:.3f}"
                notes.append(
                    f"FTS5 vs plain BM25 without the common-word cutoff, over the"
                    f" {r['judged']} TREC QA questions with a relevant sentence (a text is"
                    f" relevant when it begins with one): MRR@10 {r['mrr']:.3f} vs"
                    f" {r['mrr_exact']:.3f}, top-10 agreement {agreement}; plain BM25 p50"
                    f" {r['exact_p50_ms']:.1f} ms, p99 {r['exact_p99_ms']:.1f} ms."
                    f" reconcile() at open, last 1,000 labels rewritten: {r['reconcile_s']:.2f} s."
                )
            rows.append(
                [
                    r["engine"],
                    f"{r['build_docs_s']:,.0f}",
                    "n/a" if r["optimize_s"] is None else f"{r['optimize_s']:.1f}",
                    ms("p50_ms"),
                    ms("p99_ms"),
                    ms("filtered_p50_ms"),
                    ms("filtered_p99_ms"),
                    mib(r["rss_delta"]),
                    mib(r["disk"]),
                ]
            )
        print(f"\n{args.docs:,} documents, {args.queries:,} queries (TREC QA questions), k={K}\n")
        print(
            markdown_table(
                [
                    "engine",
                    "build docs/s",
                    "optimize s",
                    "p50 ms",
                    "p99 ms",
                    "filtered p50 ms",
                    "filtered p99 ms",
                    "RSS delta",
                    "on disk",
                ],
                rows,
            )
        )
        for note in notes:
            print(f"\n{note}")
    print("\nOpen-corpus retrieval quality (TREC QA, k=10)\n")
    print(markdown_table(["split", "engine", "MRR@10", "recall@10"], quality(args.data_dir)))


if __name__ == "__main__":
    main()
