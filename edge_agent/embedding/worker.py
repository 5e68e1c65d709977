"""Run the engine in a child process, so an engine fault costs a child, not the daemon.

llama.cpp reports some faults by aborting the process (GGML_ASSERT: an oversized encoder batch,
an unsupported tensor type, hardware-specific kernel bugs). ``ProcessEmbedder`` has the same
surface as ``Embedder`` but forwards each call over a pipe to a spawned child that owns the
engine (embedding/child.py: an ``Inference``, without numpy) and normalises the raw rows the
child sends back here, where numpy is loaded anyway (``embedder.finish``). If the child dies,
the call in flight fails with ``EngineError`` (naming the signal), the parent stays up, and
the next call starts a fresh child. Typed errors raised in the
child (bad input, text too long, ...) arrive in the parent as the same classes.

Two ways in: ``embed`` blocks its thread; ``submit`` (the daemon's) writes the request from the
event loop and returns a future that a reader callback on the pipe settles, so a request costs
no thread hand-off on the parent's side. Messages are pickled tuples of plain values (vectors
as float32 bytes): on a short text the hop, not the model, is what they would otherwise cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import (
    EdgeAgentError,
    EngineError,
    EngineUnresponsive,
    InvalidArgument,
    error_for_code,
)
from ..logs import kv
from ..models.manifest import ModelManifest
from ..models.store import ResolvedModel
from .child import Ready
from .children import child_environment
from .embedder import EmbedderConfig, Embeddings, ModelHandle, finish
from .inference import RawEmbeddings

__all__ = ["ProcessEmbedder"]

log = logging.getLogger("edge_agent.worker")


def _put(conn: Connection, message: Any) -> None:
    # Plain pickle over send_bytes: Connection.send() builds a ForkingPickler (a copy of the
    # copyreg dispatch table) per message, which costs more than the message on short texts.
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _get(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _seconds(timeout: float) -> str:
    """A deadline for a message: "1s", "0.35s" (no ".0" on whole seconds, no lost fractions)."""
    return f"{round(timeout, 2):g}s"


class _Child:
    """The engine child process: a plain subprocess (multiprocessing's spawn would also start
    its resource-tracker process, ~13 MB for nothing here)."""

    def __init__(self, fd: int) -> None:
        # The parent keeps the only write end of this pipe (non-inheritable, so no other child
        # holds it): the engine child sees EOF on it when the parent dies, even by SIGKILL.
        watch_read, self._watch_write = os.pipe()
        command = [
            sys.executable,
            "-c",
            f"from edge_agent.embedding.child import child_entry; child_entry({fd}, {watch_read})",
        ]
        try:
            self._popen = subprocess.Popen(
                command,
                pass_fds=(fd, watch_read),
                stdin=subprocess.DEVNULL,
                env=child_environment(),
            )
        except BaseException:
            os.close(self._watch_write)
            raise
        finally:
            os.close(watch_read)
        self.pid = self._popen.pid

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)
        if self._popen.returncode is not None and self._watch_write >= 0:
            os.close(self._watch_write)
            self._watch_write = -1

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()


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
        # The engine's time per token, measured by the child at start: the first calls'
        # deadlines (before the service has measured real ones) are derived from it.
        self.seconds_per_token = ready.seconds_per_token

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def sibling(self, threads: int) -> ProcessEmbedder:
        """Another child serving the same file with ``threads`` threads (blocks while it
        starts; the daemon's query lane)."""
        return ProcessEmbedder(
            self._resolved,
            replace(self.config, threads=threads),
            start_timeout=self._start_timeout,
            call_timeout=self._call_timeout,
        )

    def _start(self) -> Ready:
        ours, theirs = socket.socketpair()
        try:
            process = _Child(theirs.fileno())
        finally:
            theirs.close()
        self._process, self._conn = process, Connection(ours.detach())
        try:
            _put(self._conn, (self.path, self.manifest, self.quant, self.config))
        except OSError:
            pass  # it died at once: _receive says how
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
                    return _get(conn)
                if not self._process.is_alive() or time.monotonic() >= deadline:
                    break
        except (EOFError, OSError):
            pass
        how = self._describe_exit()
        if how == "unresponsive":
            self._process.kill()
            how = f"no answer in {_seconds(timeout)}"
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

    def _ensure_running(self) -> None:
        if self._closed:
            raise EngineError("embedder is closed")
        if self._process is None or not self._process.is_alive():
            if self._process is not None:
                log.warning("%s", kv(event="engine_restart", reason=self._describe_exit()))
                self._reap()
            self.restarts += 1
            self._start()

    def _send(self, request: tuple[Any, ...]) -> None:
        try:
            if self._conn is None:
                raise ValueError("no engine process")  # as a closed connection would
            _put(self._conn, request)
        except (OSError, ValueError) as exc:
            self._reap()
            raise EngineError(f"the embedding engine process is gone ({exc})") from exc
        except Exception as exc:  # unpicklable arguments: nothing reached the child
            raise InvalidArgument(f"arguments cannot be sent to the engine: {exc}") from exc

    @staticmethod
    def _result(reply: tuple[Any, ...]) -> Embeddings:
        if reply[0] == "ok":
            return finish(RawEmbeddings(*reply[1:]))
        raise error_for_code(reply[1])(reply[2], **reply[3])

    def embed(self, *args: Any, **kwargs: Any) -> Embeddings:
        with self._lock:
            self._ensure_running()
            self._send((args, kwargs))
            reply = self._receive(self._call_timeout, "embedding")
        return self._result(reply)

    def submit(
        self, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> asyncio.Future[Embeddings]:
        """``embed`` for an event loop, without a thread in between: the request is written to
        the pipe now and the reply is read by a callback when the pipe's descriptor becomes
        readable. One request at a time (the caller, the service's batcher, waits for each).
        Starting or restarting the child, and naming a crash, happen off the loop.

        ``timeout``: seconds the child may take before it is killed (and restarted on the next
        call) and this call fails with ENGINE_ERROR; the service derives it from the work.
        """
        return self._submit((args, kwargs), self._call_timeout if timeout is None else timeout)

    def ping(self, timeout: float) -> asyncio.Future[Any]:
        """A liveness check of an idle child: settles when it answers, or fails with
        ENGINE_ERROR after ``timeout`` seconds, with the unresponsive child killed."""
        return self._submit("ping", timeout)

    def _submit(self, request: Any, timeout: float) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise EngineError("embedder is closed")
        if self._process is None or not self._lock.acquire(blocking=False):
            # Rare: a (re)start, or a thread inside embed(). Neither may block the loop.
            return asyncio.ensure_future(self._submit_when_ready(request, timeout))
        try:
            self._send(request)
        except EngineError:
            # The child died while idle (its end of the pipe is gone; _send reaped it): start
            # a fresh one, as embed() would, rather than fail a request it never received.
            self._lock.release()
            log.warning("%s", kv(event="engine_restart", reason="died while idle"))
            return asyncio.ensure_future(self._submit_when_ready(request, timeout))
        except BaseException:
            self._lock.release()
            raise
        return self._await_reply(loop, timeout)

    async def restart(self) -> None:
        """Start a fresh child now if none is running (after a failed liveness check), so the
        next request does not pay the start-up."""
        loop = asyncio.get_running_loop()
        while not self._lock.acquire(blocking=False):
            await asyncio.sleep(0.001)
        try:
            await loop.run_in_executor(None, self._ensure_running)
        finally:
            self._lock.release()

    async def _submit_when_ready(self, request: Any, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        while not self._lock.acquire(blocking=False):
            await asyncio.sleep(0.001)
        try:
            await loop.run_in_executor(None, self._ensure_running)
            self._send(request)
        except BaseException:
            self._lock.release()
            raise
        return await self._await_reply(loop, timeout)

    def _await_reply(self, loop: asyncio.AbstractEventLoop, timeout: float) -> asyncio.Future[Any]:
        """The reply to the request just sent; releases the lock when it is settled."""
        conn = self._conn
        if conn is None:
            raise EngineError("the embedding engine process is gone")
        fd = conn.fileno()
        future: asyncio.Future[Any] = loop.create_future()
        timed_out = False
        settled = False

        def settle(release: bool = True) -> None:
            nonlocal settled
            if not settled:
                settled = True
                loop.remove_reader(fd)
                timer.cancel()
                if release:
                    self._lock.release()

        def reap_then_release() -> None:
            try:
                self._reap()
            finally:
                self._lock.release()

        def report(failure: asyncio.Future[EngineError]) -> None:
            if not future.done():
                future.set_exception(failure.exception() or failure.result())

        def on_readable() -> None:
            # A reply, or EOF because the child died: recv() tells which. The child writes
            # each reply whole, so this read does not wait on it.
            try:
                reply = _get(conn)
            except (EOFError, OSError):
                settle(release=False)  # held until the dead child is reaped
                loop.run_in_executor(None, self._failure, timed_out, timeout).add_done_callback(
                    report
                )
                return
            settle()
            if future.done():
                return
            if reply[0] == "pong":
                future.set_result(None)
                return
            try:
                future.set_result(self._result(reply))
            except EdgeAgentError as exc:
                future.set_exception(exc)

        def on_timeout() -> None:
            nonlocal timed_out
            timed_out = True
            # SIGKILL works on a stopped (SIGSTOP) or swapped-out child too; EOF follows and
            # on_readable reports it.
            self._process.kill()

        def on_cancelled(done: asyncio.Future[Embeddings]) -> None:
            if done.cancelled() and not settled:
                # The caller gave up with the request in the child: its late reply would be
                # read as the next call's. Stop that child; the next call starts a fresh one.
                settle(release=False)
                self._process.kill()
                loop.run_in_executor(None, reap_then_release)

        loop.add_reader(fd, on_readable)
        timer = loop.call_later(timeout, on_timeout)
        future.add_done_callback(on_cancelled)
        return future

    def _failure(self, timed_out: bool, timeout: float) -> EngineError:
        """The error for a child that stopped answering: names why, reaps it (blocking while
        the dead child is joined, so called off the loop)."""
        try:
            how = f"no answer in {_seconds(timeout)}" if timed_out else self._describe_exit()
            self._reap()
        finally:
            self._lock.release()
        error = EngineUnresponsive if timed_out else EngineError
        return error(
            f"the embedding engine process failed while embedding ({how});"
            " it will be restarted on the next call",
            model=self.manifest.name,
            quant=self.quant,
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._conn is not None:
                try:
                    _put(self._conn, None)
                except (OSError, ValueError):
                    pass
            self._reap()
