"""Search latency by mode at corpus size, through the real daemon, one run.

A collection of ``--docs`` documents (default 100,000) is loaded with ``add_vectors``: texts
are the TREC QA answer sentences of ../shared/data/retrieval/ cycled with a running number (so
the keyword index sees real English at real size), vectors are seeded random unit vectors
(the slowest case for the graph; no 100k embeddings to compute first). Then the TREC QA
questions are searched by text in each mode, the modes interleaved query by query so they
see the same machine; p50/p90/p99 as the client sees them, with the daemon's split between
embedding the query and searching.

    python bench/hybrid_latency.py [--docs 100000] [--queries 300] [--quant Q8_0]

Target (issue #14): hybrid p50 <= 1.5x dense p50.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import REPO, add_common_args, machine_summary, markdown_table, open_store, start_daemon

from edge_agent.client import Client

RETRIEVAL = REPO.parent / "shared" / "data" / "retrieval" / "trecqa-train.csv"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(fraction * len(ordered))) - 1))]


def _held(client: Client) -> int:
    names = [c["name"] for c in client.collections()]
    return int(client.count("big")) if "big" in names else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--quant", default="Q8_0")
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the daemon's index here and reuse it on the next run (skips the load when"
        " the collection already holds --docs documents); default: a temporary folder",
    )
    args = parser.parse_args()
    with open(RETRIEVAL, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    sentences = list(dict.fromkeys(r["atext"] for r in rows))
    questions = list(dict.fromkeys(r["qtext"] for r in rows))[: args.queries]
    store = open_store(args.models_dir)
    modes: list[tuple[str, dict[str, Any]]] = [
        ("dense", {"mode": "dense"}),
        ("keyword", {"mode": "keyword"}),
        ("hybrid rrf", {"mode": "hybrid", "fusion": "rrf"}),
        ("hybrid weighted", {"mode": "hybrid", "fusion": "weighted"}),
    ]
    print(machine_summary())
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        proc, socket_path = start_daemon(args, workdir, store.root)
        try:
            with Client(socket_path, timeout=600) as client:
                dims = client.hello()["dims"]
                started = time.perf_counter()
                held = _held(client)
                if held not in (0, args.docs):
                    raise SystemExit(f"{workdir} holds {held} documents, not {args.docs}")
                for start in range(held, args.docs, 1000):
                    count = min(1000, args.docs - start)
                    vectors = rng.standard_normal((count, dims)).astype(np.float32)
                    ids = [str(start + i) for i in range(count)]
                    texts = [
                        f"{sentences[(start + i) % len(sentences)]} (note {start + i})"
                        for i in range(count)
                    ]
                    client.add_vectors("big", ids, vectors, texts=texts)
                print(
                    f"{args.docs} documents loaded in {time.perf_counter() - started:.0f}s",
                    file=sys.stderr,
                )
                time.sleep(5)  # let the load's snapshot settle
                for question in questions[:20]:  # warm up every path
                    for _, search in modes:
                        client.search("big", question, k=10, include_text=False, **search)
                latency: dict[str, list[float]] = {name: [] for name, _ in modes}
                inner: dict[str, list[float]] = {name: [] for name, _ in modes}
                for question in questions:
                    for name, search in modes:
                        t0 = time.perf_counter()
                        result = client.call(
                            "search",
                            {"collection": "big", "text": question, "k": 10,
                             "include_text": False, **search},
                        )  # fmt: skip
                        latency[name].append((time.perf_counter() - t0) * 1000)
                        inner[name].append(result["timing_ms"]["search"])
        finally:
            proc.terminate()
            proc.wait(60)
    dense_p50 = percentile(latency["dense"], 0.5)
    table = [
        [
            name,
            f"{percentile(latency[name], 0.5):.2f}",
            f"{percentile(latency[name], 0.9):.2f}",
            f"{percentile(latency[name], 0.99):.2f}",
            f"{percentile(inner[name], 0.5):.2f}",
            f"{percentile(latency[name], 0.5) / dense_p50:.2f}",
        ]
        for name, _ in modes
    ]
    print(f"\n### Search by text over {args.docs} documents ({args.quant}, k = 10,"
          f" {len(questions)} queries per mode)\n")  # fmt: skip
    print(markdown_table(
        ["mode", "p50 ms", "p90 ms", "p99 ms", "index part p50 ms", "p50 vs dense"], table
    ))  # fmt: skip


if __name__ == "__main__":
    main()
