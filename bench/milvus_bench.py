"""A Milvus collection against a local one, through the real daemon, one run.

The daemon (``edge-agent serve``) and a Milvus Lite gRPC server (``milvus-lite server`` on a
loopback port) run as subprocesses. The same ``--docs`` texts (the TREC QA answer sentences of
../shared/data/retrieval/ cycled with a running number) go into a local collection and a
Milvus one:

* add, the daemon embedding: ``add`` in batches of 64 texts, documents per second;
* add_vectors, storage alone: seeded random unit vectors with the texts, batches of 500;
* search by text, k 10, each mode, the two backends interleaved query by query: p50/p99 as
  the client sees them (embedding the query included) and the daemon's search part alone.

    python bench/milvus_bench.py [--docs 10000] [--queries 200] [--quant Q8_0]
"""

from __future__ import annotations

import argparse
import csv
import socket
import subprocess
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


def start_milvus(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("milvus-lite server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--quant", default="Q8_0")
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    if not RETRIEVAL.is_file():
        raise SystemExit(f"missing {RETRIEVAL} (../shared/data/retrieval/, see its README)")
    with open(RETRIEVAL, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    sentences = list(dict.fromkeys(r["atext"] for r in rows))
    questions = list(dict.fromkeys(r["qtext"] for r in rows))[: args.queries]
    texts = [f"{sentences[i % len(sentences)]} (note {i})" for i in range(args.docs)]
    store = open_store(args.models_dir)
    print(machine_summary())
    rng = np.random.default_rng(0)
    adds: list[list[str]] = []
    latency: dict[tuple[str, str], list[float]] = {}
    inner: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        milvus, uri = start_milvus(workdir / "milvus")
        proc, socket_path = start_daemon(args, workdir, store.root)
        try:
            with Client(socket_path, timeout=600) as client:
                dims = client.hello()["dims"]
                backends: dict[str, dict[str, Any]] = {
                    "local": {"backend": "local"},
                    "milvus": {"backend": "milvus", "uri": uri},
                }
                for backend, how in backends.items():
                    client.create_collection(f"{backend}-text", **how)
                    client.create_collection(f"{backend}-vec", **how)
                for backend in backends:
                    started = time.perf_counter()
                    for start in range(0, args.docs, 64):
                        batch = [
                            {"id": str(i), "text": texts[i]}
                            for i in range(start, min(args.docs, start + 64))
                        ]
                        client.add(f"{backend}-text", batch)
                    seconds = time.perf_counter() - started
                    adds.append([f"{backend}: add (daemon embeds), batches of 64",
                                 f"{args.docs / seconds:.0f}", f"{seconds:.1f}"])  # fmt: skip
                    print(f"{backend} add: {seconds:.1f}s", file=sys.stderr)
                for backend in backends:
                    started = time.perf_counter()
                    for start in range(0, args.docs, 500):
                        count = min(500, args.docs - start)
                        vectors = rng.standard_normal((count, dims)).astype(np.float32)
                        client.add_vectors(
                            f"{backend}-vec",
                            [str(start + i) for i in range(count)],
                            vectors,
                            texts=texts[start : start + count],
                        )
                    seconds = time.perf_counter() - started
                    adds.append([f"{backend}: add_vectors (storage alone), batches of 500",
                                 f"{args.docs / seconds:.0f}", f"{seconds:.1f}"])  # fmt: skip
                for backend in backends:
                    assert client.count(f"{backend}-text") == args.docs
                modes: list[tuple[str, dict[str, Any]]] = [
                    ("dense", {"mode": "dense"}),
                    ("keyword", {"mode": "keyword"}),
                    ("hybrid rrf", {"mode": "hybrid", "fusion": "rrf"}),
                    ("hybrid weighted", {"mode": "hybrid", "fusion": "weighted"}),
                ]
                for question in questions[:10]:  # warm up every path
                    for backend in backends:
                        for _, search in modes:
                            client.search(f"{backend}-text", question, k=10, **search)
                for question in questions:
                    for name, search in modes:
                        for backend in backends:
                            t0 = time.perf_counter()
                            result = client.call(
                                "search",
                                {"collection": f"{backend}-text", "text": question, "k": 10,
                                 "include_text": False, **search},
                            )  # fmt: skip
                            key = (backend, name)
                            latency.setdefault(key, []).append((time.perf_counter() - t0) * 1000)
                            inner.setdefault(key, []).append(result["timing_ms"]["search"])
        finally:
            proc.terminate()
            proc.wait(60)
            milvus.kill()
            milvus.wait(30)
    print(f"\n{args.docs} documents, {len(questions)} TREC QA questions, k 10, --quant {args.quant}"
          f" --threads {args.threads}; Milvus: milvus-lite server on loopback\n")  # fmt: skip
    print(markdown_table(["write", "docs/s", "seconds"], adds))
    print()
    table = [
        [
            backend,
            name,
            f"{percentile(latency[(backend, name)], 0.5):.2f}",
            f"{percentile(latency[(backend, name)], 0.99):.2f}",
            f"{percentile(inner[(backend, name)], 0.5):.2f}",
            f"{percentile(inner[(backend, name)], 0.99):.2f}",
        ]
        for name, _ in modes
        for backend in ("local", "milvus")
    ]
    print(
        markdown_table(
            ["backend", "mode", "p50 ms", "p99 ms", "search p50 ms", "search p99 ms"], table
        )
    )


if __name__ == "__main__":
    main()
