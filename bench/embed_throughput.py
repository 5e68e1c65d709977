"""Throughput (sentences/s) and peak RSS: the project's Embedder per quant vs sentence-transformers.

Every contender runs in its own subprocess, so the peak RSS (VmHWM) is that contender's alone:
Python, its imports, the model and its buffers. Each subprocess loads its model, embeds a
warm-up slice, then times ``--passes`` passes over the same sentences (a seeded sample of the
STS sentences). With ``--rounds`` > 1 every contender runs again, in reverse order on odd rounds,
and the best pass counts: the machine is shared, so the best pass is the least disturbed one.

    python bench/embed_throughput.py [--quants F32,Q8_0] [--threads 2] [--sentences 600]
    python bench/embed_throughput.py --quants F32 --batch-tokens 256,512,1024 --no-st  # sweep

Lists given to --batch-tokens, --max-sequences and --flash-attention are swept (every
combination, for every quant). Prints a markdown table with ratios to sentence-transformers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    add_common_args,
    load_sts,
    machine_summary,
    markdown_table,
    open_store,
    unique_sentences,
)

ST = "sentence-transformers"
FA_VALUES: dict[str, bool | None] = {"on": True, "off": False, "auto": None}
FA_NAMES = {value: name for name, value in FA_VALUES.items()}


# -- measurements inside a contender's own process ----------------------------------------------


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def rss_mb() -> float:
    value = _status_mb("VmRSS")
    return value if value is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


def _time_passes(
    run: Any, sentences: list[str], warmup: int, passes: int
) -> tuple[list[float], Any]:
    """Warm up, then time ``passes`` runs; the times and the last run's result."""
    run(sentences[:warmup])
    times, result = [], None
    for _ in range(passes):
        started = time.perf_counter()
        result = run(sentences)
        times.append(time.perf_counter() - started)
    return times, result


def _worker_embedder(spec: dict[str, Any], sentences: list[str]) -> dict[str, Any]:
    from edge_agent.embedder import Embedder, EmbedderConfig
    from edge_agent.models import DEFAULT_MODEL, ModelStore

    imports = rss_mb()
    store = ModelStore(Path(spec["models_dir"]))
    resolved = store.resolve(DEFAULT_MODEL, spec["quant"], verify=False)  # verified by parent
    config = EmbedderConfig(
        threads=spec["threads"],
        batch_tokens=spec["batch_tokens"],
        max_sequences=spec["max_sequences"],
        flash_attention=FA_VALUES[spec["flash_attention"]],
        max_texts=max(4096, len(sentences)),
    )
    started = time.perf_counter()
    with Embedder(resolved, config) as embedder:
        load_s = time.perf_counter() - started
        times, last = _time_passes(embedder.embed, sentences, spec["warmup"], spec["passes"])
        tokens = sum(last.token_counts)
        effective = embedder._engine.settings.batch_tokens
    return {
        "times": times,
        "load_s": load_s,
        "import_rss": imports,
        "tokens": tokens,
        "batch_tokens": effective,
    }


def _worker_st(spec: dict[str, Any], sentences: list[str]) -> dict[str, Any]:
    from _common import load_sentence_transformer, sentence_transformers_env

    sentence_transformers_env()
    try:  # imported before the model so the import RSS below counts them
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"sentence-transformers is not installed: {exc}") from exc

    imports = rss_mb()
    started = time.perf_counter()
    model = load_sentence_transformer(spec["threads"])
    if model is None:
        raise SystemExit("sentence-transformers is not installed")
    load_s = time.perf_counter() - started

    def run(batch: list[str]) -> Any:
        return model.encode(
            batch,
            batch_size=spec["st_batch_size"],
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    times, _ = _time_passes(run, sentences, spec["warmup"], spec["passes"])
    return {"times": times, "load_s": load_s, "import_rss": imports}


def worker(spec_path: str) -> int:
    start_rss = rss_mb()
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    sentences = json.loads(Path(spec["sentences_path"]).read_text(encoding="utf-8"))
    if spec["kind"] == ST:
        result = _worker_st(spec, sentences)
    else:
        result = _worker_embedder(spec, sentences)
    result.update(start_rss=start_rss, peak_rss=peak_rss_mb())
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# -- the driver -----------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _fa_list(text: str) -> list[str]:
    values = [x.strip().lower() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in FA_VALUES]
    if bad:
        raise argparse.ArgumentTypeError(f"flash attention must be on, off or auto, not {bad}")
    return values


def _run_contender(spec: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    raise SystemExit(f"error: contender {spec.get('label')} failed (exit {proc.returncode})")


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    from edge_agent.embedder import EmbedderConfig
    from edge_agent.models import DEFAULT_MODEL
    from edge_agent.models.default import DEFAULT_QUANTS

    defaults = EmbedderConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--quants", default=",".join(DEFAULT_QUANTS), help="(default: %(default)s)")
    parser.add_argument(
        "--sentences",
        type=int,
        default=600,
        help="STS sentences per timed pass, a seeded sample (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--batch-tokens",
        type=_int_list,
        default=[defaults.batch_tokens],
        help="comma list to sweep (default: EmbedderConfig's, %(default)s)",
    )
    parser.add_argument(
        "--max-sequences",
        type=_int_list,
        default=[defaults.max_sequences],
        help="comma list to sweep (default: EmbedderConfig's, %(default)s)",
    )
    parser.add_argument(
        "--flash-attention",
        type=_fa_list,
        default=[FA_NAMES[defaults.flash_attention]],
        help="on, off, auto or a comma list to sweep (default: EmbedderConfig's, %(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--passes", type=int, default=1, help="timed passes per round")
    parser.add_argument("--warmup", type=int, default=64, help="warm-up sentences (default: 64)")
    parser.add_argument(
        "--st-batch-size", type=int, default=32, help="sentence-transformers' encode batch_size"
    )
    parser.add_argument("--no-st", action="store_true", help="skip sentence-transformers")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per contender run")
    args = parser.parse_args(argv)

    files = load_sts(args.data_dir)
    pool = unique_sentences(files)
    rng = np.random.default_rng(args.seed)
    count = min(args.sentences, len(pool))
    sentences = [pool[i] for i in rng.permutation(len(pool))[:count]]
    store = open_store(args.models_dir)
    manifest = store.get(DEFAULT_MODEL)
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    missing = [q for q in quants if q not in manifest.files]
    if missing:
        sys.exit(f"error: no {', '.join(missing)} in the store (has: {', '.join(manifest.files)})")

    base = {
        "threads": args.threads,
        "warmup": min(args.warmup, count),
        "passes": args.passes,
    }
    contenders: list[dict[str, Any]] = []
    if not args.no_st:
        contenders.append(
            {**base, "kind": ST, "label": f"{ST} (fp32)", "st_batch_size": args.st_batch_size}
        )
    for quant, tokens, sequences, fa in itertools.product(
        quants, args.batch_tokens, args.max_sequences, args.flash_attention
    ):
        contenders.append(
            {
                **base,
                "kind": "embedder",
                "label": quant,
                "quant": quant,
                "models_dir": str(store.root),
                "batch_tokens": tokens,
                "max_sequences": sequences,
                "flash_attention": fa,
            }
        )

    load_before = os.getloadavg()
    started = time.perf_counter()
    results: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(contenders))}
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        workdir = Path(tmp)
        sentences_path = workdir / "sentences.json"
        sentences_path.write_text(json.dumps(sentences), encoding="utf-8")
        for round_index in range(args.rounds):
            order = list(range(len(contenders)))
            if round_index % 2:
                order.reverse()
            for i in order:
                spec = {**contenders[i], "sentences_path": str(sentences_path)}
                result = _run_contender(spec, workdir, args.timeout)
                results[i].append(result)
                best = count / min(result["times"])
                print(
                    f"round {round_index + 1}: {_describe(contenders[i])}: {best:.1f} sentences/s,"
                    f" peak RSS {result['peak_rss']:.0f} MB",
                    file=sys.stderr,
                )
    elapsed = time.perf_counter() - started

    rows_data = []
    for i, contender in enumerate(contenders):
        times = [t for r in results[i] for t in r["times"]]
        rows_data.append(
            {
                "contender": contender,
                "best": count / min(times),
                "median": count / statistics.median(times),
                "peak": max(r["peak_rss"] for r in results[i]),
                "imports": max(r["import_rss"] for r in results[i]),
                "load_s": min(r["load_s"] for r in results[i]),
                "batch_tokens": results[i][0].get("batch_tokens"),
                "tokens": results[i][0].get("tokens"),
            }
        )
    reference = next((r for r in rows_data if r["contender"]["kind"] == ST), None)
    headers = [
        "contender",
        "batch_tokens",
        "max_seq",
        "flash attn",
        "sentences/s",
        "median",
        "× ST",
        "peak RSS MB",
        "× ST RSS",
        "import RSS MB",
        "load s",
    ]
    rows = []
    for r in rows_data:
        c = r["contender"]
        is_st = c["kind"] == ST
        rows.append(
            [
                c["label"],
                f"{c['st_batch_size']} texts" if is_st else str(r["batch_tokens"]),
                "-" if is_st else str(c["max_sequences"]),
                "-" if is_st else c["flash_attention"],
                f"{r['best']:.1f}",
                f"{r['median']:.1f}",
                f"{r['best'] / reference['best']:.2f}" if reference else "n/a",
                f"{r['peak']:.0f}",
                f"{r['peak'] / reference['peak']:.2f}" if reference else "n/a",
                f"{r['imports']:.0f}",
                f"{r['load_s']:.2f}",
            ]
        )
    tokens = next((r["tokens"] for r in rows_data if r["tokens"]), None)
    token_note = f", {tokens / count:.1f} tokens/sentence on average" if tokens else ""
    print(f"Machine: {machine_summary()} (load average at start {load_before[0]:.2f})")
    print(
        f"Workload: {count} STS sentences (seed {args.seed}{token_note}), {args.threads} threads,"
        f" {args.rounds} round(s) x {args.passes} pass(es) after {base['warmup']} warm-up"
        f" sentences; sentences/s = best pass, median over all passes; {elapsed:.0f}s in all"
    )
    print()
    print(markdown_table(headers, rows))
    return 0


def _describe(contender: dict[str, Any]) -> str:
    if contender["kind"] == ST:
        return contender["label"]
    return (
        f"{contender['label']} bt={contender['batch_tokens']} ms={contender['max_sequences']}"
        f" fa={contender['flash_attention']}"
    )


if __name__ == "__main__":
    sys.exit(main())
