"""Choose the quant, threads and batch sizes for this host: a pure function with reasons.

``select(host, profiles, manifest, ...)`` takes everything it decides on as arguments (the
probe, the profiles, the model's files, measurements from tuning, files known to crash,
the engine's build info and the free memory) and returns a ``Selection``: the decision, the
ordered fallbacks the start-up self-test walks through, what was rejected and why. Nothing
here touches the engine, the disk or the clock, so every decision can be replayed in a test.

Order of precedence: a user override (flag > env > config file) always wins and is reported;
then measured speed and quality from tuning on this very box; then the profile's static order.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from ..embedding.embedder import DECODER_CONTEXT
from ..errors import (
    InsufficientMemory,
    InvalidArgument,
    ModelNotFound,
    NoUsableModel,
)
from ..hardware.host import HostInfo
from ..models.gguf_meta import GgufInfo
from ..models.manifest import ModelFile, ModelManifest
from .profiles import IndexParams, Profile, match_profile, threads_for

__all__ = [
    "ENGINE_QUIRKS",
    "OVERRIDE_ENV",
    "QUANT_PRECISION",
    "Decision",
    "EngineQuirk",
    "InsufficientMemory",
    "Measurement",
    "MemoryBudget",
    "NoUsableModel",
    "Override",
    "Selection",
    "effective_batch_tokens",
    "estimate_memory",
    "explain",
    "override_from",
    "select",
]

GIB = 1 << 30
MIB = 1 << 20
# Best precision first; quants not listed sort after these, alphabetically.
QUANT_PRECISION = (
    "F32",
    "BF16",
    "F16",
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_K_S",
    "Q5_1",
    "Q5_0",
    "Q4_K_M",
    "Q4_K_S",
    "IQ4_NL",
    "IQ4_XS",
    "Q4_1",
    "Q4_0",
    "Q3_K_L",
    "Q3_K_M",
    "Q3_K_S",
    "Q2_K",
)
# Within this share of the fastest measured quant, the more precise one wins: 5% is below
# the run-to-run noise of a few-second measurement on a busy box.
SPEED_TOLERANCE = 0.05
# llama.cpp's per-sequence output buffer holds a row of logits even in embedding mode. The
# manifest does not record the vocabulary size, so assume a large one (Qwen3's is 151k, BERT's
# 30k: the difference is a few MiB, well inside the headroom).
_VOCAB_GUESS = 65536
_CONTEXT_OVERHEAD = 8 * MIB
# What serving costs besides the file and llama.cpp's buffers (docs/benchmarks.md, measured as
# VmHWM of the daemon + its engine child): all-MiniLM-L6-v2 Q8_0 file + 115 MB at idle (its
# buffers ~14 MB) and Qwen3-Embedding-0.6B Q8_0 file + 218 MB serving (KV cache 31 MB, compute
# 28 MB; file + 191 MB since decoders run 256-token micro-batches and the engine child imports
# llama_cpp's bindings only: the estimate is kept as the upper bound it now is):
# 101 MB at a 30,522-token vocabulary, 158 MB at 151,669 — the Python processes and
# shared libraries, plus llama.cpp's token and merge tables, which grow with the vocabulary.
_PROCESS_BASE = 87_000_000
_PER_VOCAB_ENTRY = 470
# A decoder whose file does not say its shape (no GGUF header read): K and V as wide as the
# model, f16, over the 4B's 36 layers (more than any smaller model has).
_GUESS_LAYERS = 36


# -- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One tuning trial of one model file on this engine build and CPU."""

    sha256: str
    quant: str
    threads: int
    batch_tokens: int
    max_sequences: int
    texts_per_s: float
    cosine_min: float | None = None  # to the best-precision file on the same texts
    cosine_mean: float | None = None
    rss_bytes: int | None = None  # memory the loaded model and its buffers took, measured
    measured_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Measurement:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class EngineQuirk:
    """A known engine bug: on engines whose system info shows ``engine_flag`` and CPUs with
    ``cpu_feature``, the quants matching ``avoid`` (fnmatch-style) are not used."""

    engine_flag: str
    cpu_feature: str
    avoid: tuple[str, ...]
    reason: str


ENGINE_QUIRKS = (
    EngineQuirk(
        engine_flag="AMX_INT8",
        cpu_feature="amx",
        avoid=("Q8_0", "Q*_K", "Q*_K_*"),
        reason="llama.cpp's AMX backend segfaults on Q8_0 and K-quant models (llama.cpp #20824)",
    ),
)

_OVERRIDE_FIELDS = ("quant", "threads", "batch_tokens", "max_sequences", "max_context", "profile")
OVERRIDE_ENV = {name: f"EDGE_AGENT_{name.upper()}" for name in _OVERRIDE_FIELDS}
_INT_LIMITS = {
    "threads": (1, 512),
    "batch_tokens": (32, 8192),
    "max_sequences": (1, 256),
    "max_context": (16, 32768),
}


@dataclass(frozen=True)
class Override:
    """What the user pinned. ``sources`` says where each value came from, for the report."""

    quant: str | None = None
    threads: int | None = None
    batch_tokens: int | None = None
    max_sequences: int | None = None
    max_context: int | None = None
    profile: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (low, high) in _INT_LIMITS.items():
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high
            ):
                where = self.sources.get(name, "override")
                raise InvalidArgument(
                    f"{name} ({where}) must be an integer in [{low}, {high}], got {value!r}"
                )
        for name in ("quant", "profile"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidArgument(f"{name} must be a non-empty string, got {value!r}")

    def given(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in _OVERRIDE_FIELDS if getattr(self, n) is not None}

    def describe(self, name: str) -> str:
        return f"{name}={getattr(self, name)} ({self.sources.get(name, 'override')})"


def _parse_override_value(name: str, value: Any, where: str) -> Any:
    if name in _INT_LIMITS and isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise InvalidArgument(f"{where}: {name} must be an integer, got {value!r}") from None
    return value


def override_from(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
    config_name: str = "config file",
) -> Override:
    """Merge the three override sources, flag over environment over config file.

    ``flags``: parsed command-line values (None = not given); ``environ``: the environment
    (``EDGE_AGENT_QUANT``, ``EDGE_AGENT_THREADS``, ``EDGE_AGENT_BATCH_TOKENS``,
    ``EDGE_AGENT_MAX_SEQUENCES``, ``EDGE_AGENT_MAX_CONTEXT``, ``EDGE_AGENT_PROFILE``);
    ``config``: the config file's table with the same keys as ``flags``.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers: list[tuple[Mapping[str, Any], Any]] = [
        (config or {}, lambda n: config_name),
        (
            {n: (environ or {}).get(env) for n, env in OVERRIDE_ENV.items()},
            lambda n: f"env {OVERRIDE_ENV[n]}",
        ),
        (flags or {}, lambda n: f"flag --{n.replace('_', '-')}"),
    ]
    for layer, where in layers:
        unknown = sorted(set(layer) - set(_OVERRIDE_FIELDS))
        if unknown and layer is config:
            raise InvalidArgument(f"{config_name}: unknown setting(s) {', '.join(unknown)}")
        for name in _OVERRIDE_FIELDS:
            value = layer.get(name)
            if value is None or value == "":
                continue
            values[name] = _parse_override_value(name, value, where(name))
            sources[name] = where(name)
    return Override(**values, sources=sources)


# -- outputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBudget:
    budget: int | None  # bytes a model may take; None = unknown, no guard
    basis: str  # how it was computed


@dataclass(frozen=True)
class Decision:
    """Everything needed to open the embedder on one file."""

    model: str
    quant: str
    file: ModelFile
    threads: int
    batch_tokens: int
    max_sequences: int
    max_context: int
    flash_attention: bool | None
    mlock: bool
    index: IndexParams
    memory_needed: int
    basis: str  # "override", "measured" or "profile"
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        return (
            f"{self.quant}: {self.threads} thread{'s' if self.threads != 1 else ''},"
            f" batch {self.batch_tokens} tokens x {self.max_sequences} sequences,"
            f" context {self.max_context}, needs {_size(self.memory_needed)}"
            f" [{self.basis}{': ' if self.notes else ''}{'; '.join(self.notes)}]"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "quant": self.quant,
            "file": self.file.path,
            "sha256": self.file.sha256,
            "size": self.file.size,
            "threads": self.threads,
            "batch_tokens": self.batch_tokens,
            "max_sequences": self.max_sequences,
            "max_context": self.max_context,
            "flash_attention": self.flash_attention,
            "mlock": self.mlock,
            "index": {
                "m": self.index.m,
                "ef_construction": self.index.ef_construction,
                "ef_search": self.index.ef_search,
            },
            "memory_needed": self.memory_needed,
            "basis": self.basis,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Selection:
    model: str
    profile: Profile
    candidates: tuple[Decision, ...]  # best first; the self-test falls back in this order
    rejected: tuple[tuple[str, str], ...]  # (quant, why)
    reasons: tuple[str, ...]
    budget: MemoryBudget
    override: Override | None = None

    @property
    def decision(self) -> Decision:
        return self.candidates[0]

    def without(self, quant: str, why: str) -> Selection:
        """This selection after ``quant`` failed (its self-test): the next candidate leads."""
        return replace(
            self,
            candidates=tuple(c for c in self.candidates if c.quant != quant),
            rejected=(*self.rejected, (quant, why)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "profile": self.profile.name,
            "decision": self.decision.to_json() if self.candidates else None,
            "fallbacks": [c.to_json() for c in self.candidates[1:]],
            "rejected": [{"quant": q, "why": why} for q, why in self.rejected],
            "reasons": list(self.reasons),
            "memory_budget": self.budget.budget,
            "memory_basis": self.budget.basis,
            "overrides": dict(self.override.sources) if self.override else {},
        }


# -- rules --------------------------------------------------------------------------------------


def _size(value: int | None) -> str:
    if value is None:
        return "unknown"
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.0f} MiB"


def effective_batch_tokens(
    batch_tokens: int,
    max_sequences: int,
    model_max_tokens: int,
    max_context: int,
    decoder: bool = False,
) -> int:
    """The batch the embedder really allocates (see Embedder.__init__): at least one whole
    sequence of the longest allowed length (a decoder's: at most max(batch, DECODER_CONTEXT)),
    rounded up to a multiple of ``max_sequences``."""
    longest = min(model_max_tokens, max_context)
    if decoder:
        longest = min(longest, max(batch_tokens, DECODER_CONTEXT))
    tokens = max(batch_tokens, longest)
    return -(-tokens // max_sequences) * max_sequences


def estimate_memory(
    file_size: int,
    dims: int,
    batch_tokens: int,
    max_sequences: int,
    flash_attention: bool | None,
    *,
    decoder: bool = False,
    shape: GgufInfo | None = None,
) -> int:
    """Bytes serving the model takes: the mapped file, llama.cpp's buffers, a decoder's KV cache
    for ``batch_tokens`` (its context: Embedder.__init__) and the processes' own overhead.

    Calibrated on llama.cpp's own "compute buffer size" log lines for all-MiniLM-L6-v2
    (5.9 MiB at 512 tokens with flash attention, 17.6 MiB without, 29.5 MiB at 2048) and
    rounded up: activations ~12 floats per token and dimension, the attention matrix
    (tokens^2 per head, head size >= 32) when flash attention is off, one logits row per
    sequence.
    """
    activations = batch_tokens * dims * 4 * 12
    heads = max(1, dims // 32)
    attention = 0 if flash_attention else batch_tokens * batch_tokens * heads * 4
    vocab = shape.vocab_size if shape is not None and shape.vocab_size else _VOCAB_GUESS
    process = _PROCESS_BASE + vocab * _PER_VOCAB_ENTRY
    if not decoder:
        outputs = max_sequences * (vocab + dims) * 4
        return file_size + activations + attention + outputs + _CONTEXT_OVERHEAD + process
    # Our patched engine reserves no logits for pooled embeddings (packaging/patches/).
    outputs = max_sequences * dims * 4
    kv = batch_tokens * kv_bytes_per_token(dims, flash_attention, shape)
    return file_size + activations + attention + outputs + kv + _CONTEXT_OVERHEAD + process


def kv_bytes_per_token(dims: int, flash_attention: bool | None, shape: GgufInfo | None) -> int:
    """A decoder's KV cache per token of context: layers x KV heads x (key + value width), as
    q8_0 (34 bytes per 32 values) when the engine uses it (flash attention, head widths in 32s:
    embedding/engine.py), else f16."""
    if shape is None or not (shape.layers and shape.kv_heads and shape.key_length):
        return _GUESS_LAYERS * 2 * dims * 2
    value = shape.value_length or shape.key_length
    width = shape.kv_heads * (shape.key_length + value)
    if flash_attention is not False and shape.key_length % 32 == 0 and value % 32 == 0:
        return -(-shape.layers * width * 34 // 32)
    return shape.layers * width * 2


def _budget(host: HostInfo, profile: Profile, available: int | None) -> MemoryBudget:
    headroom = profile.memory_headroom
    parts: list[str] = []
    if available is not None:
        free, what = available, f"free memory {_size(available)} (given)"
    elif host.mem_available is not None:
        free, what = host.mem_available, f"available RAM {_size(host.mem_available)}"
    elif host.mem_total is not None:
        # macOS: no honest "available" figure; half of RAM is what a desktop can spare.
        free, what = host.mem_total // 2, f"half of {_size(host.mem_total)} RAM (available unknown)"
    else:
        free, what = None, ""
    limit = host.cgroup.memory_limit
    if limit is not None and (free is None or limit < free):
        free, what = limit, f"cgroup memory limit {_size(limit)}"
    if free is None:
        return MemoryBudget(None, "memory unknown: no memory guard")
    parts.append(what)
    parts.append(f"headroom {_size(headroom)} (profile {profile.name})")
    budget = max(0, free - headroom)
    return MemoryBudget(budget, f"{_size(budget)} = {' - '.join(parts)}")


def _engine_flags(engine_info: str | None) -> set[str]:
    """``"CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 |"`` -> {"SSE3", "AVX2", "AMX_INT8"}."""
    return {m.group(1) for m in re.finditer(r"([A-Z0-9_]+) = 1", engine_info or "")}


def _matches(quant: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(quant, p) for p in patterns)


def _precision_rank(quant: str) -> tuple[int, str]:
    return (
        QUANT_PRECISION.index(quant) if quant in QUANT_PRECISION else len(QUANT_PRECISION),
        quant,
    )


def _quality(m: Measurement) -> float:
    return m.cosine_mean if m.cosine_mean is not None else 0.0


def select(
    host: HostInfo,
    profiles: Sequence[Profile],
    manifest: ModelManifest,
    *,
    override: Override | None = None,
    measurements: Sequence[Measurement] = (),
    bad: Mapping[str, str] | None = None,
    engine_info: str | None = None,
    available_memory: int | None = None,
    prefer: tuple[str, str] | None = None,
    shapes: Mapping[str, GgufInfo] | None = None,
) -> Selection:
    """Decide which of ``manifest``'s files to run on ``host``, and how.

    ``prefer``: (quant, why) to move to the front when it is usable (e.g. the file existing
    collections were embedded with); unlike an override, the others stay as fallbacks.

    ``measurements``: tuning results for this engine build and CPU (any model; matched by
    sha256). ``bad``: sha256 -> why, for files that failed their self-test on this engine
    and CPU. ``engine_info``: llama_print_system_info(), for known engine bugs.
    ``available_memory``: free bytes, instead of the probe's MemAvailable.
    ``shapes``: quant -> the file's GGUF header (ModelStore.shapes), for the memory estimate
    (a decoder's KV cache, the vocabulary); without it the estimate assumes a large model.

    Raises InsufficientMemory when nothing fits, NoUsableModel when everything else was
    rejected, ModelNotFound for an overridden quant the model does not have.
    """
    override = override or Override()
    bad = bad or {}
    matched = match_profile(host, profiles, override.profile)
    profile = matched.profile
    reasons: list[str] = list(matched.reasons)
    if override.sources:
        reasons.append("overrides: " + ", ".join(override.describe(n) for n in override.given()))
    rule_threads, thread_reasons = threads_for(host, profile.threads)
    reasons.append(f"threads rule ({profile.threads.base}): {'; '.join(thread_reasons)}")
    budget = _budget(host, profile, available_memory)
    reasons.append(f"memory budget {budget.basis}")

    by_sha: dict[str, list[Measurement]] = {}
    for m in measurements:
        by_sha.setdefault(m.sha256, []).append(m)
    engine = _engine_flags(engine_info)
    rejected: list[tuple[str, str]] = []
    measured: list[tuple[Decision, Measurement]] = []
    unmeasured: list[Decision] = []
    too_big: list[Decision] = []
    low_quality: list[tuple[Decision, Measurement]] = []
    for quant in _candidate_order(manifest, profile, override, reasons):
        file = manifest.files[quant]
        refusal, warning = _known_problem(quant, file, host, bad, engine)
        if refusal is not None and override.quant is None:
            rejected.append((quant, refusal))
            continue
        best = max(by_sha.get(file.sha256, ()), key=lambda m: m.texts_per_s, default=None)
        decision = _decide(
            quant,
            manifest,
            profile,
            host,
            rule_threads,
            override,
            best,
            warning,
            (shapes or {}).get(quant),
        )
        if budget.budget is not None and decision.memory_needed > budget.budget:
            too_big.append(decision)
            rejected.append(
                (
                    quant,
                    f"needs {_size(decision.memory_needed)}, over the budget of"
                    f" {_size(budget.budget)}",
                )
            )
        elif (
            best is not None
            and best.cosine_min is not None
            and (best.cosine_min < profile.min_cosine)
        ):
            low_quality.append((decision, best))
        elif best is not None:
            measured.append((decision, best))
        else:
            unmeasured.append(decision)

    if override.quant is not None and too_big:
        d = too_big[0]
        raise InsufficientMemory(
            f"{manifest.name} {d.quant} needs {_size(d.memory_needed)} (file {_size(d.file.size)}"
            f" + buffers) but the memory budget is {budget.basis}; requested by"
            f" {override.sources.get('quant', 'override')}",
            needed=d.memory_needed,
            budget=budget.budget,
        )
    ordered = _order_measured(measured, reasons) + unmeasured
    for decision, m in low_quality:
        floor = f"measured cosine {m.cosine_min:.4f} below the profile's floor {profile.min_cosine}"
        ordered.append(replace(decision, notes=(*decision.notes, floor + "; last resort")))
    if prefer is not None and override.quant is None:
        quant, why = prefer
        chosen = [d for d in ordered if d.quant == quant]
        if chosen:
            ordered = chosen + [d for d in ordered if d.quant != quant]
            reasons.append(f"preferred {quant}: {why}")
        else:
            reasons.append(f"cannot prefer {quant} ({why}): it is not usable here")
    if not ordered:
        _refuse(manifest, budget, too_big, rejected)
    return Selection(
        model=manifest.name,
        profile=profile,
        candidates=tuple(ordered),
        rejected=tuple(rejected),
        reasons=tuple(reasons),
        budget=budget,
        override=override if override.sources else None,
    )


def _candidate_order(
    manifest: ModelManifest, profile: Profile, override: Override, reasons: list[str]
) -> list[str]:
    """The overridden quant alone; else the profile's order, then the model's other files."""
    if override.quant is not None:
        if override.quant not in manifest.files:
            raise ModelNotFound(
                f"model {manifest.name!r} has no {override.quant} file"
                f" (has: {', '.join(manifest.files)}); requested by"
                f" {override.sources.get('quant', 'override')}",
                model=manifest.name,
                quant=override.quant,
            )
        return [override.quant]
    order = [q for q in profile.quants if q in manifest.files]
    extra = sorted((q for q in manifest.files if q not in order), key=_precision_rank)
    if extra:
        reasons.append(f"not in the profile's list, tried last: {', '.join(extra)}")
    return order + extra


def _known_problem(
    quant: str, file: ModelFile, host: HostInfo, bad: Mapping[str, str], engine: set[str]
) -> tuple[str | None, str | None]:
    """(why the file is not used, the note when an override uses it anyway)."""
    if file.sha256 in bad:
        return (
            f"failed its self-test on this engine and CPU: {bad[file.sha256]}",
            f"failed its self-test before ({bad[file.sha256]}); retried: overridden",
        )
    for quirk in ENGINE_QUIRKS:
        if (
            quirk.engine_flag in engine
            and quirk.cpu_feature in host.features
            and _matches(quant, quirk.avoid)
        ):
            return (
                f"engine reports {quirk.engine_flag}: {quirk.reason}",
                f"risky here ({quirk.reason}); used because overridden",
            )
    return None, None


def _decide(
    quant: str,
    manifest: ModelManifest,
    profile: Profile,
    host: HostInfo,
    rule_threads: int,
    override: Override,
    best: Measurement | None,
    warning: str | None,
    shape: GgufInfo | None = None,
) -> Decision:
    """The settings for one file: override, else the best measurement, else the profile."""
    notes = [warning] if warning else []
    threads, batch, sequences = rule_threads, profile.batch_tokens, profile.max_sequences
    basis = "profile"
    cpu_cap = host.cpu_limit
    if best is not None:
        threads, batch, sequences = best.threads, best.batch_tokens, best.max_sequences
        basis = "measured"
        quality = f", cosine {best.cosine_min:.4f}" if best.cosine_min is not None else ""
        notes.append(f"{best.texts_per_s:.0f} texts/s{quality} at {best.threads} threads")
        if cpu_cap is not None and threads > cpu_cap:
            # Measured before the container got its quota: the quota rules now.
            notes.append(f"threads {threads} capped at {cpu_cap} usable CPUs")
            threads = cpu_cap
    # The embedder never feeds more than the model's own context: report what it will use.
    max_context = min(profile.max_context, manifest.max_tokens)
    if override.given().keys() - {"profile"}:
        basis = "override"
    if override.threads is not None:
        threads = override.threads
        if cpu_cap is not None and threads > cpu_cap:
            notes.append(f"threads {threads} exceed the {cpu_cap} usable CPUs (override)")
    batch = override.batch_tokens or batch
    sequences = override.max_sequences or sequences
    max_context = override.max_context or max_context
    decoder = manifest.pooling == "last"
    if decoder:
        # What the embedder will use (Embedder.__init__), not the profile's or the model's.
        max_context = min(max_context, max(batch, DECODER_CONTEXT))
    allocated = effective_batch_tokens(batch, sequences, manifest.max_tokens, max_context, decoder)
    file = manifest.files[quant]
    need = estimate_memory(
        file.size,
        manifest.dims,
        allocated,
        sequences,
        profile.flash_attention,
        decoder=decoder,
        shape=shape,
    )
    if best is not None and best.rss_bytes and best.rss_bytes > need:
        need = best.rss_bytes
        notes.append("memory as measured")
    return Decision(
        model=manifest.name,
        quant=quant,
        file=file,
        threads=threads,
        batch_tokens=batch,
        max_sequences=sequences,
        max_context=max_context,
        flash_attention=profile.flash_attention,
        mlock=profile.mlock,
        index=profile.index,
        memory_needed=need,
        basis=basis,
        notes=tuple(notes),
    )


def _refuse(
    manifest: ModelManifest,
    budget: MemoryBudget,
    too_big: list[Decision],
    rejected: list[tuple[str, str]],
) -> NoReturn:
    if too_big:
        smallest = min(too_big, key=lambda d: d.memory_needed)
        raise InsufficientMemory(
            f"no file of {manifest.name} fits in memory: the smallest, {smallest.quant},"
            f" needs {_size(smallest.memory_needed)} (file {_size(smallest.file.size)} +"
            f" buffers) but the memory budget is {budget.basis}. Free"
            f" {_size(smallest.memory_needed - (budget.budget or 0))} more, raise the"
            " container's memory limit, or use a smaller model",
            needed=smallest.memory_needed,
            budget=budget.budget,
            rejected=rejected,
        )
    raise NoUsableModel(
        f"no usable file of {manifest.name}: " + "; ".join(f"{q}: {why}" for q, why in rejected),
        rejected=rejected,
    )


def _order_measured(
    measured: list[tuple[Decision, Measurement]], reasons: list[str]
) -> list[Decision]:
    """Fastest first; within SPEED_TOLERANCE of the fastest, the best measured quality."""
    if not measured:
        return []
    by_speed = sorted(measured, key=lambda item: -item[1].texts_per_s)
    fastest = by_speed[0][1].texts_per_s
    near = [item for item in by_speed if item[1].texts_per_s >= fastest * (1 - SPEED_TOLERANCE)]
    lead = max(near, key=lambda item: _quality(item[1]))
    if lead is not by_speed[0]:
        reasons.append(
            f"{lead[0].quant} is within {SPEED_TOLERANCE:.0%} of the fastest"
            f" ({by_speed[0][0].quant}) and more precise"
        )
    return [lead[0]] + [d for d, _ in by_speed if d is not lead[0]]


def explain(selection: Selection) -> str:
    """The human report behind ``edge-agent probe --explain``."""
    lines = [f"model     {selection.model}", f"profile   {selection.profile.name}"]
    lines += [f"  because {reason}" for reason in selection.reasons]
    if selection.candidates:
        lines.append(f"choice    {selection.decision.summary()}")
        for decision in selection.candidates[1:]:
            lines.append(f"fallback  {decision.summary()}")
    for quant, why in selection.rejected:
        lines.append(f"rejected  {quant}: {why}")
    index = selection.profile.index
    lines.append(
        f"index     hnsw m={index.m} ef_construction={index.ef_construction}"
        f" ef_search={index.ef_search};"
        f" mlock={'on' if selection.profile.mlock else 'off'}"
    )
    return "\n".join(lines)
