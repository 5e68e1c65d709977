"""Embedding quality of every quant of all-MiniLM-L6-v2 on STS data, vs sentence-transformers.

For each GGUF quant in the store, and for sentence-transformers (fp32, the reference) when it
is installed: Spearman correlation between the cosine similarity of each sentence pair and its
gold score, per STS file; the mean; the mean as a share of F16's; and the min / mean cosine
between the quant's vectors and sentence-transformers' on the same sentences.

    python bench/embed_quality.py [--pairs-per-file 150] [--quants F16,Q8_0] [--data-dir DIR]

Prints a markdown table. The STS files (gold<TAB>s1<TAB>s2) are read from --data-dir
(default ../shared/data/sts beside the repository) and never copied.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from _common import (
    StsFile,
    add_common_args,
    load_sentence_transformer,
    load_sts,
    machine_summary,
    markdown_table,
    open_store,
    spearman,
    st_model_dir,
    unique_sentences,
)

from edge_agent.embedding.embedder import Embedder, EmbedderConfig
from edge_agent.models import DEFAULT_MODEL
from edge_agent.models.default import DEFAULT_QUANTS

CLAIM_QUANT, CLAIM_SHARE = "Q5_K_M", 98.5  # the seed claim: "Q5_K_M keeps 98.5% of f16 quality"


def pair_cosines(vectors: np.ndarray, index: dict[str, int], item: StsFile) -> np.ndarray:
    a = vectors[[index[s] for s in item.s1]]
    b = vectors[[index[s] for s in item.s2]]
    return np.einsum("ij,ij->i", a, b)  # rows are L2-normalised


def embed_gguf(store: object, quant: str, sentences: list[str], threads: int) -> np.ndarray:
    config = EmbedderConfig(threads=threads, max_texts=max(4096, len(sentences)))
    with Embedder.open(store, DEFAULT_MODEL, quant, config) as embedder:  # type: ignore[arg-type]
        return embedder.embed(sentences).vectors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--quants",
        default=",".join(DEFAULT_QUANTS),
        help="comma-separated quants (default: %(default)s)",
    )
    parser.add_argument(
        "--pairs-per-file",
        type=int,
        default=150,
        help="seeded random sample of pairs per STS file; 0 = every pair (default: %(default)s,"
        " which keeps a full run near 5 minutes on 2 cores)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--no-st", action="store_true", help="skip the sentence-transformers reference"
    )
    args = parser.parse_args(argv)

    files = load_sts(args.data_dir, args.pairs_per_file, args.seed)
    sentences = unique_sentences(files)
    index = {s: i for i, s in enumerate(sentences)}
    store = open_store(args.models_dir)
    manifest = store.get(DEFAULT_MODEL)
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    missing = [q for q in quants if q not in manifest.files]
    if missing:
        sys.exit(
            f"error: no {', '.join(missing)} file in the store (has: {', '.join(manifest.files)})"
        )

    pairs = sum(len(f.gold) for f in files)
    print(
        f"{len(files)} STS files, {pairs} pairs, {len(sentences)} unique sentences,"
        f" {args.threads} threads",
        file=sys.stderr,
    )

    # name -> (size MB, vectors)
    results: dict[str, tuple[float, np.ndarray]] = {}
    reference: np.ndarray | None = None
    if not args.no_st:
        started = time.perf_counter()
        model = load_sentence_transformer(args.threads)
        if model is None:
            print("sentence-transformers not installed: no reference column", file=sys.stderr)
        else:
            reference = model.encode(
                sentences, batch_size=32, normalize_embeddings=True, convert_to_numpy=True
            ).astype(np.float32)
            size = (st_model_dir() / "model.safetensors").stat().st_size / 1e6
            results["sentence-transformers (fp32)"] = (size, reference)
            del model
            print(f"sentence-transformers: {time.perf_counter() - started:.1f}s", file=sys.stderr)
    for quant in quants:
        started = time.perf_counter()
        size = manifest.files[quant].size / 1e6
        results[quant] = (size, embed_gguf(store, quant, sentences, args.threads))
        print(f"{quant}: {time.perf_counter() - started:.1f}s", file=sys.stderr)

    gold_rho = {
        name: [spearman(pair_cosines(vectors, index, f), f.gold) for f in files]
        for name, (_, vectors) in results.items()
    }
    means = {name: float(np.mean(rhos)) for name, rhos in gold_rho.items()}
    f16_mean = means.get("F16")

    headers = ["model", "size MB", *(f.name for f in files), "mean", "% of F16"]
    if reference is not None:
        headers += ["min cos vs ST", "mean cos vs ST"]
    rows = []
    for name, (size, vectors) in results.items():
        row = [name, f"{size:.1f}", *(f"{r:.4f}" for r in gold_rho[name]), f"{means[name]:.4f}"]
        row.append(f"{100 * means[name] / f16_mean:.2f}" if f16_mean else "n/a")
        if reference is not None:
            cos = np.einsum("ij,ij->i", vectors, reference)
            row += [f"{cos.min():.6f}", f"{cos.mean():.6f}"]
        rows.append(row)

    print(f"Machine: {machine_summary()}")
    sampled = f", {args.pairs_per_file} sampled per file, seed {args.seed}"
    print(
        f"Data: {args.data_dir} ({len(files)} files, {pairs} pairs"
        f"{sampled if args.pairs_per_file else ''}, {len(sentences)} unique sentences);"
        " Spearman of cosine vs gold"
    )
    print()
    print(markdown_table(headers, rows))
    print()
    if f16_mean and CLAIM_QUANT in means:
        share = 100 * means[CLAIM_QUANT] / f16_mean
        verdict = "holds" if share >= CLAIM_SHARE else "does NOT hold"
        print(
            f'Claim "{CLAIM_QUANT} keeps {CLAIM_SHARE}% of f16 quality": {CLAIM_QUANT} mean'
            f" {means[CLAIM_QUANT]:.4f} / F16 mean {f16_mean:.4f} = {share:.2f}% -> {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
