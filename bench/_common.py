"""Helpers shared by the benchmarks: STS data, the model store, sentence-transformers, ranks.

The benchmarks are scripts (``python bench/embed_quality.py``), so this module is imported as
``_common`` from the script's own directory.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# The STS data lives in the shared folder beside the repository; it is never copied in.
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "sts"

__all__ = [
    "DEFAULT_DATA_DIR",
    "StsFile",
    "add_common_args",
    "available_cpus",
    "load_sentence_transformer",
    "load_sts",
    "machine_summary",
    "markdown_table",
    "open_store",
    "rankdata",
    "sentence_transformers_env",
    "spearman",
    "st_model_dir",
    "unique_sentences",
]


@dataclass(frozen=True)
class StsFile:
    name: str  # file stem, e.g. "sts2012-MSRpar"
    gold: np.ndarray  # (n,) float64
    s1: list[str]
    s2: list[str]


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _default_models_dir() -> Path:
    from edge_agent.paths import default_paths

    return default_paths().models_dir


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="model store (default: edge-agent's own, from EDGE_AGENT_HOME / platformdirs);"
        " the default model is prepared there if missing",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"folder of STS *.tsv files: gold<TAB>s1<TAB>s2 (default: {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=available_cpus(),
        help="threads for every contender (default: all CPUs this process may use)",
    )


def open_store(models_dir: Path | None) -> Any:
    """The model store, with the default model prepared (idempotent; fast when complete)."""
    from edge_agent.models import ModelStore, prepare_default

    store = ModelStore(models_dir or _default_models_dir())
    prepare_default(store)
    return store


def load_sts(data_dir: Path, pairs_per_file: int = 0, seed: int = 0) -> list[StsFile]:
    """Every ``*.tsv`` in ``data_dir``; ``pairs_per_file`` > 0 takes a seeded random sample
    of that many pairs from each file (the same sample on every run). Exits if missing."""
    files = sorted(data_dir.glob("*.tsv")) if data_dir.is_dir() else []
    if not files:
        sys.exit(
            f"error: no STS data: {data_dir} is missing or holds no *.tsv files"
            " (expected gold<TAB>s1<TAB>s2 lines; pass --data-dir)"
        )
    out = []
    for path in files:
        gold, s1, s2 = [], [], []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                sys.exit(f"error: {path}:{number}: expected gold<TAB>s1<TAB>s2")
            gold.append(float(parts[0]))
            s1.append(parts[1])
            s2.append(parts[2])
        if pairs_per_file and pairs_per_file < len(gold):
            rng = np.random.default_rng(seed)
            keep = np.sort(rng.choice(len(gold), size=pairs_per_file, replace=False))
            gold = [gold[i] for i in keep]
            s1 = [s1[i] for i in keep]
            s2 = [s2[i] for i in keep]
        out.append(StsFile(path.stem, np.asarray(gold, dtype=np.float64), s1, s2))
    return out


def unique_sentences(files: list[StsFile]) -> list[str]:
    """Every sentence once, in first-seen order."""
    seen: dict[str, None] = {}
    for item in files:
        for a, b in zip(item.s1, item.s2, strict=True):
            seen.setdefault(a)
            seen.setdefault(b)
    return list(seen)


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (scipy's default ``method="average"``)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: scipy.stats.spearmanr when scipy is installed, else Pearson of ranks."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        ra, rb = rankdata(a), rankdata(b)
        ra -= ra.mean()
        rb -= rb.mean()
        denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
        return float((ra * rb).sum() / denominator) if denominator else float("nan")
    return float(spearmanr(a, b).statistic)


def st_model_dir() -> Path:
    """The original all-MiniLM-L6-v2 (sentence-transformers layout) from the weights package."""
    from edge_agent.models.default import default_model_source_dir

    return default_model_source_dir()


def sentence_transformers_env() -> None:
    """Offline and quiet: set before transformers is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load_sentence_transformer(threads: int) -> Any | None:
    """sentence-transformers' all-MiniLM-L6-v2 on CPU, fp32, offline; None if not installed."""
    sentence_transformers_env()
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    torch.set_num_threads(threads)
    return SentenceTransformer(str(st_model_dir()), device="cpu")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni")
                return " ".join(f for f in wanted if f in flags)
    except OSError:
        pass
    return ""


def machine_summary() -> str:
    """One line: CPU, cores, load average, date — printed above every table."""
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{_cpu_model()} ({_cpu_flags()}), {os.cpu_count()} logical cores"
        f" ({available_cpus()} usable), load average {load};"
        f" Python {platform.python_version()}; {datetime.date.today().isoformat()}"
    )


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        padded = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in pairs]
        return "| " + " | ".join(padded) + " |"

    rules = [("-" * (w - 1) + ":") if i else (":" + "-" * (w - 1)) for i, w in enumerate(widths)]
    separator = "| " + " | ".join(rules) + " |"
    return "\n".join([line(headers), separator, *(line(r) for r in rows)])


def start_daemon(
    args: argparse.Namespace,
    workdir: Path,
    models_dir: Path,
    env_extra: dict[str, str] | None = None,
) -> tuple[Any, Path]:
    """A real ``edge-agent serve`` subprocess on a socket in ``workdir`` (its own index and
    home there), pinned to ``args.quant`` and ``args.threads``, no tuning; (process, socket)."""
    import subprocess

    socket_path = workdir / "agent.sock"
    command = [
        sys.executable, "-m", "edge_agent.cli", "--models-dir", str(models_dir),
        "--log-level", "warning",
        "serve", "--socket", str(socket_path), "--index-dir", str(workdir / "index"),
        "--quant", args.quant, "--threads", str(args.threads), "--no-tune",
    ]  # fmt: skip
    env = {**os.environ, "EDGE_AGENT_HOME": str(workdir / "home"), **(env_extra or {})}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("edge-agent listening on unix:"):
        proc.kill()
        raise SystemExit(f"the daemon did not start: {line!r}")
    return proc, socket_path
