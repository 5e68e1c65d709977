#!/usr/bin/env python3
"""Qwen3-Embedding at real size: file size, serving memory and speed per quant, against
``transformers`` fp32 on the same texts and threads, in one run.

The model is the random-weight Qwen3-Embedding-0.6B-shaped directory of bench/qwen3_fixture.py
(exact shapes, vocabulary size and tokenizer type; speed and memory do not depend on the weight
values), converted by ``edge-agent models convert`` into a bench store (both cached under
~/.cache/edge-agent/bench). Per quant a real daemon (``edge-agent serve``: the daemon process
plus its engine child) serves the model on a Unix socket:

  * peak RSS: VmHWM of the daemon and its engine child, summed, after every measurement;
  * PSS (end): their proportional set size at the end (shared library pages counted once);
  * batch: texts/s embedding the text set in calls of ``--call-size`` texts;
  * single: p50 latency of one short query per call (instruction template applied);
  * cosine: min over the texts of our vector vs transformers' (same weights) - the real-shape
    fidelity check (the tiny-shape one runs in ``make test``).

``--engine-path DIR`` adds a row served by another llama_cpp package (put first on the daemon's
PYTHONPATH), e.g. a copy of the unpatched engine, for before/after memory numbers in one run.
``--unchecked`` serves a quant the start-up self-test refused once more with the self-test
skipped (the selection's decision for that quant, as ``edge-agent probe --explain`` shows it,
served as is: same threads, batch and engine settings), so the row has numbers; its cosine
column then says how far the refused file really is from the reference.
``--max-context`` is the daemon's embedder.max_context (its batch for causal models is the
larger of batch_tokens and that); 512 = the default batch_tokens.

    flock -x /tmp/edge-quiet.lock .venv/bin/python bench/qwen3_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qwen3_fixture
from _common import available_cpus, machine_summary, markdown_table

MODEL = "qwen3-0.6b-shape"
TASK = "Given a web search query, retrieve relevant passages that answer the query"
_TOPICS = [
    "the history of the printing press in Europe",
    "how vector databases index embeddings for search",
    "a recipe for bread with sourdough starter",
    "the rules of chess castling and en passant",
    "small computers running machine learning at the edge",
    "今天的天气很好，适合在公园里散步和读书",
    "why the sky is blue and sunsets are red",
    "how to configure a systemd service with sandboxing",
]


def texts(count: int) -> list[str]:
    """Documents of ~20-60 tokens, deterministic, no two alike."""
    out = []
    for i in range(count):
        topic = _TOPICS[i % len(_TOPICS)]
        out.append(f"Note {i}: {topic}. " + " ".join([topic] * (1 + i % 3)))
    return out


def tree_pids(pid: int) -> list[int]:
    out = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for text in child.read_text().split():
            out.extend(tree_pids(int(text)))
    return out


def status_mb(pids: list[int], field: str) -> float:
    """A /proc/PID/status memory field summed over ``pids``, in MB (10^6 bytes, as file
    sizes are given)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total * 1024 / 1e6


def pss_mb(pids: list[int]) -> float:
    """Proportional set size summed over ``pids`` (shared library pages counted once across
    the daemon and its engine child, unlike the RSS sum), in MB; 0 where smaps_rollup is
    missing."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, PermissionError):
            continue
    return total * 1024 / 1e6


def serve_unchecked(argv: list[str]) -> None:
    """``edge-agent serve`` with ``argv``, the start-up self-test skipped (--unchecked rows):
    what start-up would choose without running anything (the pinned quant with the profile's
    threads, batch and engine settings), opened with select_model=False."""
    from dataclasses import replace

    from edge_agent._cli.common import effective_config, model_store, prepare, state_dir_of
    from edge_agent.cli import build_parser
    from edge_agent.daemon.app import serve
    from edge_agent.selection.choose import Override
    from edge_agent.selection.selftest import embedder_config, plan

    args = build_parser().parse_args(argv)
    prepare(args)
    options = effective_config(args, with_profile=True).serve_options()
    override = options.override or Override()
    if options.quant and override.quant is None:  # as the daemon's _open_embedder does
        override = replace(override, quant=options.quant)
    decision = plan(
        model_store(args), options.model, state_dir=state_dir_of(args), override=override
    ).decision
    print(f"  self-test skipped: serving {decision.to_json()}", file=sys.stderr, flush=True)
    serve(
        replace(
            options,
            select_model=False,
            quant=decision.quant,
            embedder=embedder_config(decision, options.embedder),
        )
    )


def serve_run(
    args: argparse.Namespace,
    store: Path,
    quant: str,
    engine_path: str | None,
    model: str = "",
    unchecked: bool = False,
) -> dict[str, Any]:
    from edge_agent.client import Client

    docs = texts(args.texts)
    with tempfile.TemporaryDirectory(prefix="qwen3-bench-") as tmp:
        work = Path(tmp)
        socket_path = work / "agent.sock"
        env = {
            **os.environ,
            "EDGE_AGENT_HOME": str(work / "home"),
            "EDGE_AGENT_MAX_CONTEXT": str(args.max_context),
        }
        if engine_path:
            env["PYTHONPATH"] = os.pathsep.join([engine_path, env.get("PYTHONPATH", "")])
        launcher = [__file__, "--serve-unchecked"] if unchecked else ["-m", "edge_agent.cli"]
        command = [
            sys.executable, *launcher, "--models-dir", str(store),
            "--log-level", "warning", "serve", "--socket", str(socket_path),
            "--index-dir", str(work / "index"), "--model", model or MODEL, "--quant", quant,
            "--threads", str(args.threads), "--no-tune",
        ]  # fmt: skip
        errors = (work / "stderr").open("w+")
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("edge-agent listening on unix:"):
                proc.wait(timeout=60)
                errors.seek(0)
                reason = (errors.read().strip().splitlines() or ["no output"])[-1]
                print(f"  refused to start: {reason}", file=sys.stderr, flush=True)
                return {"refused": reason}
            client = Client(socket_path, timeout=600)
            client.embed(docs[:4])  # warm-up: weights paged in, graphs reserved
            started = time.perf_counter()
            vectors = []
            for i in range(0, len(docs), args.call_size):
                vectors.append(client.embed(docs[i : i + args.call_size]).vectors)
            batch_seconds = time.perf_counter() - started
            singles = []
            for i in range(args.singles):
                t0 = time.perf_counter()
                client.embed([f"query {i}: {_TOPICS[i % len(_TOPICS)]}"], kind="query")
                singles.append(time.perf_counter() - t0)
            client.close()
            pids = tree_pids(proc.pid)
            rss = status_mb(pids, "VmHWM")
            pss = pss_mb(pids)
            for pid in pids:  # where the memory is, per process (stderr, for the record)
                fields = {f: f"{status_mb([pid], f):.0f}" for f in
                          ("VmHWM", "VmRSS", "RssAnon", "RssFile")}  # fmt: skip
                print(f"  pid {pid}: {fields}", file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            errors.close()
    return {
        "texts_per_s": len(docs) / batch_seconds,
        "p50_ms": statistics.median(singles) * 1000,
        "peak_rss_mb": rss,
        "pss_mb": pss,
        "vectors": np.concatenate(vectors),
    }


def transformers_child(model_dir: str, threads: int, count: int, call_size: int, singles: int,
                       out: str) -> None:  # fmt: skip
    """Run in a subprocess (so its peak RSS is its own): fp32 Qwen3Model, left padding,
    last-token pooling, L2 normalisation, as the Qwen3-Embedding model card does."""
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3Model

    torch.set_num_threads(threads)
    model = Qwen3Model.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    pad = tokenizer.token_to_id(qwen3_fixture.EOS)

    def embed(batch: list[str]) -> np.ndarray:
        encoded = [e.ids for e in tokenizer.encode_batch(batch)]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with torch.inference_mode():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
        vectors = torch.nn.functional.normalize(hidden, dim=-1)
        return vectors.numpy()

    docs = texts(count)
    embed(docs[:4])
    started = time.perf_counter()
    vectors = [embed(docs[i : i + call_size]) for i in range(0, len(docs), call_size)]
    batch_seconds = time.perf_counter() - started
    times = []
    for i in range(singles):
        t0 = time.perf_counter()
        embed([f"Instruct: {TASK}\nQuery:query {i}: {_TOPICS[i % len(_TOPICS)]}"])
        times.append(time.perf_counter() - t0)
    np.save(out, np.concatenate(vectors))
    print(
        json.dumps(
            {
                "texts_per_s": len(docs) / batch_seconds,
                "p50_ms": statistics.median(times) * 1000,
                "peak_rss_mb": status_mb([os.getpid()], "VmHWM"),
            }
        )
    )


def transformers_run(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "vectors.npy")
        result = subprocess.run(
            [sys.executable, __file__, "--transformers-child", str(model_dir), "--threads",
             str(args.threads), "--texts", str(args.texts), "--call-size", str(args.call_size),
             "--singles", str(args.singles), "--child-out", out],
            capture_output=True, text=True, check=True, timeout=1800,
        )  # fmt: skip
        data = json.loads(result.stdout.strip().splitlines()[-1])
        data["vectors"] = np.load(out)
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["0.6b", "4b"], default="0.6b")
    parser.add_argument("--quants", default="F16,Q8_0,Q4_K_M")
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--texts", type=int, default=48)
    parser.add_argument("--call-size", type=int, default=16)
    parser.add_argument("--singles", type=int, default=15)
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument("--engine-path", help="another llama_cpp package dir for a second row")
    parser.add_argument("--engine-label", default="unpatched engine")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument(
        "--unchecked",
        action="store_true",
        help="serve a quant the self-test refused again with the self-test skipped",
    )
    parser.add_argument(
        "--default-model-too",
        action="store_true",
        help="also serve the default model (all-MiniLM-L6-v2 Q8_0), with --engine-path too",
    )
    parser.add_argument("--transformers-child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--serve-unchecked"]:
        serve_unchecked(sys.argv[2:])
        return 0
    args = parser.parse_args()
    if args.transformers_child:
        transformers_child(
            args.transformers_child, args.threads, args.texts, args.call_size, args.singles,
            args.child_out,
        )  # fmt: skip
        return 0

    from edge_agent.models import ModelStore
    from edge_agent.models.convert_hf import convert_model

    global MODEL
    MODEL = f"qwen3-{args.shape}-shape"
    quants = tuple(q.strip() for q in args.quants.split(",") if q.strip())
    model_dir = qwen3_fixture.cached_model_dir(args.shape)
    store_root = qwen3_fixture.cache_root() / "store"
    store = ModelStore(store_root)
    manifest = convert_model(store, model_dir, name=MODEL, quants=quants)

    rows: list[dict[str, Any]] = []
    reference = None if args.no_transformers else transformers_run(args, model_dir)
    runs: list[tuple[str, str, str | None]] = [(q, "", None) for q in quants]
    if args.engine_path:
        compared = "Q8_0" if "Q8_0" in quants else quants[0]
        runs.append((compared, args.engine_label, args.engine_path))
    for quant, label, engine_path in runs:
        print(f"serving {quant} {label}".rstrip(), file=sys.stderr, flush=True)
        result = serve_run(args, store_root, quant, engine_path)
        size = manifest.files[quant].size / 1e6
        if "refused" in result:
            rows.append({"name": f"edge-agent {quant}", "size": size, "refused": result["refused"]})
            if not args.unchecked:
                continue
            print(f"serving {quant} (self-test skipped)", file=sys.stderr, flush=True)
            result = serve_run(args, store_root, quant, engine_path, unchecked=True)
            label = "self-test skipped"
            if "refused" in result:
                continue
        cosine = (
            float(np.min(np.sum(result["vectors"] * reference["vectors"], axis=1)))
            if reference is not None
            else float("nan")
        )
        rows.append({"name": f"edge-agent {quant}" + (f" ({label})" if label else ""),
                     "size": size, **result, "cosine": cosine})  # fmt: skip
    if args.default_model_too:
        from edge_agent.models import DEFAULT_MODEL, prepare_default

        minilm = prepare_default(store)
        for label, engine_path in (("", None), (args.engine_label, args.engine_path)):
            if label and not engine_path:
                continue
            print(f"serving {DEFAULT_MODEL} Q8_0 {label}".rstrip(), file=sys.stderr, flush=True)
            result = serve_run(args, store_root, "Q8_0", engine_path, model=DEFAULT_MODEL)
            name = f"{DEFAULT_MODEL} Q8_0" + (f" ({label})" if label else "")
            rows.append({"name": name, "size": minilm.files["Q8_0"].size / 1e6, **result,
                         "cosine": float("nan")})  # fmt: skip
    if reference is not None:
        size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e6
        rows.append({"name": "transformers fp32 (bf16 file)", "size": size, **reference,
                     "cosine": 1.0})  # fmt: skip

    print(machine_summary())
    print(f"threads: {args.threads}")
    print(
        f"\nQwen3-Embedding-{args.shape} shape (random weights), {args.texts} texts of ~20-60"
        f" tokens in calls of {args.call_size}, {args.singles} single queries,"
        f" max_context {args.max_context}\n"
    )
    base = next((r for r in rows if r["name"].startswith("transformers")), None)
    headers = ["", "file MB", "peak RSS MB", "RSS - file MB", "PSS MB (end)", "texts/s (batch)",
               "vs transformers", "single p50 ms", "min cosine vs transformers"]  # fmt: skip
    table = [
        [r["name"], f"{r['size']:.0f}", "refused to start (below)", "", "", "", "", "", ""]
        if "refused" in r
        else [r["name"], f"{r['size']:.0f}", f"{r['peak_rss_mb']:.0f}",
         f"{r['peak_rss_mb'] - r['size']:.0f}",
         f"{r['pss_mb']:.0f}" if r.get("pss_mb") else "-", f"{r['texts_per_s']:.2f}",
         f"{r['texts_per_s'] / base['texts_per_s']:.2f}x" if base else "-",
         f"{r['p50_ms']:.0f}", f"{r['cosine']:.4f}"]
        for r in rows
    ]  # fmt: skip
    print(markdown_table(headers, table))
    for r in rows:
        if "refused" in r:
            print(f"\n{r['name']}: {r['refused']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
