"""Run the Embedder in a child process, so an engine fault costs a child, not the daemon.

llama.cpp reports some faults by aborting the process (GGML_ASSERT: an oversized encoder batch,
an unsupported tensor type, hardware-specific kernel bugs). ``ProcessEmbedder`` has the same
surface as ``Embedder`` but forwards each call over a pipe to a spawned child that owns the
real Embedder. If the child dies, the call in flight fails with ``EngineError`` (naming the
signal), the parent stays up, and the next call starts a fresh child. Typed errors raised in the
child (bad input, text too long, ...) arrive in the parent as the same classes.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .embedder import Embedder, EmbedderConfig, Embeddings, ModelHandle
from .errors import EdgeAgentError, EngineError, InvalidArgument, error_for_code
from .models.manifest import ModelManifest
from .models.store import ResolvedModel

__all__ = ["ProcessEmbedder"]

log = logging.getLogger("edge_agent.worker")

_SPAWN = multiprocessing.get_context("spawn")  # fork would copy the parent's threads and locks


@dataclass(frozen=True)
class _Ready:
    max_tokens: int
    threads: int


def _child_main(conn: Connection, resolved: ResolvedModel, config: EmbedderConfig) -> None:
    """The child: open the embedder, then answer (args, kwargs) requests until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    try:
        # This thread does nothing else: llama.cpp runs on it directly (no handoff per call).
        embedder = Embedder(resolved, config, on_caller_thread=True)
    except EdgeAgentError as exc:
        conn.send(("error", int(exc.code), exc.message, exc.data))
        return
    conn.send(("ready", _Ready(max_tokens=embedder.max_tokens, threads=embedder.threads)))
    with embedder:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return
            if request is None:
                return
            args, kwargs = request
            try:
                reply: tuple[Any, ...] = ("ok", embedder.embed(*args, **kwargs))
            except EdgeAgentError as exc:
                reply = ("error", int(exc.code), exc.message, exc.data)
            conn.send(reply)


class ProcessEmbedder(ModelHandle):
    """``Embedder``'s interface, backed by a child process that is restarted after a crash."""

    def __init__(
        self,
        resolved: ResolvedModel,
        config: EmbedderConfig | None = None,
        start_timeout: float = 120.0,
        call_timeout: float = 600.0,
    ) -> None:
        self.config = config or EmbedderConfig()
        self.manifest: ModelManifest = resolved.manifest
        self.quant = resolved.quant
        self.path: Path = resolved.path
        self._resolved = resolved
        self._start_timeout = start_timeout
        self._call_timeout = call_timeout
        self._lock = threading.Lock()  # one request in flight: the child has one model thread
        self._process: Any = None
        self._conn: Connection | None = None
        self._closed = False
        self.restarts = 0
        ready = self._start()
        self.max_tokens = ready.max_tokens
        self.threads = ready.threads

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _start(self) -> _Ready:
        parent, child = _SPAWN.Pipe()
        process = _SPAWN.Process(
            target=_child_main,
            args=(child, self._resolved, self.config),
            name="edge-agent-embedder",
            daemon=True,
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent
        reply = self._receive(self._start_timeout, "starting")
        if reply[0] == "error":
            self._reap()
            raise error_for_code(reply[1])(reply[2], **reply[3])
        return reply[1]

    def _describe_exit(self) -> str:
        process = self._process
        if process is None:
            return "not running"
        process.join(timeout=5)
        code = process.exitcode
        if code is None:
            return "unresponsive"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    def _receive(self, timeout: float, doing: str) -> tuple[Any, ...]:
        conn = self._conn
        deadline = time.monotonic() + timeout
        try:
            while conn is not None:
                # Poll in slices so a dead child is noticed even if the pipe stays open.
                if conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                    return conn.recv()
                if not self._process.is_alive() or time.monotonic() >= deadline:
                    break
        except (EOFError, OSError):
            pass
        how = self._describe_exit()
        if how == "unresponsive":
            self._process.kill()
            how = f"no answer in {timeout:.0f}s"
        self._reap()
        raise EngineError(
            f"the embedding engine process failed while {doing} ({how});"
            " it will be restarted on the next call",
            model=self.manifest.name,
            quant=self.quant,
        )

    def _reap(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        self._process, self._conn = None, None

    def embed(self, *args: Any, **kwargs: Any) -> Embeddings:
        with self._lock:
            if self._closed:
                raise EngineError("embedder is closed")
            if self._process is None or not self._process.is_alive():
                if self._process is not None:
                    log.warning("embedding engine process %s; restarting", self._describe_exit())
                    self._reap()
                self.restarts += 1
                self._start()
            try:
                self._conn.send((args, kwargs))
            except (OSError, ValueError) as exc:
                self._reap()
                raise EngineError(f"the embedding engine process is gone ({exc})") from exc
            except Exception as exc:  # unpicklable arguments: nothing reached the child
                raise InvalidArgument(f"arguments cannot be sent to the engine: {exc}") from exc
            reply = self._receive(self._call_timeout, "embedding")
        if reply[0] == "ok":
            return reply[1]
        raise error_for_code(reply[1])(reply[2], **reply[3])

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._conn is not None:
                try:
                    self._conn.send(None)
                except (OSError, ValueError):
                    pass
            self._reap()
