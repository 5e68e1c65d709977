"""The embedder: one llama.cpp context, owned by one thread, fed in length-sorted batches.

``Embedder.embed`` may be called from any thread; the work runs on the model's own thread,
so llama.cpp never sees two threads. Input is validated on the caller's thread first, so bad
input fails fast with a typed error and never reaches the engine.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np

from ..errors import (
    DimensionsNotSupported,
    EmptyText,
    EngineError,
    InvalidArgument,
    TextTooLong,
)
from ..hardware.load import ThreadGovernor
from ..logs import kv
from ..models.manifest import ModelManifest
from ..models.store import ModelStore, ResolvedModel
from ..texts import check_text

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Embedder", "EmbedderConfig", "Embeddings", "ModelHandle"]

log = logging.getLogger("edge_agent.embedder")

Kind = Literal["document", "query"]
LongText = Literal["truncate", "chunk", "error"]
KINDS = ("document", "query")
LONG_TEXT_MODES = ("truncate", "chunk", "error")
POOLING_LAST = 3
_PLACEHOLDER = re.compile(r"\{(task|text)\}")


def _placeholder(values: dict[str, str], match: re.Match[str]) -> str:
    return values[match.group(1)]


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# A decoder (last-token pooling: Qwen3-Embedding, 32k training context) gets a KV cache and
# compute buffers sized for its longest sequence (hundreds of MB at 8192 tokens), so its longest
# sequence is at most max(batch_tokens, this), whatever max_sequence_tokens says; longer texts
# follow long_text. Raise batch_tokens for longer decoder contexts.
DECODER_CONTEXT = 512


@dataclass(frozen=True)
class EmbedderConfig:
    """Engine tuning and input limits. Every limit is enforced with a typed error."""

    threads: int | None = None  # None: every CPU this process may use
    # Tokens per llama.cpp batch (n_batch == n_ubatch == n_ctx). BERT attention spans the whole
    # batch, so cost grows with its square: a few hundred tokens is the sweet spot (see
    # docs/benchmarks.md). Raised to the model's max_tokens if smaller.
    batch_tokens: int = 512
    max_sequences: int = 64  # sequences packed into one batch (llama.cpp allows up to 256)
    # Longest sequence fed to the model: long-context models (Qwen3-Embedding: 32k) would
    # otherwise get a 32k-token context with a multi-GiB compute buffer. Longer texts follow
    # long_text (truncate / chunk / error).
    max_sequence_tokens: int = 8192
    flash_attention: bool | None = True
    # One text of at most this many tokens (the common single query) runs in a second, small
    # context without flash attention: 10-15% faster for it, while packed batches keep flash
    # attention (docs/benchmarks.md). 0 turns the second context off (saves its few MB).
    solo_tokens: int = 256
    chunk_overlap: int = 32  # tokens shared by consecutive chunks with long_text="chunk"
    max_texts: int = 4096  # texts per embed() call
    max_text_bytes: int = 1 << 20  # UTF-8 bytes per text (1 MiB)
    use_mmap: bool = True
    # Lock the weights in RAM (profiles turn it on where swapping to an SD card would stall).
    use_mlock: bool = False
    # Run with fewer threads while other processes keep the cores busy: llama.cpp's threads
    # spin at barriers for descheduled peers, which turns a 3 ms text into ~900 ms under
    # contention (hardware/load.py; docs/benchmarks.md "CPU contention").
    adaptive_threads: bool = True

    def __post_init__(self) -> None:
        for name, low, high in (
            ("batch_tokens", 32, 8192),
            ("solo_tokens", 0, 8192),
            ("max_sequences", 1, 256),
            ("max_sequence_tokens", 16, 32768),
            ("chunk_overlap", 0, 4096),
            ("max_texts", 1, 1_000_000),
            ("max_text_bytes", 1, 1 << 30),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InvalidArgument(
                    f"{name} must be an integer in [{low}, {high}], got {value!r}"
                )
        if self.threads is not None and (
            not isinstance(self.threads, int)
            or isinstance(self.threads, bool)
            or not 1 <= self.threads <= 512
        ):
            raise InvalidArgument(f"threads must be an integer in [1, 512], got {self.threads!r}")


@dataclass(frozen=True)
class Embeddings:
    """Float32, L2-normalised vectors, one row per input text, in input order."""

    vectors: np.ndarray  # (n, dims) float32
    token_counts: list[int]  # tokens of each (templated) text including special tokens
    truncated: list[bool]  # True where long_text="truncate" cut the text
    chunks: list[int]  # sequences embedded per text (>1 only with long_text="chunk")
    model: str
    quant: str


@dataclass(frozen=True)
class _Prepared:
    sequences: list[list[int]]  # one per chunk
    token_count: int
    truncated: bool


def _normalize(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    return (rows / norms).astype(np.float32, copy=False)


class ModelHandle:
    """What every embedder offers besides ``embed``: opening by name, the model's identity,
    and ``with`` support. Shared by the in-process Embedder and the ProcessEmbedder."""

    manifest: ModelManifest

    def __init__(self, resolved: ResolvedModel, config: EmbedderConfig | None = None) -> None:
        raise NotImplementedError

    @classmethod
    def open(
        cls,
        store: ModelStore,
        name: str,
        quant: str | None = None,
        config: EmbedderConfig | None = None,
    ) -> Self:
        return cls(store.resolve(name, quant), config)

    @property
    def dims(self) -> int:
        return self.manifest.dims

    @property
    def model_name(self) -> str:
        return self.manifest.name

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def embed(
        self,
        texts: Sequence[str],
        kind: Kind = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        long_text: LongText = "truncate",
    ) -> Embeddings:
        raise NotImplementedError

    def submit(
        self,
        texts: Sequence[str],
        kind: Kind = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        long_text: LongText = "truncate",
    ) -> asyncio.Future[Embeddings]:
        """Start ``embed`` from an event loop; the future holds the Embeddings or the error."""
        raise NotImplementedError


class _CallerThread:
    """The executor interface, running each call at once on the thread that made it.

    For a process whose thread does nothing but embed (the worker child): handing each call
    to a model thread would cost two thread switches per request for nothing. Calls from any
    other thread are refused, so llama.cpp still only ever sees one thread.
    """

    def __init__(self) -> None:
        self._owner = threading.get_ident()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        if threading.get_ident() != self._owner:
            raise RuntimeError("this Embedder runs on the thread that created it only")
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # delivered through the future, as an executor would
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


class Embedder(ModelHandle):
    def __init__(
        self,
        resolved: ResolvedModel,
        config: EmbedderConfig | None = None,
        *,
        on_caller_thread: bool = False,
    ) -> None:
        """``on_caller_thread``: run llama.cpp on the constructing thread (which must then make
        every call) instead of a model thread of its own; see _CallerThread."""
        self.config = config or EmbedderConfig()
        self.manifest: ModelManifest = resolved.manifest
        self.quant = resolved.quant
        self.path = resolved.path
        self.threads = self.config.threads or available_cpus()
        longest = min(self.manifest.max_tokens, self.config.max_sequence_tokens)
        if self.manifest.pooling == "last":
            longest = min(longest, max(self.config.batch_tokens, DECODER_CONTEXT))
        batch_tokens = max(self.config.batch_tokens, longest)
        # llama.cpp reserves its graph with batch_tokens / max_sequences tokens per sequence and
        # aborts (GGML_ASSERT in mul_mat) when that division is not exact: round up.
        sequences = self.config.max_sequences
        batch_tokens = -(-batch_tokens // sequences) * sequences
        # Thread-owned: every llama.cpp call happens on this single worker thread.
        self._executor: ThreadPoolExecutor | _CallerThread = (
            _CallerThread()
            if on_caller_thread
            else ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-agent-model")
        )
        self._closed = threading.Event()
        self._governor: ThreadGovernor | None = None
        # llama.cpp loads here, not on import: the daemon imports this module for its
        # configuration types and runs the engine in a child process.
        from .engine import Engine, EngineSettings

        settings = EngineSettings(
            threads=self.threads,
            batch_tokens=batch_tokens,
            max_sequences=self.config.max_sequences,
            flash_attention=self.config.flash_attention,
            use_mmap=self.config.use_mmap,
            use_mlock=self.config.use_mlock,
            solo_tokens=self.config.solo_tokens,
        )
        try:
            self._engine: Engine = self._executor.submit(Engine, self.path, settings).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        engine = self._engine
        if engine.dims != self.manifest.dims:
            self.close()
            raise InvalidArgument(
                f"{self.path} has {engine.dims} dims but the manifest says {self.manifest.dims}"
            )
        self.pooling = engine.pooling
        self._prefix = [engine.bos] if engine.add_bos and engine.bos >= 0 else []
        if engine.add_sep and engine.sep >= 0:
            self._suffix = [engine.sep]
        elif engine.add_eos and engine.eos >= 0:
            self._suffix = [engine.eos]
        else:
            self._suffix = []
        if self.pooling == POOLING_LAST and not self._suffix:
            # Last-token pooling reads the state at the end-of-text token: it must be there.
            if engine.eos < 0:
                self.close()
                raise InvalidArgument(f"{self.path}: last-token pooling but no EOS token")
            self._suffix = [engine.eos]
        self.max_tokens = min(self.manifest.max_tokens, engine.context_length, batch_tokens)
        self._window = self.max_tokens - len(self._prefix) - len(self._suffix)
        if self._window < 1:
            self.close()
            raise InvalidArgument(
                f"{self.path}: max_tokens {self.max_tokens} leaves no room for text"
            )
        self._overlap = min(self.config.chunk_overlap, self._window // 2)
        if self.config.adaptive_threads and self.threads > 1:
            self._governor = ThreadGovernor(self.threads, available_cpus()).start()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._governor is not None:
            self._governor.stop()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            self._executor.submit(engine.close).result()
        self._executor.shutdown(wait=True)

    # -- input validation (caller's thread) -------------------------------------------------

    def _format(self, texts: Sequence[str], kind: str, instruction: str | None) -> list[str]:
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise InvalidArgument("texts must be a list of strings")
        if len(texts) == 0:
            raise InvalidArgument("texts must not be empty")
        if len(texts) > self.config.max_texts:
            raise InvalidArgument(
                f"{len(texts)} texts in one call; the limit is {self.config.max_texts}",
                limit=self.config.max_texts,
            )
        if kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {KINDS}, got {kind!r}")
        template = (
            self.manifest.query_template if kind == "query" else self.manifest.document_template
        )
        task = None
        if instruction is not None:
            if not isinstance(instruction, str) or not instruction.strip():
                raise InvalidArgument("instruction must be a non-empty string")
            if not template or "{task}" not in template:
                raise InvalidArgument(
                    f"model {self.manifest.name!r} takes no instruction for {kind} texts"
                )
            task = instruction
        elif template and "{task}" in template:
            task = self.manifest.default_task or ""
        formatted: list[str] = []
        for index, text in enumerate(texts):
            check_text(index, text)
            if len(text.encode("utf-8", errors="surrogatepass")) > self.config.max_text_bytes:
                raise TextTooLong(
                    f"texts[{index}] is over {self.config.max_text_bytes} bytes",
                    index=index,
                    limit=self.config.max_text_bytes,
                )
            if template:
                # One pass, so a "{text}" inside the instruction (or "{task}" in the text) stays
                # literal instead of being substituted again.
                values = {"task": task or "", "text": text}
                text = _PLACEHOLDER.sub(functools.partial(_placeholder, values), template)
            formatted.append(text)
        return formatted

    def _check_dimensions(self, dimensions: int | None) -> int:
        if dimensions is None:
            return self.dims
        if not isinstance(dimensions, int) or isinstance(dimensions, bool):
            raise InvalidArgument(f"dimensions must be an integer, got {dimensions!r}")
        if dimensions == self.dims:
            return dimensions
        if dimensions not in self.manifest.matryoshka_dims:
            allowed = ", ".join(map(str, self.manifest.matryoshka_dims)) or "none"
            raise DimensionsNotSupported(
                f"model {self.manifest.name!r} cannot shorten vectors to {dimensions}"
                f" (supported: {allowed}; full size {self.dims})",
                allowed=list(self.manifest.matryoshka_dims),
            )
        return dimensions

    # -- the work (model thread) -------------------------------------------------------------

    def embed(
        self,
        texts: Sequence[str],
        kind: Kind = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        long_text: LongText = "truncate",
    ) -> Embeddings:
        return self._start(texts, kind, instruction, dimensions, long_text).result()

    def submit(
        self,
        texts: Sequence[str],
        kind: Kind = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        long_text: LongText = "truncate",
    ) -> asyncio.Future[Embeddings]:
        """``embed`` for an event loop: validates here (bad input raises at once), then the
        model thread's work is awaited through the returned future, with no executor thread in
        between."""
        return asyncio.wrap_future(self._start(texts, kind, instruction, dimensions, long_text))

    def _start(
        self,
        texts: Sequence[str],
        kind: str,
        instruction: str | None,
        dimensions: int | None,
        long_text: str,
    ) -> Future[Embeddings]:
        """Validate on the caller's thread, then queue the work on the model thread."""
        if self._closed.is_set():
            raise EngineError("embedder is closed")
        formatted = self._format(texts, kind, instruction)
        out_dims = self._check_dimensions(dimensions)
        if long_text not in LONG_TEXT_MODES:
            raise InvalidArgument(f"long_text must be one of {LONG_TEXT_MODES}, got {long_text!r}")
        return self._executor.submit(self._embed_on_model_thread, formatted, long_text, out_dims)

    def _prepare(self, index: int, text: str, long_text: str) -> _Prepared:
        content = self._engine.tokenize(text, add_special=False)
        if not content:
            raise EmptyText(f"texts[{index}] has no tokens", index=index)
        token_count = len(content) + len(self._prefix) + len(self._suffix)
        window = self._window
        if len(content) <= window:
            return _Prepared([self._prefix + content + self._suffix], token_count, False)
        if long_text == "error":
            raise TextTooLong(
                f"texts[{index}] has {token_count} tokens; the model takes {self.max_tokens}",
                index=index,
                tokens=token_count,
                limit=self.max_tokens,
            )
        if long_text == "truncate":
            return _Prepared([self._prefix + content[:window] + self._suffix], token_count, True)
        stride = window - self._overlap
        sequences = []
        start = 0
        while True:
            sequences.append(self._prefix + content[start : start + window] + self._suffix)
            if start + window >= len(content):
                break
            start += stride
        return _Prepared(sequences, token_count, False)

    def _embed_on_model_thread(self, texts: list[str], long_text: str, out_dims: int) -> Embeddings:
        if self._governor is not None:
            threads = self._governor.threads()
            if threads != self._engine.threads:
                log.debug(
                    "%s",
                    kv(
                        event="engine_threads",
                        before=self._engine.threads,
                        after=threads,
                        others_cpus=self._governor.others,
                    ),
                )
                self._engine.set_threads(threads)
        prepared = [self._prepare(i, text, long_text) for i, text in enumerate(texts)]
        flat: list[list[int]] = []
        owner: list[int] = []
        for text_index, item in enumerate(prepared):
            flat.extend(item.sequences)
            owner.extend([text_index] * len(item.sequences))
        vectors = self._run_batches(flat)
        chunk_counts = [len(item.sequences) for item in prepared]
        if len(flat) == len(texts):
            pooled = vectors
        else:
            # Chunked texts: the mean of the normalised chunk vectors.
            pooled = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
            np.add.at(pooled, np.asarray(owner), _normalize(vectors))
            pooled /= np.asarray(chunk_counts, dtype=np.float32)[:, None]
        if out_dims != pooled.shape[1]:
            pooled = pooled[:, :out_dims]
        return Embeddings(
            vectors=_normalize(pooled),
            token_counts=[item.token_count for item in prepared],
            truncated=[item.truncated for item in prepared],
            chunks=chunk_counts,
            model=self.manifest.name,
            quant=self.quant,
        )

    def _run_batches(self, sequences: list[list[int]]) -> np.ndarray:
        """Longest first, greedily packed into batches of at most batch_tokens / max_sequences."""
        settings = self._engine.settings
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
        out = np.empty((len(sequences), self._engine.dims), dtype=np.float32)
        batch: list[int] = []
        batch_tokens = 0
        for index in order:
            length = len(sequences[index])
            if batch and (
                batch_tokens + length > settings.batch_tokens
                or len(batch) >= settings.max_sequences
            ):
                out[batch] = self._engine.embed_batch([sequences[i] for i in batch])
                batch, batch_tokens = [], 0
            batch.append(index)
            batch_tokens += length
        if batch:
            out[batch] = self._engine.embed_batch([sequences[i] for i in batch])
        return out
