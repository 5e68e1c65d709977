"""The embedder: one llama.cpp context, owned by one thread, fed in length-sorted batches.

``Embedder.embed`` may be called from any thread; the work runs on the model's own thread
(an ``Inference``, embedding/inference.py), so llama.cpp never sees two threads. Input is
validated on the caller's thread first, so bad input fails fast with a typed error and never
reaches the engine. ``finish`` turns the engine's raw rows into ``Embeddings`` (chunks pooled,
vectors shortened and normalised) with numpy; the ProcessEmbedder calls it in the daemon on the
rows its engine child sends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Self

import numpy as np

from ..errors import EngineError
from ..models.manifest import ModelManifest
from ..models.store import ModelStore, ResolvedModel
from .inference import (
    DECODER_CONTEXT,
    EmbedderConfig,
    Inference,
    Kind,
    LongText,
    RawEmbeddings,
    Request,
)

__all__ = [
    "DECODER_CONTEXT",
    "Embedder",
    "EmbedderConfig",
    "Embeddings",
    "Kind",
    "LongText",
    "ModelHandle",
    "finish",
]


@dataclass(frozen=True)
class Embeddings:
    """Float32, L2-normalised vectors, one row per input text, in input order."""

    vectors: np.ndarray  # (n, dims) float32
    token_counts: list[int]  # tokens of each (templated) text including special tokens
    truncated: list[bool]  # True where long_text="truncate" cut the text
    chunks: list[int]  # sequences embedded per text (>1 only with long_text="chunk")
    model: str
    quant: str


def _normalize(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    return (rows / norms).astype(np.float32, copy=False)


def finish(raw: RawEmbeddings) -> Embeddings:
    """The engine's rows as the caller's vectors: a chunked text gets the mean of its
    normalised chunk vectors; then every vector is shortened to ``out_dims`` (Matryoshka) and
    L2-normalised."""
    count = len(raw.chunks)
    vectors = np.frombuffer(raw.rows, dtype=np.float32).reshape(-1, raw.dims)
    if len(vectors) == count:
        pooled = vectors
    else:
        owner = np.repeat(np.arange(count), raw.chunks)
        pooled = np.zeros((count, raw.dims), dtype=np.float32)
        np.add.at(pooled, owner, _normalize(vectors))
        pooled /= np.asarray(raw.chunks, dtype=np.float32)[:, None]
    if raw.out_dims != pooled.shape[1]:
        pooled = pooled[:, : raw.out_dims]
    return Embeddings(
        vectors=_normalize(pooled),
        token_counts=raw.token_counts,
        truncated=raw.truncated,
        chunks=raw.chunks,
        model=raw.model,
        quant=raw.quant,
    )


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


class Embedder(ModelHandle):
    """In-process: a model thread of its own owns the ``Inference``."""

    def __init__(self, resolved: ResolvedModel, config: EmbedderConfig | None = None) -> None:
        self.config = config or EmbedderConfig()
        self.manifest: ModelManifest = resolved.manifest
        self.quant = resolved.quant
        self.path = resolved.path
        # Thread-owned: every llama.cpp call happens on this single worker thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-agent-model")
        self._closed = threading.Event()
        try:
            self._inference: Inference = self._executor.submit(
                Inference, self.path, self.manifest, self.quant, self.config
            ).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self.threads = self._inference.threads
        self.pooling = self._inference.pooling
        self.max_tokens = self._inference.max_tokens

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        inference = getattr(self, "_inference", None)
        if inference is not None:
            self._executor.submit(inference.close).result()
        self._executor.shutdown(wait=True)

    def embed(
        self,
        texts: Sequence[str],
        kind: Kind = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        long_text: LongText = "truncate",
    ) -> Embeddings:
        return finish(self._start(texts, kind, instruction, dimensions, long_text).result())

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
        raw = asyncio.wrap_future(self._start(texts, kind, instruction, dimensions, long_text))
        finished: asyncio.Future[Embeddings] = raw.get_loop().create_future()

        def settle(done: asyncio.Future[RawEmbeddings]) -> None:
            if finished.done():
                return
            if done.cancelled():
                finished.cancel()
            elif done.exception() is not None:
                finished.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                finished.set_result(finish(done.result()))

        raw.add_done_callback(settle)
        return finished

    def _start(
        self,
        texts: Sequence[str],
        kind: str,
        instruction: str | None,
        dimensions: int | None,
        long_text: str,
    ) -> Future[RawEmbeddings]:
        """Validate on the caller's thread, then queue the work on the model thread."""
        if self._closed.is_set():
            raise EngineError("embedder is closed")
        request: Request = self._inference.validate(
            texts, kind, instruction, dimensions, long_text
        )
        return self._executor.submit(self._inference.run, request)
