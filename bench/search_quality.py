"""Search quality by mode through the real daemon: dense, keyword, hybrid (RRF and weighted).

Open-corpus retrieval on the TREC QA sets in ../shared/data/retrieval/ (see its README): the
corpus is every distinct answer sentence of a file, the queries are the questions with at
least one correct sentence; a hit is relevant when it is one of that question's correct
sentences. Every sentence is added with ``add`` (the daemon embeds it and indexes its words)
and every question searched with ``search`` in each mode. Reports MRR@10 and recall@10.

    python bench/search_quality.py [--quant Q8_0] [--sets trecqa-dev,trecqa-train]
                                   [--weights 0.3,0.5,0.7]

Targets (issue #14): hybrid >= the better of dense and keyword on every set, and >= 1.05x
dense MRR@10 on at least one.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import REPO, add_common_args, machine_summary, markdown_table, open_store, start_daemon

from edge_agent.client import Client

RETRIEVAL_DIR = REPO.parent / "shared" / "data" / "retrieval"


def load_set(path: Path) -> tuple[list[str], dict[str, set[int]]]:
    """(corpus sentences, question -> indices of its correct sentences)."""
    corpus: dict[str, int] = {}
    relevant: dict[str, set[int]] = defaultdict(set)
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            index = corpus.setdefault(row["atext"], len(corpus))
            if row["label"].strip() == "1":
                relevant[row["qtext"]].add(index)
    return list(corpus), dict(relevant)


def evaluate(
    client: Client, name: str, relevant: dict[str, set[int]], search: dict[str, object]
) -> tuple[float, float, float]:
    """(MRR@10, recall@10, ms per query) for one search configuration."""
    mrr = recall = 0.0
    started = time.perf_counter()
    for question, answers in relevant.items():
        hits = client.search(name, question, k=10, include_text=False, **search)  # type: ignore[arg-type]
        ranks = [rank for rank, hit in enumerate(hits, 1) if int(hit.id) in answers]
        mrr += 1.0 / ranks[0] if ranks else 0.0
        recall += len(ranks) / len(answers)
    elapsed = (time.perf_counter() - started) * 1000 / len(relevant)
    return mrr / len(relevant), recall / len(relevant), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--quant", default="Q8_0")
    parser.add_argument("--sets", default="trecqa-dev,trecqa-train")
    parser.add_argument("--weights", default="0.3,0.5,0.7", help="dense weights for weighted")
    parser.add_argument("--retrieval-dir", type=Path, default=RETRIEVAL_DIR)
    args = parser.parse_args()
    if not args.retrieval_dir.is_dir():
        raise SystemExit(f"no retrieval data at {args.retrieval_dir} (see its README)")
    store = open_store(args.models_dir)
    configs: list[tuple[str, dict[str, object]]] = [
        ("dense", {"mode": "dense"}),
        ("keyword (BM25)", {"mode": "keyword"}),
        ("hybrid rrf", {"mode": "hybrid", "fusion": "rrf"}),
    ]
    for weight in (float(w) for w in args.weights.split(",") if w):
        search = {"mode": "hybrid", "fusion": "weighted", "weight": weight}
        configs.append((f"hybrid weighted {weight:g}", search))
    print(machine_summary())
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, socket_path = start_daemon(args, Path(tmp), store.root)
        try:
            with Client(socket_path, timeout=600) as client:
                for set_name in args.sets.split(","):
                    corpus, relevant = load_set(args.retrieval_dir / f"{set_name}.csv")
                    started = time.perf_counter()
                    for start in range(0, len(corpus), 64):
                        end = min(len(corpus), start + 64)
                        client.add(set_name, [(str(i), corpus[i]) for i in range(start, end)])
                    load_s = time.perf_counter() - started
                    print(
                        f"{set_name}: {len(corpus)} sentences added in {load_s:.1f}s,"
                        f" {len(relevant)} questions",
                        file=sys.stderr,
                    )
                    dense_mrr = 0.0
                    for label, search in configs:
                        mrr, recall, ms = evaluate(client, set_name, relevant, search)
                        if label == "dense":
                            dense_mrr = mrr
                        rows.append([
                            set_name, label, f"{mrr:.3f}", f"{recall:.3f}",
                            f"{mrr / dense_mrr:.2f}" if dense_mrr else "-", f"{ms:.1f}",
                        ])  # fmt: skip
                        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"\n### Open-corpus retrieval through the daemon ({args.quant}, k = 10)\n")
    print(markdown_table(
        ["set", "search", "MRR@10", "recall@10", "MRR vs dense", "ms/query"], rows
    ))  # fmt: skip


if __name__ == "__main__":
    main()
