"""Throughput (sentences/s) and peak RSS: the project's Embedder per quant vs sentence-transformers.

Every contender runs in its own subprocess, so the peak RSS (VmHWM) is that contender's alone:
Python, its imports, the model and its buffers. The subprocesses load one after another and
embed a warm-up slice; then ``--rounds`` rounds each time one pass of every contender over the
same sentences (a seeded sample of the STS sentences), in reverse order on odd rounds, while the
others sleep. The machine is shared and noisy: interleaving spreads the disturbance over all
contenders, and the best pass of each is the least disturbed one.

    python bench/embed_throughput.py [--quants F32,Q8_0] [--threads 2] [--sentences 500]
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
from collections.abc import Callable
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


# -- inside a contender's own process -----------------------------------------------------------
# Protocol on stdin/stdout, one line each: the worker loads its model, warms up and says
# "READY {json}"; each "pass" line is answered "PASS <seconds>"; "done" is answered
# "RESULT {json}" (peak RSS and all) before it exits. Anything else it prints is ignored.


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


def rss_mb() -> float:
    value = _status_mb("VmRSS")
    return value if value is not None else peak_rss_mb()


def _load_embedder(spec: dict[str, Any]) -> tuple[Callable[[list[str]], Any], dict[str, Any]]:
    from edge_agent.embedding.embedder import Embedder, EmbedderConfig
    from edge_agent.models import DEFAULT_MODEL, ModelStore

    imports = rss_mb()
    store = ModelStore(Path(spec["models_dir"]))
    resolved = store.resolve(DEFAULT_MODEL, spec["quant"], verify=False)  # verified by parent
    config = EmbedderConfig(
        threads=spec["threads"],
        batch_tokens=spec["batch_tokens"],
        max_sequences=spec["max_sequences"],
        flash_attention=FA_VALUES[spec["flash_attention"]],
        max_texts=1_000_000,
    )
    started = time.perf_counter()
    embedder = Embedder(resolved, config)
    info = {
        "load_s": time.perf_counter() - started,
        "import_rss": imports,
        # after the max_tokens floor
        "batch_tokens": embedder._inference.engine.settings.batch_tokens,
    }
    return embedder.embed, info


def _load_st(spec: dict[str, Any]) -> tuple[Callable[[list[str]], Any], dict[str, Any]]:
    from _common import load_sentence_transformer, sentence_transformers_env

    sentence_transformers_env()
    try:  # imported before the model so that the import RSS counts them
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

    return run, {"load_s": load_s, "import_rss": imports}


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    sentences = json.loads(Path(spec["sentences_path"]).read_text(encoding="utf-8"))
    run, info = (_load_st if spec["kind"] == ST else _load_embedder)(spec)
    run(sentences[: spec["warmup"]])
    print("READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "pass":
            started, cpu_started = time.perf_counter(), time.process_time()
            out = run(sentences)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            print(f"PASS {wall:.6f} {cpu:.6f}", flush=True)
            if hasattr(out, "token_counts"):
                info["tokens"] = sum(out.token_counts)
        elif command == "done":
            break
    info["peak_rss"] = peak_rss_mb()
    print("RESULT " + json.dumps(info), flush=True)
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


class Contender:
    """One contender's worker process, driven pass by pass."""

    def __init__(self, spec: dict[str, Any], workdir: Path, index: int) -> None:
        self.spec = spec
        spec_path = workdir / f"spec-{index}.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        self.stderr_path = workdir / f"stderr-{index}.txt"
        self._stderr = self.stderr_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.info: dict[str, Any] = json.loads(self._expect("READY "))

    def _expect(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        self.proc.wait()
        self._stderr.flush()
        tail = self.stderr_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        sys.stderr.write(tail)
        raise SystemExit(f"error: {describe(self.spec)} failed (exit {self.proc.returncode})")

    def _send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def timed_pass(self) -> float:
        """Wall seconds of one pass (its process CPU seconds go to ``cpu_times``)."""
        self._send("pass")
        wall, cpu = (float(x) for x in self._expect("PASS ").split())
        self.times.append(wall)
        self.cpu_times.append(cpu)
        return wall

    def finish(self) -> None:
        self._send("done")
        self.info.update(json.loads(self._expect("RESULT ")))
        self.proc.wait()
        self._stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def describe(spec: dict[str, Any]) -> str:
    if spec["kind"] == ST:
        return spec["label"]
    return (
        f"{spec['label']} bt={spec['batch_tokens']} ms={spec['max_sequences']}"
        f" fa={spec['flash_attention']}"
    )


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    from edge_agent.embedding.embedder import EmbedderConfig
    from edge_agent.models import DEFAULT_MODEL
    from edge_agent.models.default import DEFAULT_QUANTS

    defaults = EmbedderConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--quants", default=",".join(DEFAULT_QUANTS), help="(default: %(default)s)")
    parser.add_argument(
        "--sentences",
        type=int,
        default=500,
        help="STS sentences per timed pass, a seeded sample (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--join",
        type=int,
        default=1,
        help="join this many STS sentences into each text, for a paragraph-length workload"
        " (default: 1)",
    )
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
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="timed passes per contender, interleaved across contenders (default: %(default)s)",
    )
    parser.add_argument("--warmup", type=int, default=64, help="warm-up texts (default: 64)")
    parser.add_argument(
        "--st-batch-size", type=int, default=32, help="sentence-transformers' encode batch_size"
    )
    parser.add_argument("--no-st", action="store_true", help="skip sentence-transformers")
    args = parser.parse_args(argv)

    files = load_sts(args.data_dir)
    pool = unique_sentences(files)
    rng = np.random.default_rng(args.seed)
    join = max(1, args.join)
    count = min(args.sentences, len(pool) // join)
    picked = [pool[i] for i in rng.permutation(len(pool))[: count * join]]
    sentences = [" ".join(picked[i * join : (i + 1) * join]) for i in range(count)]
    store = open_store(args.models_dir)
    manifest = store.get(DEFAULT_MODEL)
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    missing = [q for q in quants if q not in manifest.files]
    if missing:
        sys.exit(f"error: no {', '.join(missing)} in the store (has: {', '.join(manifest.files)})")

    base = {"threads": args.threads, "warmup": min(args.warmup, count)}
    specs: list[dict[str, Any]] = []
    if not args.no_st:
        specs.append(
            {**base, "kind": ST, "label": f"{ST} (fp32)", "st_batch_size": args.st_batch_size}
        )
    for quant, tokens, sequences, fa in itertools.product(
        quants, args.batch_tokens, args.max_sequences, args.flash_attention
    ):
        specs.append(
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
    contenders: list[Contender] = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        workdir = Path(tmp)
        sentences_path = workdir / "sentences.json"
        sentences_path.write_text(json.dumps(sentences), encoding="utf-8")
        try:
            # Loaded one after another; each then sleeps on its stdin until asked for a pass.
            for index, spec in enumerate(specs):
                contenders.append(
                    Contender({**spec, "sentences_path": str(sentences_path)}, workdir, index)
                )
            for round_index in range(args.rounds):
                order = contenders[::-1] if round_index % 2 else contenders
                for contender in order:
                    seconds = contender.timed_pass()
                    print(
                        f"round {round_index + 1}: {describe(contender.spec)}:"
                        f" {count / seconds:.1f} sentences/s",
                        file=sys.stderr,
                    )
            for contender in contenders:
                contender.finish()
        finally:
            for contender in contenders:
                contender.kill()
    elapsed = time.perf_counter() - started

    reference = next((c for c in contenders if c.spec["kind"] == ST), None)
    ref_speed = count / min(reference.times) if reference else None
    ref_rss = reference.info["peak_rss"] if reference else None
    ref_cpu = count / min(reference.cpu_times) if reference else None
    unit = "sentences" if join == 1 else "texts"
    headers = [
        "contender",
        "batch_tokens",
        "max_seq",
        "flash attn",
        f"{unit}/s",
        "median",
        "× ST",
        f"{unit}/CPU-s",
        "CPU × ST",
        "peak RSS MB",
        "× ST RSS",
        "import RSS MB",
        "load s",
    ]
    rows = []
    for c in contenders:
        is_st = c.spec["kind"] == ST
        best = count / min(c.times)
        per_cpu = count / min(c.cpu_times)
        peak = c.info["peak_rss"]
        rows.append(
            [
                c.spec["label"],
                f"{c.spec['st_batch_size']} texts" if is_st else str(c.info["batch_tokens"]),
                "-" if is_st else str(c.spec["max_sequences"]),
                "-" if is_st else c.spec["flash_attention"],
                f"{best:.1f}",
                f"{count / statistics.median(c.times):.1f}",
                f"{best / ref_speed:.2f}" if ref_speed else "n/a",
                f"{per_cpu:.1f}",
                f"{per_cpu / ref_cpu:.2f}" if ref_cpu else "n/a",
                f"{peak:.0f}",
                f"{peak / ref_rss:.2f}" if ref_rss else "n/a",
                f"{c.info['import_rss']:.0f}",
                f"{c.info['load_s']:.2f}",
            ]
        )
    tokens = next((c.info["tokens"] for c in contenders if c.info.get("tokens")), None)
    token_note = f", {tokens / count:.1f} tokens/text with specials" if tokens else ""
    print(f"Machine: {machine_summary()} (load average at start {load_before[0]:.2f})")
    print(
        f"Workload: {count} {'STS sentences' if join == 1 else f'texts of {join} STS sentences'}"
        f" (seed {args.seed}{token_note}), {args.threads} threads,"
        f" {args.rounds} timed pass(es) per contender, interleaved, after {base['warmup']}"
        f" warm-up texts; {unit}/s = best pass, median = median pass; {unit}/CPU-s ="
        f" {unit} per second of process CPU time (user+sys, all threads), best pass;"
        f" {elapsed:.0f}s in all"
    )
    print()
    print(markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
