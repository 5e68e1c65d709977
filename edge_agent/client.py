"""Clients for the daemon: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak docs/protocol.md over the Unix socket and raise the same typed exceptions the server
raised (errors.py and protocol.py classes, matched by code). Importing this module loads no
engine code (llama.cpp, hnswlib): only msgpack and numpy.

A call that fails because the connection broke raises ConnectionFailed and the next call opens
a new connection. Idempotent methods are retried once, on a fresh connection, when a reused
connection turns out to be dead (the daemon restarted since the last call).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from . import __version__
from .errors import InvalidArgument
from .paths import default_paths
from .protocol import (
    ERROR_NOTIFICATION,
    PROTOCOL_VERSION,
    BadRequest,
    BadResponse,
    ConnectionFailed,
    Decoder,
    EmbedArgs,
    EmbedResult,
    Limits,
    Notification,
    ProtocolError,
    RequestTimeout,
    Response,
    encode_request,
    error_from_wire,
    named_args,
    parse_message,
)

__all__ = ["AsyncClient", "Client", "EmbedResult"]

# Replies are not bounded by the server's request limit: a batch of long vectors can exceed it.
DEFAULT_MAX_RESPONSE_BYTES = 1 << 30
_RESPONSE_LIMITS_ARRAY = 1 << 24
_RESPONSE_LIMITS_MAP = 1 << 16
_READ_CHUNK = 256 << 10
# Safe to send twice: they change nothing on the server.
IDEMPOTENT_METHODS = frozenset({"hello", "health", "stats", "embed"})
CLIENT_NAME = f"edge-agent-python/{__version__}"


def _resolve_socket(socket_path: str | os.PathLike[str] | None) -> Path:
    if socket_path is None:
        env = os.environ.get("EDGE_AGENT_SOCKET")
        return Path(env).expanduser() if env else default_paths().default_socket
    return Path(socket_path).expanduser()


def _response_limits(max_response_bytes: int) -> Limits:
    return Limits(
        max_message_bytes=max_response_bytes,
        max_array_len=_RESPONSE_LIMITS_ARRAY,
        max_map_len=_RESPONSE_LIMITS_MAP,
    )


def _embed_args(
    texts: Sequence[str],
    kind: str,
    instruction: str | None,
    dimensions: int | None,
    long_text: str,
) -> dict[str, Any]:
    if isinstance(texts, (str, bytes)):
        # list() would turn it into one text per character.
        raise InvalidArgument("texts must be a list of strings, not a single string")
    return EmbedArgs(list(texts), kind, instruction, dimensions, long_text).to_args()


def _connect_error(path: Path, exc: OSError) -> ConnectionFailed:
    if isinstance(exc, FileNotFoundError):
        reason = "no daemon socket (start one with `edge-agent serve`)"
    elif isinstance(exc, ConnectionRefusedError):
        reason = "nothing is listening (a daemon died and left its socket)"
    elif isinstance(exc, PermissionError):
        reason = "permission denied (the socket belongs to another user)"
    else:
        reason = str(exc)
    return ConnectionFailed(f"cannot connect to {path}: {reason}", path=str(path))


def _read_message(message: Any) -> Response | Notification:
    try:
        parsed = parse_message(message)
    except BadRequest as exc:
        raise BadResponse(f"malformed message from the daemon: {exc.message}") from None
    if not isinstance(parsed, (Response, Notification)):
        raise BadResponse("the daemon sent a request; this client serves none")
    return parsed


def _fatal_from_notification(message: Notification) -> ProtocolError | None:
    """The error the daemon sent just before closing the connection, if this is it."""
    if message.method != ERROR_NOTIFICATION:
        return None
    try:
        error = named_args(message.params).get("error")
    except BadRequest:
        error = None
    exc = error_from_wire(error)
    if isinstance(exc, ProtocolError):
        return exc
    return BadResponse(f"the daemon closed the connection: {exc}")


def _check_hello(result: Any) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise BadResponse("hello result is not a map")
    if result.get("protocol") != PROTOCOL_VERSION:
        raise BadResponse(
            f"the daemon speaks protocol {result.get('protocol')!r}; this client speaks"
            f" {PROTOCOL_VERSION}",
            protocol=result.get("protocol"),
        )
    return result


class Client:
    """Blocking client; one connection, one call at a time (thread-safe by a lock).

    ``timeout`` (seconds, None for none) bounds each call, connecting included.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        timeout: float | None = 30.0,
        *,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.socket_path = _resolve_socket(socket_path)
        self.timeout = timeout
        self._limits = _response_limits(max_response_bytes)
        self._sock: socket.socket | None = None
        self._decoder: Decoder | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._decoder = None

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeout("the daemon did not answer in time")
        return remaining

    def _connect(self, deadline: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._remaining(deadline))
        try:
            sock.connect(os.fspath(self.socket_path))
        except TimeoutError:
            sock.close()
            raise RequestTimeout(f"connecting to {self.socket_path} timed out") from None
        except OSError as exc:
            sock.close()
            raise _connect_error(self.socket_path, exc) from exc
        self._sock = sock
        self._decoder = Decoder(self._limits)
        return sock

    def call(self, method: str, args: Mapping[str, Any] | None = None) -> Any:
        """One request; returns its result or raises its typed error."""
        with self._lock:
            attempts = 2 if method in IDEMPOTENT_METHODS else 1
            for attempt in range(attempts):
                deadline = self._deadline()
                reused = self._sock is not None
                try:
                    response = self._roundtrip(method, args, deadline)
                except ConnectionFailed:
                    self._disconnect()
                    if reused and attempt + 1 < attempts:
                        continue
                    raise
                except BaseException:
                    # Timeout, bad bytes, Ctrl-C mid-read: the stream's state is unknown, so the
                    # connection cannot be reused (a late reply would answer the next call).
                    self._disconnect()
                    raise
                if response.error is not None:
                    raise error_from_wire(response.error)
                return response.result
        raise AssertionError("unreachable")

    def _roundtrip(
        self, method: str, args: Mapping[str, Any] | None, deadline: float | None
    ) -> Response:
        sock = self._sock or self._connect(deadline)
        msgid = next(self._ids) & 0xFFFFFFFF
        try:
            sock.settimeout(self._remaining(deadline))
            sock.sendall(encode_request(msgid, method, args))
        except TimeoutError:
            raise RequestTimeout(f"sending {method} timed out") from None
        except OSError as exc:
            # A daemon that refuses a connection (too many, shutting down) says why, then
            # closes: our send fails, but its reason is already in our receive buffer.
            fatal = self._buffered_fatal(sock)
            if fatal is not None:
                raise fatal from None
            raise ConnectionFailed(f"connection to {self.socket_path} broke: {exc}") from exc
        decoder = self._decoder
        assert decoder is not None
        while True:
            for obj in decoder:
                message = _read_message(obj)
                if isinstance(message, Notification):
                    fatal = _fatal_from_notification(message)
                    if fatal is not None:
                        raise fatal
                    continue
                if message.msgid == msgid:
                    return message
                # Anything else is a reply we no longer wait for: ignore it.
            try:
                sock.settimeout(self._remaining(deadline))
                data = sock.recv(min(_READ_CHUNK, max(decoder.room(), 1)))
            except TimeoutError:
                raise RequestTimeout(f"{method} timed out after {self.timeout}s") from None
            except OSError as exc:
                raise ConnectionFailed(f"connection to {self.socket_path} broke: {exc}") from exc
            if not data:
                raise ConnectionFailed(f"the daemon at {self.socket_path} closed the connection")
            decoder.feed(data)

    def _buffered_fatal(self, sock: socket.socket) -> ProtocolError | None:
        decoder = self._decoder
        if decoder is None:
            return None
        with contextlib.suppress(OSError, ProtocolError):
            sock.setblocking(False)
            while data := sock.recv(min(_READ_CHUNK, max(decoder.room(), 1))):
                decoder.feed(data)
        with contextlib.suppress(ProtocolError):
            for obj in decoder:
                message = _read_message(obj)
                if isinstance(message, Notification):
                    fatal = _fatal_from_notification(message)
                    if fatal is not None:
                        return fatal
        return None

    # -- methods ------------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """The daemon's identity, model, capabilities and limits (BadResponse if it speaks
        another protocol version)."""
        return _check_hello(
            self.call("hello", {"client": CLIENT_NAME, "protocol": PROTOCOL_VERSION})
        )

    def embed(
        self,
        texts: Sequence[str],
        kind: str = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        long_text: str = "truncate",
    ) -> EmbedResult:
        args = _embed_args(texts, kind, instruction, dimensions, long_text)
        return EmbedResult.from_wire(self.call("embed", args))

    def health(self) -> dict[str, Any]:
        return self.call("health")

    def stats(self) -> dict[str, Any]:
        return self.call("stats")


class _AsyncConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[Response]] = {}
        self.closed = False
        self.reader_task: asyncio.Task[None] | None = None


class AsyncClient:
    """asyncio client; concurrent calls share one connection (pipelined, matched by msgid)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        timeout: float | None = 30.0,
        *,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.socket_path = _resolve_socket(socket_path)
        self.timeout = timeout
        self._limits = _response_limits(max_response_bytes)
        self._conn: _AsyncConnection | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._fail(conn, ConnectionFailed("the client was closed"))
            if conn.reader_task is not None:
                conn.reader_task.cancel()
                await asyncio.gather(conn.reader_task, return_exceptions=True)

    def _fail(self, conn: _AsyncConnection, exc: Exception) -> None:
        conn.closed = True
        conn.writer.close()
        for future in conn.pending.values():
            if not future.done():
                future.set_exception(exc)
        conn.pending.clear()
        if self._conn is conn:
            self._conn = None

    async def _connection(self) -> tuple[_AsyncConnection, bool]:
        """The live connection, and whether it was opened just now."""
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn, False
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(os.fspath(self.socket_path)), self.timeout
                )
            except TimeoutError:
                raise RequestTimeout(f"connecting to {self.socket_path} timed out") from None
            except OSError as exc:
                raise _connect_error(self.socket_path, exc) from exc
            conn = _AsyncConnection(reader, writer)
            conn.reader_task = asyncio.create_task(self._read_loop(conn))
            self._conn = conn
            return conn, True

    async def _read_loop(self, conn: _AsyncConnection) -> None:
        decoder = Decoder(self._limits)
        error: Exception = ConnectionFailed(
            f"the daemon at {self.socket_path} closed the connection"
        )
        try:
            while True:
                data = await conn.reader.read(min(_READ_CHUNK, max(decoder.room(), 1)))
                if not data:
                    break
                decoder.feed(data)
                for obj in decoder:
                    message = _read_message(obj)
                    if isinstance(message, Notification):
                        fatal = _fatal_from_notification(message)
                        if fatal is not None:
                            raise fatal
                        continue
                    future = conn.pending.pop(message.msgid, None)
                    if future is not None and not future.done():
                        future.set_result(message)
        except ProtocolError as exc:
            error = exc
        except OSError as exc:
            error = ConnectionFailed(f"connection to {self.socket_path} broke: {exc}")
        finally:
            self._fail(conn, error)

    async def call(self, method: str, args: Mapping[str, Any] | None = None) -> Any:
        attempts = 2 if method in IDEMPOTENT_METHODS else 1
        for attempt in range(attempts):
            conn, fresh = await self._connection()
            msgid = next(self._ids) & 0xFFFFFFFF
            future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            conn.pending[msgid] = future
            try:
                payload = encode_request(msgid, method, args)
                response = await asyncio.wait_for(
                    self._send_and_wait(conn, future, payload), self.timeout
                )
            except TimeoutError:
                conn.pending.pop(msgid, None)  # a late reply is dropped by msgid
                raise RequestTimeout(f"{method} timed out after {self.timeout}s") from None
            except ConnectionFailed:
                conn.pending.pop(msgid, None)
                if not fresh and attempt + 1 < attempts:
                    continue
                raise
            if response.error is not None:
                raise error_from_wire(response.error)
            return response.result
        raise AssertionError("unreachable")

    async def _send_and_wait(
        self, conn: _AsyncConnection, future: asyncio.Future[Response], payload: bytes
    ) -> Response:
        try:
            conn.writer.write(payload)
            await conn.writer.drain()
        except OSError as exc:
            # A daemon that refuses a connection says why before closing: let the reader task
            # deliver that reason to this future before settling for a generic failure.
            if conn.reader_task is not None:
                await asyncio.wait({conn.reader_task}, timeout=1.0)
            if not future.done():
                error = ConnectionFailed(f"connection to {self.socket_path} broke: {exc}")
                self._fail(conn, error)
        return await future

    # -- methods ------------------------------------------------------------------------------

    async def hello(self) -> dict[str, Any]:
        return _check_hello(
            await self.call("hello", {"client": CLIENT_NAME, "protocol": PROTOCOL_VERSION})
        )

    async def embed(
        self,
        texts: Sequence[str],
        kind: str = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        long_text: str = "truncate",
    ) -> EmbedResult:
        args = _embed_args(texts, kind, instruction, dimensions, long_text)
        return EmbedResult.from_wire(await self.call("embed", args))

    async def health(self) -> dict[str, Any]:
        return await self.call("health")

    async def stats(self) -> dict[str, Any]:
        return await self.call("stats")

