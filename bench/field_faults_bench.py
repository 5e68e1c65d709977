"""Latency under the two field conditions of issue #12, old behaviour against new, one run.

1. CPU contention: single-text ``embed`` latency (p50/p90/p99) through the daemon on an idle
   box and with ``--busy`` busy-loop processes on the CPUs, with adaptive engine threads on
   (the default) and off (``EDGE_AGENT_ADAPTIVE_THREADS=0``, what the daemon did before);
   plus idle throughput of back-to-back single texts and of 64-text batches, to show the
   idle speed is kept.
2. Queries during bulk indexing: one client adds ``--bulk-docs`` chunks of ~700 characters
   (the Python standard library's module docstrings, cut into chunks: text a desktop indexer
   would see) in 64-document ``add`` requests while another searches by text every 50 ms;
   search latency idle and during the bulk add, and the bulk add's throughput with and
   without the searches, for three schedulers: the query lane (the default: queries that
   meet document work run on a second one-thread engine), query priority + slices without a
   lane (``EDGE_AGENT_QUERY_LANE=0``) and neither (``EDGE_AGENT_SLICE_TIME=60``,
   ``EDGE_AGENT_QUERY_STREAK=1``: whole requests, first come first served, as before).

    python bench/field_faults_bench.py [--quant Q8_0] [--threads 2] [--busy 2]
                                       [--single 200] [--bulk-docs 536] [--rounds 2]

Targets (issue #12): with two busy loops, single-text p50 <= 3x idle and p99 <= 50 ms, idle
throughput within 5%; search p90 during the bulk add <= 3x idle p90, bulk throughput >= 0.9x.
"""

from __future__ import annotations

import argparse
import pkgutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from _common import add_common_args, machine_summary, markdown_table, open_store, start_daemon

from edge_agent.client import Client


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.999999) - 1))]


def stop_daemon(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def busy_loops(count: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


def single_latencies(client: Client, texts: list[str]) -> tuple[list[float], float]:
    latencies = []
    started = time.perf_counter()
    for text in texts:
        t0 = time.perf_counter()
        client.embed([text])
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies, len(texts) / (time.perf_counter() - started)


def batch_throughput(client: Client, texts: list[str], batch: int = 64) -> float:
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        client.embed(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - started)


def stdlib_chunks(count: int, size: int = 700) -> list[str]:
    """Module docstrings of the standard library, in chunks of about ``size`` characters."""
    chunks: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
            if info.name.startswith("_") or info.name in ("antigravity", "this", "idlelib"):
                continue
            try:
                module = __import__(info.name)
            except BaseException:
                continue
            text = " ".join((module.__doc__ or "").split())
            for start in range(0, len(text) - size // 2, size):
                chunks.append(text[start : start + size])
                if len(chunks) >= count:
                    return chunks
    while len(chunks) < count:  # a small Python install: repeat with a marker
        chunks.append(f"{chunks[len(chunks) % max(1, len(chunks))]} ({len(chunks)})")
    return chunks


QUERIES = [
    "how do I read a file line by line",
    "parse command line arguments",
    "compress data with gzip",
    "send an email message",
    "regular expression matching",
    "serialize objects to json",
    "run a subprocess and capture output",
    "date and time arithmetic",
]


def contention(args: argparse.Namespace, models_dir: Path, texts: list[str]) -> list[list[str]]:
    rows: list[list[str]] = []
    for label, env in (
        ("adaptive threads (new)", {}),
        ("fixed threads (before)", {"EDGE_AGENT_ADAPTIVE_THREADS": "0"}),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            proc, socket_path = start_daemon(args, Path(tmp), models_dir, env)
            try:
                with Client(socket_path, timeout=600) as client:
                    client.embed(texts[:20])
                    for round_index in range(args.rounds):
                        idle, idle_rate = single_latencies(client, texts)
                        batch_rate = batch_throughput(client, texts * 4)
                        loops = busy_loops(args.busy, 600)
                        try:
                            time.sleep(1.0)  # the sampler sees them within ~0.5 s
                            busy, _ = single_latencies(client, texts)
                        finally:
                            for loop in loops:
                                loop.kill()
                                loop.wait()
                        time.sleep(1.0)
                        rows.append([
                            label, str(round_index + 1),
                            f"{percentile(idle, 0.5):.1f}", f"{percentile(idle, 0.99):.1f}",
                            f"{idle_rate:.0f}", f"{batch_rate:.0f}",
                            f"{percentile(busy, 0.5):.1f}", f"{percentile(busy, 0.9):.1f}",
                            f"{percentile(busy, 0.99):.1f}",
                            f"{percentile(busy, 0.5) / percentile(idle, 0.5):.2f}",
                        ])  # fmt: skip
                        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
            finally:
                stop_daemon(proc)
    return rows


def search_during_bulk(
    args: argparse.Namespace, models_dir: Path, chunks: list[str]
) -> list[list[str]]:
    rows: list[list[str]] = []
    for label, env in (
        ("query lane (new)", {}),
        ("query first + slices, no lane", {"EDGE_AGENT_QUERY_LANE": "0"}),
        ("FIFO whole requests (before)",
         {"EDGE_AGENT_SLICE_TIME": "60", "EDGE_AGENT_QUERY_STREAK": "1",
          "EDGE_AGENT_QUERY_LANE": "0"}),
    ):  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            proc, socket_path = start_daemon(args, Path(tmp), models_dir, env)
            try:
                for round_index in range(args.rounds):
                    rows.append(
                        [label, str(round_index + 1),
                         *bulk_round(socket_path, chunks, f"docs{round_index}")]
                    )  # fmt: skip
                    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
            finally:
                stop_daemon(proc)
    return rows


def bulk_round(socket_path: Path, chunks: list[str], collection: str) -> list[str]:
    with Client(socket_path, timeout=600) as searcher:
        searcher.add(collection, [(f"seed-{i}", chunk) for i, chunk in enumerate(chunks[:8])])

        def search_for(seconds: float | None, stop: threading.Event | None) -> list[float]:
            latencies = []
            end = time.monotonic() + (seconds or 1e9)
            index = 0
            while time.monotonic() < end and not (stop is not None and stop.is_set()):
                t0 = time.perf_counter()
                searcher.search(collection, QUERIES[index % len(QUERIES)], k=5)
                latencies.append((time.perf_counter() - t0) * 1000)
                index += 1
                time.sleep(0.05)
            return latencies

        idle = search_for(5.0, None)
        done = threading.Event()
        bulk: dict[str, float] = {}

        def indexer() -> None:
            with Client(socket_path, timeout=600) as writer:
                started = time.perf_counter()
                for start in range(0, len(chunks), 64):
                    part = chunks[start : start + 64]
                    writer.add(
                        collection,
                        [(f"{collection}-{start + i}", text) for i, text in enumerate(part)],
                    )
                bulk["docs_per_s"] = len(chunks) / (time.perf_counter() - started)
            done.set()

        thread = threading.Thread(target=indexer)
        thread.start()
        during = search_for(None, done)
        thread.join()
        # The same documents again with nobody searching: what serving the searches cost.
        with Client(socket_path, timeout=600) as writer:
            started = time.perf_counter()
            for start in range(0, len(chunks), 64):
                part = chunks[start : start + 64]
                writer.add(
                    f"{collection}-alone",
                    [(f"{collection}-{start + i}", text) for i, text in enumerate(part)],
                )
            alone = len(chunks) / (time.perf_counter() - started)
    return [
        f"{percentile(idle, 0.5):.1f}", f"{percentile(idle, 0.9):.1f}",
        f"{percentile(during, 0.5):.1f}", f"{percentile(during, 0.9):.1f}",
        f"{max(during):.0f}", f"{percentile(during, 0.9) / percentile(idle, 0.9):.2f}",
        f"{bulk['docs_per_s']:.1f}", str(len(during)), f"{alone:.1f}",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--quant", default="Q8_0")
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes")
    parser.add_argument("--single", type=int, default=200, help="single-text requests")
    parser.add_argument("--bulk-docs", type=int, default=536)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=("contention", "bulk"), default=None)
    args = parser.parse_args()
    store = open_store(args.models_dir)
    texts = [f"query {i} about {QUERIES[i % len(QUERIES)]}" for i in range(args.single)]
    print(machine_summary())
    if args.only in (None, "contention"):
        rows = contention(args, store.root, texts)
        print(f"\n### CPU contention: single-text embed, {args.busy} busy loops, {args.quant}\n")
        print(markdown_table(
            ["engine threads", "round", "idle p50 ms", "idle p99 ms", "idle texts/s (1 by 1)",
             "idle texts/s (64/batch)", "busy p50 ms", "busy p90 ms", "busy p99 ms",
             "busy p50 / idle p50"],
            rows,
        ))  # fmt: skip
    if args.only in (None, "bulk"):
        chunks = stdlib_chunks(args.bulk_docs)
        mean = statistics.mean(len(c) for c in chunks)
        rows = search_during_bulk(args, store.root, chunks)
        print(f"\n### Search by text every 50 ms during a bulk add of {len(chunks)} chunks"
              f" (~{mean:.0f} chars, 64 per request), {args.quant}\n")  # fmt: skip
        print(markdown_table(
            ["scheduler", "round", "idle p50 ms", "idle p90 ms", "during p50 ms",
             "during p90 ms", "during max ms", "p90 during / idle", "bulk docs/s",
             "searches during bulk", "bulk docs/s, no searches"],
            rows,
        ))  # fmt: skip


if __name__ == "__main__":
    main()
