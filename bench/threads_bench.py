"""Throughput vs llama.cpp thread count on this machine, to check the profiles' threads rule.

Opens one embedder per (quant, thread count) on the default model, then runs ``--rounds``
rounds; each round times one pass of every configuration over the tuning text set
(edge_agent.selection.tuning.TUNING_TEXTS), in reverse order on odd rounds. The machine is
shared and noisy: interleaving spreads the disturbance over all configurations, and the best
pass of each is the least disturbed one (the median is printed beside it).

    python bench/threads_bench.py [--quants F32,Q8_0] [--threads 1,2,3,4] [--rounds 5]

Prints the threads rule's choice for this host, then a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _common import machine_summary, markdown_table, open_store

from edge_agent.embedding.embedder import Embedder, EmbedderConfig
from edge_agent.hardware import probe_host
from edge_agent.models import DEFAULT_MODEL
from edge_agent.selection.profiles import load_profiles, match_profile, threads_for
from edge_agent.selection.tuning import TUNING_TEXTS


def parse_list(text: str, kind: type) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=None, help="model store")
    parser.add_argument("--quants", type=lambda t: parse_list(t, str), default=["F32", "Q8_0"])
    parser.add_argument("--threads", type=lambda t: parse_list(t, int), default=[1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args(argv)
    if not 1 <= options.rounds <= 100 or not all(1 <= t <= 256 for t in options.threads):
        parser.error("--rounds must be in [1, 100] and every thread count in [1, 256]")

    host = probe_host()
    matched = match_profile(host, load_profiles())
    rule, why = threads_for(host, matched.profile.threads)
    store = open_store(options.models_dir)
    texts = list(TUNING_TEXTS)
    configs = [(q, t) for q in options.quants for t in options.threads]
    embedders: dict[tuple[str, int], Embedder] = {}
    passes: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    try:
        for quant, threads in configs:
            config = EmbedderConfig(threads=threads)
            embedder = Embedder.open(store, DEFAULT_MODEL, quant, config)
            embedders[(quant, threads)] = embedder
            embedder.embed(texts[:4])  # warm-up: first-call allocations
        for round_ in range(options.rounds):
            order = configs if round_ % 2 == 0 else list(reversed(configs))
            for key in order:
                started = time.perf_counter()
                embedders[key].embed(texts)
                passes[key].append(len(texts) / (time.perf_counter() - started))
    finally:
        for embedder in embedders.values():
            embedder.close()

    print(machine_summary())
    print(
        f"profile {matched.profile.name}: threads rule -> {rule} ({'; '.join(why)});"
        f" {len(texts)} texts per pass, best of {options.rounds} passes"
    )
    print()
    rows = []
    for quant in options.quants:
        reference = max(passes[(quant, rule)]) if (quant, rule) in passes else None
        for threads in options.threads:
            values = passes[(quant, threads)]
            best = max(values)
            ratio = f"{best / reference:.2f}" if reference else "-"
            mark = " (rule)" if threads == rule else ""
            rows.append(
                [
                    quant,
                    f"{threads}{mark}",
                    f"{best:.1f}",
                    f"{statistics.median(values):.1f}",
                    ratio,
                ]
            )
    print(markdown_table(["quant", "threads", "best texts/s", "median texts/s", "vs rule"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
