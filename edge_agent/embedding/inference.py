"""The engine side of embedding, without numpy: validate, tokenise, chunk, batch, run.

``Inference`` owns one llama.cpp ``Engine`` and is used by one thread: the in-process
``Embedder``'s model thread, or the engine child's main thread (embedding/child.py). It returns
``RawEmbeddings``: the engine's pooled float32 rows as bytes, one per chunk. Pooling chunks,
shortening (Matryoshka) and normalising happen where numpy already is (embedder.finish): in the
daemon, not in the child, whose RSS numpy would grow by ~15 MB (docs/benchmarks.md, "Serving
RSS against llama-server").
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..errors import (
    DimensionsNotSupported,
    EmptyText,
    EngineError,
    InvalidArgument,
    TextTooLong,
)
from ..hardware.load import ThreadGovernor
from ..logs import kv
from ..texts import check_text

if TYPE_CHECKING:
    from ..models.manifest import ModelManifest

__all__ = [
    "DECODER_CONTEXT",
    "EmbedderConfig",
    "Inference",
    "RawEmbeddings",
    "Request",
    "available_cpus",
]

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
class Request:
    """Validated arguments of one embed call."""

    texts: list[str]  # templated (instructions applied)
    long_text: str
    out_dims: int


@dataclass(frozen=True)
class RawEmbeddings:
    """The engine's output for one call: ``rows`` holds one float32 vector of ``dims`` per
    chunk (texts in order, each text's chunks in order; ``chunks`` says how many), pooled by the
    model but not normalised or shortened."""

    rows: bytes
    dims: int
    out_dims: int
    token_counts: list[int]
    truncated: list[bool]
    chunks: list[int]
    model: str
    quant: str


@dataclass(frozen=True)
class _Prepared:
    sequences: list[list[int]]  # one per chunk
    token_count: int
    truncated: bool


class Inference:
    """One model loaded in llama.cpp, used by the thread that created it."""

    def __init__(
        self,
        path: Path,
        manifest: ModelManifest,
        quant: str,
        config: EmbedderConfig | None = None,
    ) -> None:
        self.config = config or EmbedderConfig()
        self.manifest = manifest
        self.quant = quant
        self.path = path
        self.threads = self.config.threads or available_cpus()
        longest = min(self.manifest.max_tokens, self.config.max_sequence_tokens)
        if self.manifest.pooling == "last":
            longest = min(longest, max(self.config.batch_tokens, DECODER_CONTEXT))
        batch_tokens = max(self.config.batch_tokens, longest)
        # llama.cpp reserves its graph with batch_tokens / max_sequences tokens per sequence and
        # aborts (GGML_ASSERT in mul_mat) when that division is not exact: round up.
        sequences = self.config.max_sequences
        batch_tokens = -(-batch_tokens // sequences) * sequences
        self._closed = False
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
        self.engine = engine = Engine(self.path, settings)
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
        if self._closed:
            return
        self._closed = True
        if self._governor is not None:
            self._governor.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    # -- input validation (any thread: it reads only settings) -------------------------------

    def validate(
        self,
        texts: Sequence[str],
        kind: str = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        long_text: str = "truncate",
    ) -> Request:
        """Check every argument (typed errors) before anything reaches the engine."""
        if self._closed:
            raise EngineError("embedder is closed")
        formatted = self._format(texts, kind, instruction)
        out_dims = self._check_dimensions(dimensions)
        if long_text not in LONG_TEXT_MODES:
            raise InvalidArgument(f"long_text must be one of {LONG_TEXT_MODES}, got {long_text!r}")
        return Request(formatted, long_text, out_dims)

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
            return self.manifest.dims
        if not isinstance(dimensions, int) or isinstance(dimensions, bool):
            raise InvalidArgument(f"dimensions must be an integer, got {dimensions!r}")
        if dimensions == self.manifest.dims:
            return dimensions
        if dimensions not in self.manifest.matryoshka_dims:
            allowed = ", ".join(map(str, self.manifest.matryoshka_dims)) or "none"
            raise DimensionsNotSupported(
                f"model {self.manifest.name!r} cannot shorten vectors to {dimensions}"
                f" (supported: {allowed}; full size {self.manifest.dims})",
                allowed=list(self.manifest.matryoshka_dims),
            )
        return dimensions

    # -- the work (the owning thread) ---------------------------------------------------------

    def _prepare(self, index: int, text: str, long_text: str) -> _Prepared:
        content = self.engine.tokenize(text, add_special=False)
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

    def embed(
        self,
        texts: Sequence[str],
        kind: str = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        long_text: str = "truncate",
    ) -> RawEmbeddings:
        """``validate`` then ``run``: the engine child's call."""
        return self.run(self.validate(texts, kind, instruction, dimensions, long_text))

    def run(self, request: Request) -> RawEmbeddings:
        """The work, on the owning thread: tokenise, chunk, run the batches."""
        texts, long_text = request.texts, request.long_text
        if self._governor is not None:
            threads = self._governor.threads()
            if threads != self.engine.threads:
                log.debug(
                    "%s",
                    kv(
                        event="engine_threads",
                        before=self.engine.threads,
                        after=threads,
                        others_cpus=self._governor.others,
                    ),
                )
                self.engine.set_threads(threads)
        prepared = [self._prepare(i, text, long_text) for i, text in enumerate(texts)]
        flat = [sequence for item in prepared for sequence in item.sequences]
        return RawEmbeddings(
            rows=self._run_batches(flat),
            dims=self.engine.dims,
            out_dims=request.out_dims,
            token_counts=[item.token_count for item in prepared],
            truncated=[item.truncated for item in prepared],
            chunks=[len(item.sequences) for item in prepared],
            model=self.manifest.name,
            quant=self.quant,
        )

    def _run_batches(self, sequences: list[list[int]]) -> bytes:
        """Longest first, greedily packed into batches of at most batch_tokens / max_sequences;
        the rows come back in ``sequences``' order."""
        settings = self.engine.settings
        row_bytes = self.engine.dims * 4
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
        out = bytearray(len(sequences) * row_bytes)
        batch: list[int] = []
        batch_tokens = 0

        def run(batch: list[int]) -> None:
            rows = self.engine.embed_batch([sequences[i] for i in batch])
            for position, index in enumerate(batch):
                out[index * row_bytes : (index + 1) * row_bytes] = rows[
                    position * row_bytes : (position + 1) * row_bytes
                ]

        for index in order:
            length = len(sequences[index])
            if batch and (
                batch_tokens + length > settings.batch_tokens
                or len(batch) >= settings.max_sequences
            ):
                run(batch)
                batch, batch_tokens = [], 0
            batch.append(index)
            batch_tokens += length
        if batch:
            run(batch)
        return bytes(out)
