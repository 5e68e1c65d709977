"""Safe start: before serving, prove the chosen model file works on this engine and CPU.

Some engine bugs only show on some hardware (an AMX-enabled llama.cpp segfaults on Q8_0 and
K-quants, llama.cpp #20824) or with some files (a tensor type the CPU backend cannot add
aborts the process). Loading such a file in the daemon would kill it, again at every
restart. So the file is first loaded and run in a child process
(``python -m edge_agent.selection.selftest``) on fixed probe texts; its vectors are compared
with the expected ones. A crash, a timeout or wrong numbers mark (file sha256, engine build, CPU) as
bad in a small record, and start-up falls back to the next candidate of the selection. When
none works, the daemon refuses to start with every reason (NoUsableModel).

``safe_start`` is the whole start-up decision (tuning on first start, selection, self-test);
``plan`` is the selection alone, for ``edge-agent probe --explain``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..embedding.embedder import EmbedderConfig
from ..errors import EdgeAgentError, InvalidArgument
from ..hardware.host import HostInfo, probe_host
from ..logs import kv
from ..models.manifest import ModelManifest
from ..models.store import ModelStore, ResolvedModel
from .choose import (
    QUANT_PRECISION,
    Decision,
    NoUsableModel,
    Override,
    Selection,
    estimate_memory,
    select,
)
from .profiles import Profile, load_profiles
from .tuning import (
    BAD_FILE,
    TUNING_FILE,
    BadFiles,
    TuningResult,
    TuningStore,
    child_environment,
    describe_exit,
    engine_build,
    stderr_tail,
    tune,
)

__all__ = [
    "DEFAULT_MIN_COSINE",
    "MIN_COSINE",
    "PROBE_TEXTS",
    "SelfTestOutcome",
    "StartPlan",
    "embedder_config",
    "plan",
    "run_selftest",
    "safe_start",
]

log = logging.getLogger("edge_agent.selftest")

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my router?",
    "Embeddings map a sentence to a vector that captures its meaning, so similar texts land"
    " close together.",
)
# Lowest acceptable cosine to the reference file's vector (same engine, same texts), per quant.
# Measured here against F32: F16 1.0000, Q8_0 0.9996, Q4_0 0.958 (see docs/benchmarks.md);
# the bounds leave room for other models and CPUs and still catch a broken kernel, which
# lands far lower (0.5 and below).
MIN_COSINE = {
    "F32": 0.999,
    "BF16": 0.995,
    "F16": 0.998,
    "Q8_0": 0.995,
    "Q6_K": 0.99,
    "Q5_K_M": 0.98,
    "Q5_K_S": 0.98,
    "Q5_0": 0.98,
    "Q4_K_M": 0.97,
    "Q4_K_S": 0.96,
    "Q4_0": 0.90,
}
DEFAULT_MIN_COSINE = 0.90
_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SelfTestOutcome:
    quant: str
    ok: bool
    # "ok", "unverified" (no reference to compare with), "crash", "timeout", "wrong-numbers",
    # "error" (llama.cpp refused the file), "integrity" (the file is not what the manifest says)
    kind: str
    detail: str
    seconds: float
    cosine: float | None = None

    def line(self) -> str:
        cosine = f", cosine {self.cosine:.4f}" if self.cosine is not None else ""
        return f"self-test {self.quant}: {self.kind}{cosine} ({self.detail}) [{self.seconds:.1f}s]"


@dataclass(frozen=True)
class StartPlan:
    """What the daemon opens: the resolved file and the embedder settings, with the story."""

    selection: Selection  # after failed candidates were dropped
    decision: Decision
    resolved: ResolvedModel
    config: EmbedderConfig
    outcomes: tuple[SelfTestOutcome, ...]
    tuning: TuningResult | None = None

    def report(self) -> str:
        lines = [f"serving {self.decision.model} {self.decision.summary()}"]
        lines += [outcome.line() for outcome in self.outcomes]
        if self.tuning is not None:
            lines.append(
                f"tuned on first start in {self.tuning.seconds:.1f}s:"
                f" {len(self.tuning.measurements)} trials"
            )
        return "\n".join(lines)


def embedder_config(decision: Decision, base: EmbedderConfig | None = None) -> EmbedderConfig:
    """The EmbedderConfig for ``decision``; input limits (max_texts, ...) come from ``base``."""
    base = base or EmbedderConfig()
    return EmbedderConfig(
        threads=decision.threads,
        batch_tokens=decision.batch_tokens,
        max_sequences=decision.max_sequences,
        max_sequence_tokens=decision.max_context,
        flash_attention=decision.flash_attention,
        solo_tokens=base.solo_tokens,
        chunk_overlap=base.chunk_overlap,
        max_texts=base.max_texts,
        max_text_bytes=base.max_text_bytes,
        use_mmap=base.use_mmap,
        use_mlock=decision.mlock,
        adaptive_threads=base.adaptive_threads,
    )


def default_timeout(file_size: int) -> float:
    """Start-up of the child and a load at a slow SD card's 10 MB/s, generously."""
    return 60.0 + file_size / 10e6


# -- one self-test ------------------------------------------------------------------------------


def _manifest_reference(manifest: ModelManifest, texts: Sequence[str]) -> np.ndarray | None:
    vectors = manifest.reference_vectors
    if not vectors or not all(text in vectors for text in texts):
        return None
    rows = np.asarray([vectors[text] for text in texts], dtype=np.float32)
    if rows.shape != (len(texts), manifest.dims) or not np.isfinite(rows).all():
        return None
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def _check_vectors(vectors: Any, texts: Sequence[str], dims: int) -> tuple[np.ndarray | None, str]:
    try:
        rows = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        return None, "the child sent no vectors"
    if rows.shape != (len(texts), dims):
        return None, f"vectors of shape {rows.shape}, expected {(len(texts), dims)}"
    if not np.isfinite(rows).all():
        return None, "NaN or infinite values in the embedding"
    norms = np.linalg.norm(rows, axis=1)
    if np.abs(norms - 1.0).max() > _NORM_TOLERANCE:
        return None, f"vector norms {norms.min():.4f}..{norms.max():.4f}, not 1 (all-zero output?)"
    return rows, ""


def _run_child(job: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any], str | None, str]:
    """(vectors by role, failure or None, kind of failure)."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "edge_agent.selection.selftest"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=child_environment(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return _events(partial)[0], f"no answer within {timeout_s:.0f} s (killed)", "timeout"
    vectors, error = _events(result.stdout)
    if error is not None:
        return vectors, error, "error"
    if result.returncode != 0 or "done" not in vectors:
        failure = describe_exit(result.returncode)
        tail = stderr_tail(result.stderr)
        return vectors, f"{failure}: {tail}" if tail else failure, "crash"
    return vectors, None, "ok"


def _events(stdout: str) -> tuple[dict[str, Any], str | None]:
    vectors: dict[str, Any] = {}
    error = None
    for line in stdout.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        if event.get("event") == "vectors":
            vectors[event.get("role", "")] = event.get("vectors")
        elif event.get("event") == "error":
            error = str(event.get("message"))
        elif event.get("event") == "done":
            vectors["done"] = True
    return vectors, error


def run_selftest(
    store: ModelStore,
    decision: Decision,
    *,
    expected: np.ndarray | None = None,
    reference_quant: str | None = None,
    texts: Sequence[str] = PROBE_TEXTS,
    timeout_s: float | None = None,
) -> tuple[SelfTestOutcome, np.ndarray | None, str | None]:
    """Load and run ``decision``'s file in a child process and judge its numbers.

    Compares with ``expected`` (normalised rows, one per text) when given, else with
    ``reference_quant``'s file run in the same child after the candidate. Returns the
    outcome, the reference vectors the child computed (to cache), and a failure of the
    reference file itself (it crashed after the candidate passed) or None.
    """
    manifest = store.get(decision.model)
    config = embedder_config(decision)
    job = {
        "store": str(store.root),
        "model": decision.model,
        "quant": decision.quant,
        "reference_quant": reference_quant if expected is None else None,
        "texts": list(texts),
        "config": {
            "threads": config.threads,
            "batch_tokens": config.batch_tokens,
            "max_sequences": config.max_sequences,
            "max_sequence_tokens": config.max_sequence_tokens,
            "flash_attention": config.flash_attention,
        },
    }
    started = time.monotonic()
    timeout = timeout_s if timeout_s is not None else default_timeout(decision.file.size)
    vectors, failure, kind = _run_child(job, timeout)
    seconds = time.monotonic() - started
    quant = decision.quant
    if "candidate" not in vectors:
        return SelfTestOutcome(quant, False, kind, failure or "no vectors", seconds), None, None
    rows, problem = _check_vectors(vectors["candidate"], texts, manifest.dims)
    if rows is None:
        return SelfTestOutcome(quant, False, "wrong-numbers", problem, seconds), None, None
    reference_failure = None
    computed = None
    if expected is None and job["reference_quant"] is not None:
        if "reference" in vectors:
            computed, problem = _check_vectors(vectors["reference"], texts, manifest.dims)
            if computed is None:
                reference_failure = f"reference {job['reference_quant']}: {problem}"
            expected = computed
        else:
            reference_failure = failure or "the reference file gave no vectors"
    bound = MIN_COSINE.get(quant, DEFAULT_MIN_COSINE)
    if expected is None:
        detail = "no reference vectors: checked shape, finiteness and norms only"
        if reference_failure:
            detail += f"; reference failed: {reference_failure}"
        return SelfTestOutcome(quant, True, "unverified", detail, seconds), None, reference_failure
    cosine = float((rows * expected).sum(axis=1).min())
    source = f"reference {reference_quant}" if computed is not None else "expected vectors"
    if cosine < bound:
        detail = f"cosine {cosine:.4f} to the {source} is below {bound} for {quant}"
        return (
            SelfTestOutcome(quant, False, "wrong-numbers", detail, seconds, cosine),
            computed,
            None,
        )
    detail = f"matches the {source} (bound {bound})"
    return SelfTestOutcome(quant, True, "ok", detail, seconds, cosine), computed, None


# -- start-up -----------------------------------------------------------------------------------


def _reference_file(
    manifest: ModelManifest, selection: Selection, bad: dict[str, str]
) -> str | None:
    """The most precise file that is not known bad and fits the memory budget."""
    budget = selection.budget.budget
    ranked = sorted(
        manifest.files,
        key=lambda q: QUANT_PRECISION.index(q) if q in QUANT_PRECISION else len(QUANT_PRECISION),
    )
    lead = selection.decision
    for quant in ranked:
        file = manifest.files[quant]
        if file.sha256 in bad:
            continue
        need = estimate_memory(
            file.size, manifest.dims, lead.batch_tokens, lead.max_sequences, lead.flash_attention
        )
        if budget is None or need <= budget:
            return quant
    return None


@dataclass
class _Context:
    host: HostInfo
    profiles: Sequence[Profile]
    engine: str
    bad_files: BadFiles
    tuning: TuningStore


def _context(
    state_dir: Path,
    host: HostInfo | None,
    profiles: Sequence[Profile] | None,
    engine: str | None,
) -> _Context:
    return _Context(
        host=host or probe_host(),
        profiles=profiles if profiles is not None else load_profiles(),
        engine=engine or engine_build(),
        bad_files=BadFiles(Path(state_dir) / BAD_FILE),
        tuning=TuningStore(Path(state_dir) / TUNING_FILE),
    )


def plan(
    store: ModelStore,
    model: str,
    *,
    state_dir: Path,
    override: Override | None = None,
    host: HostInfo | None = None,
    profiles: Sequence[Profile] | None = None,
    engine: str | None = None,
    available_memory: int | None = None,
) -> Selection:
    """What start-up would choose now, from the stored measurements and bad marks, without
    running anything (``edge-agent probe --explain``)."""
    ctx = _context(state_dir, host, profiles, engine)
    return select(
        ctx.host,
        ctx.profiles,
        store.get(model),
        override=override,
        measurements=ctx.tuning.measurements(ctx.engine, ctx.host.cpu_id),
        bad=ctx.bad_files.bad(ctx.engine, ctx.host.cpu_id),
        engine_info=ctx.engine,
        available_memory=available_memory,
        shapes=store.shapes(model),
    )


def safe_start(
    store: ModelStore,
    model: str,
    *,
    state_dir: Path,
    override: Override | None = None,
    host: HostInfo | None = None,
    profiles: Sequence[Profile] | None = None,
    engine: str | None = None,
    tune_budget_s: float | None = 20.0,
    timeout_s: float | None = None,
    base_config: EmbedderConfig | None = None,
    show_progress: bool = True,
    prefer: tuple[str, str] | None = None,
) -> StartPlan:
    """Choose and self-test the model file to serve; fall back along the selection's order.

    ``prefer``: (quant, why) to try first when usable (see ``selection.select``).

    Tunes first (``tune_budget_s`` seconds) when nothing was measured for this model on this
    engine and CPU yet and the user did not pin a quant; ``tune_budget_s=None`` skips it.
    Raises NoUsableModel when every candidate fails (the message lists each reason),
    InsufficientMemory when nothing fits, ModelNotFound for an unknown model or quant.
    """
    if timeout_s is not None and not 1.0 <= timeout_s <= 3600.0:
        raise InvalidArgument(f"timeout_s must be in [1, 3600] seconds, got {timeout_s!r}")
    ctx = _context(state_dir, host, profiles, engine)
    cpu = ctx.host.cpu_id
    manifest = store.get(model)
    shas = {f.sha256 for f in manifest.files.values()}
    measurements = ctx.tuning.measurements(ctx.engine, cpu)
    tuned: TuningResult | None = None
    pinned = override is not None and override.quant is not None
    if tune_budget_s and not pinned and not any(m.sha256 in shas for m in measurements):
        log.info(
            "%s",
            kv(event="tuning", model=model, reason="no measurements", budget_s=tune_budget_s),
        )
        tuned = tune(
            store,
            model,
            state_dir=state_dir,
            budget_s=tune_budget_s,
            host=ctx.host,
            profiles=ctx.profiles,
            override=override,
            engine=ctx.engine,
            show_progress=show_progress,
        )
        measurements = ctx.tuning.measurements(ctx.engine, cpu)
    bad = ctx.bad_files.bad(ctx.engine, cpu)
    selection = select(
        ctx.host,
        ctx.profiles,
        manifest,
        override=override,
        measurements=measurements,
        bad=bad,
        engine_info=ctx.engine,
        prefer=prefer,
        shapes=store.shapes(manifest.name),
    )
    outcomes: list[SelfTestOutcome] = []
    manifest_expected = _manifest_reference(manifest, PROBE_TEXTS)
    for _ in range(len(selection.candidates)):
        decision = selection.decision
        try:
            resolved = store.resolve(model, decision.quant)
        except EdgeAgentError as exc:
            # A corrupt or missing file is not the engine's fault: skip it, mark nothing.
            outcome = SelfTestOutcome(decision.quant, False, "integrity", exc.message, 0.0)
        else:
            outcome = _test_one(
                store, manifest, selection, decision, ctx, manifest_expected, timeout_s
            )
        outcomes.append(outcome)
        log.log(logging.INFO if outcome.ok else logging.WARNING, "%s", outcome.line())
        if outcome.ok:
            return StartPlan(
                selection=selection,
                decision=decision,
                resolved=resolved,
                config=embedder_config(decision, base_config),
                outcomes=tuple(outcomes),
                tuning=tuned,
            )
        if outcome.kind != "integrity":
            ctx.bad_files.mark_bad(
                decision.file, model, ctx.engine, cpu, outcome.kind, outcome.detail
            )
        selection = selection.without(decision.quant, f"self-test {outcome.kind}: {outcome.detail}")
        if not selection.candidates:
            break
        log.warning(
            "%s",
            kv(event="quant_fallback", failed=decision.quant, using=selection.decision.quant),
        )
    pinned_note = ""
    if pinned and override is not None:
        source = override.sources.get("quant", "override")
        pinned_note = f"; the quant is pinned by {source}: remove it to let edge-agent fall back"
    raise NoUsableModel(
        f"refusing to start: no file of {model} works on this engine and CPU{pinned_note}. "
        + "; ".join(f"{q}: {why}" for q, why in selection.rejected),
        outcomes=[o.line() for o in outcomes],
    )


def _test_one(
    store: ModelStore,
    manifest: ModelManifest,
    selection: Selection,
    decision: Decision,
    ctx: _Context,
    manifest_expected: np.ndarray | None,
    timeout_s: float | None,
) -> SelfTestOutcome:
    cpu = ctx.host.cpu_id
    expected = manifest_expected
    reference_quant = None
    if expected is None:
        reference_quant = _reference_file(manifest, selection, ctx.bad_files.bad(ctx.engine, cpu))
        if reference_quant is not None:
            ref_file = manifest.files[reference_quant]
            cached = ctx.bad_files.reference(ref_file.sha256, ctx.engine, cpu, PROBE_TEXTS)
            if cached is not None:
                expected = np.asarray(cached, dtype=np.float32)
            if reference_quant == decision.quant:
                reference_quant = None  # the candidate is the reference: nothing to compare
    outcome, computed, reference_failure = run_selftest(
        store,
        decision,
        expected=expected,
        reference_quant=reference_quant,
        timeout_s=timeout_s,
    )
    if reference_quant is not None:
        ref_file = manifest.files[reference_quant]
        if computed is not None:
            ctx.bad_files.store_reference(
                ref_file.sha256, ctx.engine, cpu, PROBE_TEXTS, computed.tolist()
            )
        elif reference_failure is not None:
            ctx.bad_files.mark_bad(
                ref_file, manifest.name, ctx.engine, cpu, "crash", reference_failure
            )
    return outcome


# -- the child ----------------------------------------------------------------------------------


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _child(job: dict[str, Any]) -> int:
    from ..embedding.embedder import Embedder

    store = ModelStore(Path(job["store"]))
    config = EmbedderConfig(**job["config"])
    for role, quant in (("candidate", job["quant"]), ("reference", job.get("reference_quant"))):
        if quant is None:
            continue
        try:
            resolved = store.resolve(job["model"], quant, verify=False)
            with Embedder(resolved, config) as embedder:
                vectors = embedder.embed(list(job["texts"])).vectors
        except EdgeAgentError as exc:
            _emit({"event": "error", "role": role, "message": f"{quant}: {exc.message}"})
            return 3
        # One line per file, so the parent knows which of the two a crash belongs to.
        _emit({"event": "vectors", "role": role, "quant": quant, "vectors": vectors.tolist()})
    _emit({"event": "done"})
    return 0


def main() -> int:
    return _child(json.loads(sys.stdin.read()))


if __name__ == "__main__":
    sys.exit(main())
