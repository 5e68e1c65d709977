"""The engine child's program: one ``Inference`` answering requests on a socket.

Started by ``ProcessEmbedder`` (embedding/worker.py) as ``python -c 'from
edge_agent.embedding.child import child_entry; child_entry(FD, PFD)'``. It imports what the
engine needs and nothing else: no numpy, no asyncio (which loads ssl), no
multiprocessing.connection (which loads hashlib's libcrypto), no gguf. Every module a child
imports costs RSS in every served model; together those were ~24 MB of a MiniLM child's 87
(docs/benchmarks.md, "Serving RSS against llama-server").

Messages are pickled tuples of plain values in multiprocessing.connection's framing (a 4-byte
big-endian signed length, or -1 and an 8-byte length above 2 GiB), so the parent reads them
with ``Connection``. Replies carry the engine's raw float32 rows as bytes; the parent
normalises them (embedder.finish).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import EdgeAgentError
from ..hardware.memory import release_free_heap
from .children import import_engine_bindings
from .inference import Inference, RawEmbeddings

__all__ = ["Ready", "child_entry", "pack_raw"]


@dataclass(frozen=True)
class Ready:
    """The child's first message: the engine is loaded and warm."""

    max_tokens: int
    threads: int
    seconds_per_token: float = 0.0  # measured on a warm-up text at start


class _Framed:
    """Length-prefixed messages on a socket descriptor, as multiprocessing.connection frames
    them (its ``Connection`` is the parent's end)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def put(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > 0x7FFFFFFF:
            header = struct.pack("!iQ", -1, len(data))
        else:
            header = struct.pack("!i", len(data))
        view = memoryview(header + data)
        while view:
            view = view[os.write(self._fd, view) :]

    def get(self) -> Any:
        (size,) = struct.unpack("!i", self._read(4))
        if size == -1:
            (size,) = struct.unpack("!Q", self._read(8))
        return pickle.loads(self._read(size))

    def _read(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = os.read(self._fd, min(size, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)


def pack_raw(result: RawEmbeddings) -> tuple[Any, ...]:
    """The fields of ``RawEmbeddings`` in order: a tuple of plain values pickles in a few µs,
    the dataclass costs more than the rest of a short text's hop."""
    return (
        result.rows,
        result.dims,
        result.out_dims,
        result.token_counts,
        result.truncated,
        result.chunks,
        result.model,
        result.quant,
    )


def _exit_with_parent(fd: int) -> None:
    """A thread that ends the child when the parent dies: the parent holds the only write end
    of this pipe, so the read returns (EOF) exactly when the parent is gone. Works on every
    OS and while the main thread is inside llama.cpp; exits without a traceback."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 64):
                pass
        os._exit(0)

    threading.Thread(target=watch, name="edge-agent-parent-watch", daemon=True).start()


# Texts per call above which the child trims its heap afterwards (a cheap call, but not free).
_TRIM_AFTER_TEXTS = 256


def _warm_up_seconds_per_token(inference: Inference) -> float:
    """Two short embeds at start: the first warms the caches and the engine's buffers (it is
    several times slower than later calls); the second's time per token seeds the parent's
    call deadlines before any real call has been measured (an overestimate still: a short
    call's fixed cost is spread over few tokens)."""
    text = ["edge agent warm-up text for the engine " * 4]
    inference.embed(text)
    started = time.perf_counter()
    result = inference.embed(text)
    return (time.perf_counter() - started) / max(1, sum(result.token_counts))


def _serve(conn: _Framed) -> None:
    """Take (path, manifest, quant, config), open the engine, then answer (args, kwargs)
    requests until the socket closes (the parent stopped us, or died)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    try:
        path, manifest, quant, config = conn.get()
    except (EOFError, OSError):
        return
    try:
        # This thread does nothing else: llama.cpp runs on it directly (no handoff per call).
        inference = Inference(path, manifest, quant, config)
        rate = _warm_up_seconds_per_token(inference)
    except EdgeAgentError as exc:
        conn.put(("error", int(exc.code), exc.message, exc.data))
        return
    ready = Ready(inference.max_tokens, inference.threads, seconds_per_token=rate)
    release_free_heap()  # what loading the model and compiling modules freed
    try:
        conn.put(("ready", ready))
        while True:
            request = conn.get()
            if request is None:
                return
            if request == "ping":
                conn.put(("pong",))
                continue
            args, kwargs = request
            try:
                reply: tuple[Any, ...] = ("ok", *pack_raw(inference.embed(*args, **kwargs)))
            except EdgeAgentError as exc:
                reply = ("error", int(exc.code), exc.message, exc.data)
            conn.put(reply)
            if args and len(args[0]) > _TRIM_AFTER_TEXTS:
                del reply
                # glibc keeps the heap that held a 4,096-text call's token lists and buffers
                # (~90 MB measured) for the child's lifetime otherwise.
                release_free_heap()
    except (EOFError, OSError):
        return  # the parent closed the socket or died: nothing to answer
    finally:
        inference.close()


def child_entry(fd: int, parent_fd: int | None = None) -> None:
    """The child's whole program, on the socket the parent passed as ``fd``; ``parent_fd`` is
    the read end of the pipe whose EOF means the parent died."""
    if parent_fd is not None:
        _exit_with_parent(parent_fd)
    import_engine_bindings()  # before anything imports llama_cpp: its bindings only
    _serve(_Framed(fd))
