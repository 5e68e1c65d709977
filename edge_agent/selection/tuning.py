"""Measure, on the real box, which quant, thread count and batch size embed fastest, and at
what quality loss; remember it, and remember which files crashed.

The same quant can be fast on one CPU and slow on another (int8 dot products on a Pi 5, no
fp16 arithmetic on a Pi 4, AMX bugs on a Xeon), so the profiles' static order is only the
fallback: ``tune`` times each candidate on a fixed text set within a time budget and stores
the results keyed by (model file sha256, engine build, CPU), where ``select`` finds them.

The trials run in a child process (``python -m edge_agent.selection.tuning --worker``): a quant that
crashes llama.cpp kills only the worker; it is recorded as bad and the others go on.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..embedding.children import child_environment
from ..errors import InvalidArgument
from ..hardware.host import HostInfo, probe_host
from ..logs import kv
from ..models.manifest import ModelFile, write_json_atomic
from ..models.store import ModelStore
from ..progress import Progress
from .choose import (
    QUANT_PRECISION,
    Decision,
    Measurement,
    Override,
    effective_batch_tokens,
    select,
)
from .profiles import Profile, load_profiles

__all__ = [
    "RECORD_FORMAT",
    "TUNING_TEXTS",
    "BadFiles",
    "TuningResult",
    "TuningStore",
    "child_environment",
    "describe_exit",
    "engine_build",
    "stderr_tail",
    "tune",
]

log = logging.getLogger("edge_agent.tuning")

RECORD_FORMAT = 1
TUNING_FILE = "tuning.json"
BAD_FILE = "known-bad.json"

# A fixed, mixed-length text set: short queries and long passages, so the batch size and the
# per-sequence overhead both show. Changing it invalidates comparisons, not stored records.
TUNING_TEXTS: tuple[str, ...] = (
    "How do I reset my router?",
    "best hiking trails near the coast",
    "A man is playing a guitar on the street.",
    "The cat sat quietly on the warm windowsill.",
    "Quarterly revenue grew by twelve percent.",
    "Symptoms of iron deficiency in adults",
    "What time does the pharmacy open on Sundays?",
    "The train to the airport leaves every fifteen minutes from platform four.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She finished the marathon in under four hours despite the heat and a sore knee.",
    "The committee postponed the vote until the budget report had been reviewed.",
    "Vector databases index embeddings so that nearest neighbours can be found quickly.",
    "Raspberry Pi boards are small single-board computers used in education and industry.",
    "Please remember to water the tomatoes every morning while I am away on holiday.",
    "The museum's new exhibition explores the history of navigation, from the stars used by"
    " Polynesian sailors to the satellite constellations that guide today's ships.",
    "After the storm, volunteers spent the weekend clearing fallen branches from the park,"
    " repairing fences, and replanting the flower beds that the flood had washed away.",
    "Large language models are trained on vast text corpora; smaller embedding models map"
    " sentences to fixed-size vectors whose cosine similarity reflects their meaning.",
    "The recipe calls for two cups of flour, a pinch of salt, three eggs, a cup of milk and"
    " a tablespoon of melted butter, whisked until smooth and rested for half an hour.",
    "In 1969 the Apollo 11 mission landed the first humans on the Moon; Neil Armstrong and"
    " Buzz Aldrin spent about two and a half hours outside the lunar module.",
    "Our support team answers questions about billing, account security and data export"
    " between nine and five on weekdays, and urgent outages are handled around the clock.",
    "The quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply today after the central bank raised interest rates.",
    "Is it safe to run a database on a microSD card?",
    "Heat pumps move warmth from outside air into a building, even on cold days, using a"
    " refrigerant cycle driven by an electric compressor; they are several times more"
    " efficient than resistive heaters, which is why many countries now subsidise them.",
)

_MAX_ROUNDS = 250  # timed rounds per trial, whatever the clock says
# Texts go to the engine in calls of this many (every third text, so each call mixes short
# and long ones): small calls let a slow box stop at its time slice instead of finishing a
# long pass, and resemble the micro-batches the server sees. The first call's vectors are
# the ones compared for quality.
_CALLS = 3
_RUNNERS_UP = 2  # quants re-measured at the winner's settings


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _engine_build_here() -> str:
    import llama_cpp  # deferred: importing it loads the engine library

    info = llama_cpp.llama_print_system_info()
    text = info.decode("utf-8", errors="replace") if isinstance(info, bytes) else str(info)
    return f"llama-cpp-python {llama_cpp.__version__}; {' '.join(text.split())}"


@functools.cache
def engine_build() -> str:
    """Identifies the engine for records: the bindings' version and what the build enables.

    Asked of a short-lived child unless llama.cpp is loaded here already: the daemon runs the
    engine in a child process, and loading the library only to name it would cost the
    daemon's own process ~15 MB for as long as it runs."""
    if "llama_cpp" in sys.modules:
        return _engine_build_here()
    code = "from edge_agent.selection.tuning import _engine_build_here; print(_engine_build_here())"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_environment(),
    )
    if result.returncode != 0:
        return _engine_build_here()  # the child could not say: pay for loading it here
    return result.stdout.strip().splitlines()[-1]


# -- persistent records -------------------------------------------------------------------------


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        # An unreadable or older record only loses what was learned; it is rebuilt.
        return {}
    return data


class TuningStore:
    """Measurements per (model file sha256, engine build, CPU), in one small JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _entries(self) -> list[dict[str, Any]]:
        entries = _load_json(self.path).get("measurements", [])
        return [e for e in entries if isinstance(e, dict)]

    def measurements(self, engine: str, cpu: str) -> list[Measurement]:
        out = []
        for entry in self._entries():
            if entry.get("engine") == engine and entry.get("cpu") == cpu:
                try:
                    out.append(Measurement.from_json(entry))
                except TypeError:
                    continue  # a field missing from a hand-edited file: skip that entry
        return out

    def replace(
        self, engine: str, cpu: str, sha256s: set[str], measurements: Sequence[Measurement]
    ) -> None:
        """Drop what was stored for ``sha256s`` on this engine and CPU, store the new ones."""
        kept = [
            e
            for e in self._entries()
            if not (
                e.get("engine") == engine and e.get("cpu") == cpu and e.get("sha256") in sha256s
            )
        ]
        kept += [{**m.to_json(), "engine": engine, "cpu": cpu} for m in measurements]
        write_json_atomic(self.path, {"format": RECORD_FORMAT, "measurements": kept})


class BadFiles:
    """Model files that crashed or gave wrong numbers, per (sha256, engine build, CPU).

    A new engine build or another CPU is a new key, so a fixed engine gets a fresh chance.
    Also caches the reference vectors the self-test compares against.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _data(self) -> dict[str, Any]:
        data = _load_json(self.path)
        data.setdefault("bad", [])
        data.setdefault("references", [])
        return data

    def _save(self, data: dict[str, Any]) -> None:
        data["format"] = RECORD_FORMAT
        write_json_atomic(self.path, data)

    def bad(self, engine: str, cpu: str) -> dict[str, str]:
        """sha256 -> why, for this engine build and CPU."""
        return {
            e["sha256"]: e.get("reason", "failed")
            for e in self._data()["bad"]
            if e.get("engine") == engine and e.get("cpu") == cpu and "sha256" in e
        }

    def mark_bad(
        self, file: ModelFile, model: str, engine: str, cpu: str, kind: str, reason: str
    ) -> None:
        data = self._data()
        data["bad"] = [
            e
            for e in data["bad"]
            if not (
                e.get("sha256") == file.sha256 and e.get("engine") == engine and e.get("cpu") == cpu
            )
        ]
        data["bad"].append(
            {
                "sha256": file.sha256,
                "model": model,
                "quant": file.quant,
                "engine": engine,
                "cpu": cpu,
                "kind": kind,  # "crash", "timeout", "wrong-numbers", "error"
                "reason": reason,
                "when": _now(),
            }
        )
        self._save(data)

    def forget(self, engine: str | None = None, cpu: str | None = None) -> int:
        """Clear the bad marks (all, or one engine/CPU's) so the files are tried again."""
        data = self._data()
        before = len(data["bad"])
        data["bad"] = [
            e
            for e in data["bad"]
            if (engine is not None and e.get("engine") != engine)
            or (cpu is not None and e.get("cpu") != cpu)
        ]
        self._save(data)
        return before - len(data["bad"])

    def reference(self, sha256: str, engine: str, cpu: str, texts: Sequence[str]) -> Any:
        for entry in self._data()["references"]:
            if (entry.get("sha256"), entry.get("engine"), entry.get("cpu")) == (
                sha256,
                engine,
                cpu,
            ) and entry.get("texts") == list(texts):
                return entry.get("vectors")
        return None

    def store_reference(
        self, sha256: str, engine: str, cpu: str, texts: Sequence[str], vectors: Any
    ) -> None:
        data = self._data()
        data["references"] = [
            e
            for e in data["references"]
            if (e.get("sha256"), e.get("engine"), e.get("cpu")) != (sha256, engine, cpu)
        ]
        data["references"].append(
            {
                "sha256": sha256,
                "engine": engine,
                "cpu": cpu,
                "texts": list(texts),
                "vectors": vectors,
            }
        )
        self._save(data)


# -- the parent side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TuningResult:
    measurements: tuple[Measurement, ...]
    crashed: tuple[tuple[str, str], ...]  # (quant, why): marked bad
    skipped: tuple[str, ...]  # trials the budget did not allow
    seconds: float
    engine: str
    cpu: str

    def table(self) -> str:
        """A plain table for ``edge-agent tune``."""
        rows = [
            f"{'quant':<8} {'threads':>7} {'batch':>6} {'seqs':>5} {'texts/s':>8} {'cos min':>8}"
            f" {'memory':>8}"
        ]
        for m in sorted(self.measurements, key=lambda m: -m.texts_per_s):
            cosine = f"{m.cosine_min:.4f}" if m.cosine_min is not None else "-"
            memory = f"{m.rss_bytes / (1 << 20):.0f} MiB" if m.rss_bytes else "-"
            rows.append(
                f"{m.quant:<8} {m.threads:>7} {m.batch_tokens:>6} {m.max_sequences:>5}"
                f" {m.texts_per_s:>8.1f} {cosine:>8} {memory:>8}"
            )
        rows += [f"crashed  {quant}: {why}" for quant, why in self.crashed]
        if self.skipped:
            rows.append(f"skipped (time budget): {', '.join(self.skipped)}")
        return "\n".join(rows)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def stderr_tail(text: str, lines: int = 3, limit: int = 400) -> str:
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-limit:]


def _thread_options(decision: Decision, host: HostInfo) -> list[int]:
    ceiling = host.cpu_limit or host.logical_cores or decision.threads
    options = [decision.threads - 1, decision.threads + 1, ceiling, host.physical_cores or 0]
    return sorted({t for t in options if 1 <= t <= ceiling and t != decision.threads})


def _batch_options(decision: Decision) -> list[int]:
    return sorted(
        {b for b in (decision.batch_tokens // 2, decision.batch_tokens * 2) if 32 <= b <= 8192}
    )


def _reference_quant(quants: Sequence[str]) -> str:
    return min(
        quants,
        key=lambda q: QUANT_PRECISION.index(q) if q in QUANT_PRECISION else len(QUANT_PRECISION),
    )


def tune(
    store: ModelStore,
    model: str,
    *,
    state_dir: Path,
    budget_s: float = 20.0,
    host: HostInfo | None = None,
    profiles: Sequence[Profile] | None = None,
    override: Override | None = None,
    quants: Sequence[str] | None = None,
    engine: str | None = None,
    show_progress: bool = True,
) -> TuningResult:
    """Measure the candidate files of ``model`` on this box for about ``budget_s`` seconds.

    Candidates are what ``select`` would consider (memory guard, known-bad files and engine
    quirks applied), or ``quants``. Results go to ``state_dir/tuning.json``; a file that
    crashes the worker goes to ``state_dir/known-bad.json``. Never runs past
    ``budget_s`` + a few seconds of grace: the worker is killed at the deadline.
    """
    if not 1.0 <= budget_s <= 3600.0:
        raise InvalidArgument(f"budget_s must be in [1, 3600] seconds, got {budget_s!r}")
    started = time.monotonic()
    host = host or probe_host()
    profiles = profiles if profiles is not None else load_profiles()
    engine = engine or engine_build()
    tuning, bad_files = TuningStore(state_dir / TUNING_FILE), BadFiles(state_dir / BAD_FILE)
    manifest = store.get(model)
    selection = select(
        host,
        profiles,
        manifest,
        override=override,
        bad=bad_files.bad(engine, host.cpu_id),
        engine_info=engine,
        shapes=store.shapes(model),
    )
    candidates = [c for c in selection.candidates if quants is None or c.quant in quants]
    if not candidates:
        raise InvalidArgument(
            f"nothing to tune: none of {list(quants or [])} is a usable file of {model}"
        )
    for decision in candidates:
        store.resolve(model, decision.quant)  # sha256-verified before it is trusted to run
    lead = candidates[0]
    job: dict[str, Any] = {
        "store": str(store.root),
        "model": model,
        "texts": list(TUNING_TEXTS),
        "candidates": [
            {
                "quant": c.quant,
                "sha256": c.file.sha256,
                "threads": c.threads,
                "batch_tokens": c.batch_tokens,
                "max_sequences": c.max_sequences,
                "max_context": c.max_context,
                "flash_attention": c.flash_attention,
            }
            for c in candidates
        ],
        "reference": _reference_quant([c.quant for c in candidates]),
        "thread_options": _thread_options(lead, host),
        "batch_options": _batch_options(lead),
        "model_max_tokens": manifest.max_tokens,
        "decoder": manifest.pooling == "last",
        "min_cosine": selection.profile.min_cosine,
    }
    planned = len(candidates) + len(job["thread_options"]) + len(job["batch_options"])
    planned += min(_RUNNERS_UP, len(candidates) - 1)
    job["planned"] = planned
    results: list[Measurement] = []
    crashed: list[tuple[str, str]] = []
    skipped: list[str] = []
    reference_vectors: list[list[float]] | None = None
    deadline = started + budget_s
    files = {c.quant: c.file for c in candidates}
    with Progress(f"tune {model}", total=planned, unit=" trials") as bar:
        for _attempt in range(len(candidates) + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 1.0:
                break
            job["budget_s"] = remaining
            job["done"] = [m.to_json() for m in results]
            job["crashed"] = [q for q, _ in crashed]
            alive = [c.quant for c in candidates if c.quant not in job["crashed"]]
            if not alive:
                break
            if job["reference"] not in alive:
                # The reference crashed before it gave vectors: the next most precise serves.
                job["reference"] = _reference_quant(alive)
            job["reference_vectors"] = reference_vectors
            outcome = _run_worker(job, deadline, bar if show_progress else None)
            results.extend(outcome.results)
            skipped = outcome.skipped
            if outcome.reference_vectors is not None:
                reference_vectors = outcome.reference_vectors
            if outcome.failure is None:
                break
            if outcome.running is None:
                log.warning("%s", kv(event="tuning_worker_failed", error=outcome.failure))
                break
            quant = outcome.running
            kind = "timeout" if outcome.timed_out else "crash"
            crashed.append((quant, outcome.failure))
            if not outcome.timed_out:
                # A trial cut off by the budget proves nothing against the file.
                bad_files.mark_bad(files[quant], model, engine, host.cpu_id, kind, outcome.failure)
                log.warning(
                    "%s",
                    kv(event="tuning_crash", model=model, quant=quant, error=outcome.failure),
                )
            else:
                skipped.append(quant)
                break
    measured_files = {m.sha256 for m in results}
    tuning.replace(engine, host.cpu_id, measured_files, results)
    return TuningResult(
        measurements=tuple(results),
        crashed=tuple(crashed),
        skipped=tuple(skipped),
        seconds=time.monotonic() - started,
        engine=engine,
        cpu=host.cpu_id,
    )


@dataclass
class _WorkerOutcome:
    results: list[Measurement]
    skipped: list[str]
    reference_vectors: list[list[float]] | None
    running: str | None  # the quant whose trial was under way when the worker died
    failure: str | None
    timed_out: bool


def _read_lines(stream: Any, out: queue.Queue[str | None]) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def _run_worker(job: dict[str, Any], deadline: float, bar: Progress | None) -> _WorkerOutcome:
    outcome = _WorkerOutcome([], [], None, None, None, False)
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.selection.tuning", "--worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_environment(),
    )
    lines: queue.Queue[str | None] = queue.Queue()
    errors: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    err_reader = threading.Thread(target=lambda: errors.extend(process.stderr or ()), daemon=True)
    reader.start()
    err_reader.start()
    if process.stdin is not None:  # always, with stdin=PIPE; the check is for the type checker
        process.stdin.write(json.dumps(job))
        process.stdin.close()
    grace = 5.0  # a trial that started in time may finish a little late
    finished = False
    while True:
        timeout = deadline + grace - time.monotonic()
        try:
            line = lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            process.kill()
            outcome.timed_out = True
            outcome.failure = f"still running {grace:.0f} s after the time budget"
            break
        if line is None:
            break
        try:
            event = json.loads(line)
        except ValueError:
            continue  # not ours: something printed to stdout
        kind = event.get("event")
        if kind == "start":
            outcome.running = event["quant"]
            if bar is not None:
                bar.advance(0, f"{event['quant']} x{event['threads']} threads")
        elif kind == "result":
            outcome.results.append(Measurement.from_json(event["measurement"]))
            if event.get("vectors") is not None:
                outcome.reference_vectors = event["vectors"]
            outcome.running = None
            if bar is not None:
                bar.advance(1, f"{event['measurement']['quant']}")
        elif kind == "done":
            outcome.skipped = list(event.get("skipped", []))
            finished = True
    process.wait(timeout=30)
    err_reader.join(timeout=5)
    if not finished and not outcome.timed_out:
        outcome.failure = describe_exit(process.returncode)
        tail = stderr_tail("".join(errors))
        if tail:
            outcome.failure += f": {tail}"
    return outcome


# -- the worker side ----------------------------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _start_peak() -> int | None:
    """Reset the peak-RSS mark (Linux >= 4.0) and return the RSS now; None if unsupported.

    A peak, not an end-of-trial delta: compute buffers are freed before the trial ends, and
    what the previous trial left to the allocator would hide part of a delta.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _trials(job: dict[str, Any], done: list[Measurement]) -> Iterator[dict[str, Any]]:
    """The plan, adapted to what was measured: every quant at its profile settings (the
    reference first, for quality), then threads and batch sizes on the fastest good quant,
    then the runners-up at the winning settings, so the final comparison is like for like
    (on a contended box the first pass's ranking is mostly noise)."""
    crashed = set(job.get("crashed", []))
    candidates = [c for c in job["candidates"] if c["quant"] not in crashed]
    reference = job["reference"]
    ordered = sorted(candidates, key=lambda c: c["quant"] != reference)
    for candidate in ordered:
        yield dict(candidate)
    good = [m for m in done if m.cosine_min is None or m.cosine_min >= job["min_cosine"]]
    if not good:
        return
    best = max(good, key=lambda m: m.texts_per_s)
    base = next(c for c in candidates if c["quant"] == best.quant)
    for threads in job["thread_options"]:
        yield {**base, "threads": threads}
    best = max((m for m in done if m.quant == best.quant), key=lambda m: m.texts_per_s)
    for batch in job["batch_options"]:
        yield {**base, "threads": best.threads, "batch_tokens": batch}
    best = max((m for m in done if m.quant == best.quant), key=lambda m: m.texts_per_s)
    fastest: dict[str, float] = {}
    for m in good:
        fastest[m.quant] = max(fastest.get(m.quant, 0.0), m.texts_per_s)
    runners = sorted((q for q in fastest if q != best.quant), key=lambda q: -fastest[q])
    for quant in runners[:_RUNNERS_UP]:
        candidate = next(c for c in candidates if c["quant"] == quant)
        yield {**candidate, "threads": best.threads, "batch_tokens": best.batch_tokens}


def _key(
    quant: str, threads: int, batch_tokens: int, max_sequences: int, job: Mapping[str, Any]
) -> tuple[str, int, int, int]:
    """Trials that would allocate the same batch are the same trial."""
    context = next(c["max_context"] for c in job["candidates"] if c["quant"] == quant)
    allocated = effective_batch_tokens(
        batch_tokens, max_sequences, job["model_max_tokens"], context, bool(job.get("decoder"))
    )
    return quant, threads, allocated, max_sequences


def _worker(job: dict[str, Any]) -> int:
    import numpy as np

    from ..embedding.embedder import Embedder, EmbedderConfig

    started = time.monotonic()
    deadline = started + float(job["budget_s"])
    store = ModelStore(Path(job["store"]))
    texts = list(job["texts"])
    calls = [texts[k::_CALLS] for k in range(_CALLS)]
    done = [Measurement.from_json(m) for m in job.get("done", [])]
    seen = {_key(m.quant, m.threads, m.batch_tokens, m.max_sequences, job) for m in done}
    reference = (
        np.asarray(job["reference_vectors"], dtype=np.float32)
        if job.get("reference_vectors") is not None
        else None
    )
    overhead = 0.5  # load + warm-up of one trial, re-measured as trials run
    left = max(1, int(job.get("planned", 1)) - len(done))
    skipped: list[str] = []
    for count, trial in enumerate(_trials(job, done)):
        if count >= 64:  # bounded whatever the plan yields
            break
        key = _key(
            trial["quant"], trial["threads"], trial["batch_tokens"], trial["max_sequences"], job
        )
        if key in seen:
            left = max(1, left - 1)
            continue
        remaining = deadline - time.monotonic()
        if remaining < overhead + 0.3:
            skipped.append(f"{trial['quant']}x{trial['threads']}/{trial['batch_tokens']}")
            continue
        seen.add(key)
        _emit({"event": "start", "quant": trial["quant"], "threads": trial["threads"]})
        trial_started = time.monotonic()
        # Timed slice: an even share of what is left, between 0.2 and 2 seconds.
        slice_s = min(2.0, max(0.2, remaining / left - overhead))
        left = max(1, left - 1)
        before = _start_peak()
        config = EmbedderConfig(
            threads=trial["threads"],
            batch_tokens=trial["batch_tokens"],
            max_sequences=trial["max_sequences"],
            max_sequence_tokens=trial["max_context"],
            flash_attention=trial["flash_attention"],
        )
        resolved = store.resolve(job["model"], trial["quant"], verify=False)
        with Embedder(resolved, config) as embedder:
            vectors = embedder.embed(calls[0]).vectors  # the warm-up, and the quality sample
            timed_start = time.monotonic()
            overhead = timed_start - trial_started
            best_rate = 0.0
            # Rounds of the other calls; the best round counts: the box is shared, and the
            # least disturbed round is the one comparable across trials.
            for _round in range(_MAX_ROUNDS):
                round_start = time.perf_counter()
                for chunk in calls[1:]:
                    embedder.embed(chunk)
                rate = sum(len(c) for c in calls[1:]) / (time.perf_counter() - round_start)
                best_rate = max(best_rate, rate)
                if time.monotonic() - timed_start >= slice_s:
                    break
            after = _status_bytes("VmHWM") if before is not None else None
        send_vectors = None
        if reference is None and trial["quant"] == job["reference"]:
            reference = vectors
            send_vectors = vectors.tolist()
        cosines = (vectors * reference).sum(axis=1) if reference is not None else None
        measurement = Measurement(
            sha256=trial["sha256"],
            quant=trial["quant"],
            threads=trial["threads"],
            batch_tokens=trial["batch_tokens"],
            max_sequences=trial["max_sequences"],
            texts_per_s=best_rate,
            cosine_min=float(cosines.min()) if cosines is not None else None,
            cosine_mean=float(cosines.mean()) if cosines is not None else None,
            rss_bytes=after - before if before is not None and after is not None else None,
            measured_at=_now(),
        )
        done.append(measurement)
        _emit({"event": "result", "measurement": measurement.to_json(), "vectors": send_vectors})
    _emit({"event": "done", "skipped": skipped, "seconds": time.monotonic() - started})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["--worker"]:
        print("usage: python -m edge_agent.selection.tuning --worker < job.json", file=sys.stderr)
        return 2
    return _worker(json.loads(sys.stdin.read()))


if __name__ == "__main__":
    sys.exit(main())
