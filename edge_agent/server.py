"""The Unix-socket transport: bytes in, ``Service.call``, bytes out.

One asyncio task per connection reads frames through its own ``protocol.Decoder``; each request
runs as its own task, so a client may pipeline requests and get replies out of order (msgpack-
rpc matches them by msgid). A frame that cannot be decoded ends that connection only: the
stream cannot be resynchronised, so its decoder is dropped with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EdgeAgentError, InvalidArgument
from .protocol import (
    ERROR_NOTIFICATION,
    AlreadyRunning,
    BadRequest,
    Decoder,
    Limits,
    MessageTooLarge,
    Notification,
    Overloaded,
    ProtocolError,
    Request,
    ShuttingDown,
    encode_notification,
    encode_response,
    error_to_wire,
    parse_message,
)
from .service import Service, kv

__all__ = ["Server", "check_socket_free"]

log = logging.getLogger("edge_agent.server")

READ_CHUNK = 256 << 10
# sun_path is 108 bytes on Linux and 104 on macOS/BSD, including the terminating NUL.
_MAX_SOCKET_PATH = 103


def check_socket_free(path: Path) -> None:
    """Remove a stale socket left by a dead daemon; raise AlreadyRunning for a live one.

    Only sockets are ever removed: a regular file at the path is an operator mistake.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody accepts on it: the daemon that made it is gone.
        log.info("%s", kv(event="stale_socket_removed", path=path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except TimeoutError:
        # A full accept backlog blocks connect: someone is listening, just busy.
        raise AlreadyRunning(f"another daemon is listening on {path}", path=str(path)) from None
    except OSError as exc:
        raise InvalidArgument(f"cannot check socket {path}: {exc}", path=str(path)) from exc
    finally:
        probe.close()
    raise AlreadyRunning(f"another daemon is listening on {path}", path=str(path))


def _bind(path: Path) -> socket.socket:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise InvalidArgument(
            f"socket path {path} is longer than {_MAX_SOCKET_PATH} bytes (an AF_UNIX limit)"
        )
    if not path.parent.is_dir():
        # Only a directory we create gets 0700: tightening an existing one (say /tmp) is not ours
        # to do. The socket's own mode protects it either way.
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    check_socket_free(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() creates the file with the umask applied: 0177 makes it 0600 from the first
        # instant. umask is process-wide, so this is restored at once; the chmod below covers
        # the (tighter-only) effect of another thread racing us.
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        # Connections are refused until listen(), which asyncio calls after this.
        os.chmod(path, 0o600)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(eq=False)
class _Connection:
    id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    slots: asyncio.Semaphore
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    broken: bool = False  # the peer is gone or the conversation ended: write nothing more

    async def send(self, payload: bytes) -> None:
        if self.broken:
            return
        try:
            async with self.write_lock:
                self.writer.write(payload)
                await self.writer.drain()
        except (ConnectionError, OSError, RuntimeError):
            # The peer left; its other replies have nowhere to go either.
            self.broken = True


class Server:
    def __init__(
        self,
        service: Service,
        socket_path: Path,
        *,
        limits: Limits | None = None,
        max_connections: int = 64,
        max_in_flight: int = 64,
    ) -> None:
        if max_connections < 1 or max_in_flight < 1:
            raise InvalidArgument("max_connections and max_in_flight must be positive")
        self.service = service
        self.socket_path = Path(socket_path)
        self.limits = limits or Limits()
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight  # per connection; beyond it we stop reading
        self._server: asyncio.base_events.Server | None = None
        self._socket_id: tuple[int, int] | None = None
        self._connections: set[_Connection] = set()
        self._ids = itertools.count(1)
        self._closing = False
        self.accepted = 0
        self.rejected = 0
        self.protocol_errors = 0
        service.transport_limits.update(
            max_message_bytes=self.limits.max_message_bytes,
            max_array_len=self.limits.max_array_len,
            max_map_len=self.limits.max_map_len,
            max_connections=max_connections,
            max_in_flight_per_connection=max_in_flight,
        )
        service.transport_stats = self._stats

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    def _stats(self) -> dict[str, Any]:
        return {
            "connections": len(self._connections),
            "accepted": self.accepted,
            "rejected": self.rejected,
            "protocol_errors": self.protocol_errors,
        }

    async def start(self) -> None:
        sock = _bind(self.socket_path)
        st = os.stat(self.socket_path)
        self._socket_id = (st.st_dev, st.st_ino)
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connection, sock=sock, limit=READ_CHUNK
            )
        except BaseException:
            sock.close()
            self._remove_socket()
            raise
        log.info("%s", kv(event="listening", address=self.address))

    def _remove_socket(self) -> None:
        """Unlink the socket if it is still ours (a newer daemon may have replaced it)."""
        try:
            st = os.stat(self.socket_path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._socket_id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace`` seconds, answer
        the rest SHUTTING_DOWN, close every connection and remove the socket."""
        if self._closing:
            return
        self._closing = True
        self.service.begin_shutdown()
        if self._server is not None:
            self._server.close()
        self._remove_socket()
        pending = {task for conn in self._connections for task in conn.tasks}
        if pending:
            log.info("%s", kv(event="draining", requests=len(pending), grace_s=grace))
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for conn in list(self._connections):
            conn.writer.close()
        waiting = [asyncio.create_task(conn.done.wait()) for conn in self._connections]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=2.0)
            for task in late:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)
        log.info("%s", kv(event="stopped", address=self.address))

    # -- connections --------------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn_id = next(self._ids)
        if self._closing or len(self._connections) >= self.max_connections:
            self.rejected += 1
            exc: ProtocolError = (
                ShuttingDown("the daemon is shutting down")
                if self._closing
                else Overloaded(
                    f"{self.max_connections} connections are open; retry later",
                    limit=self.max_connections,
                )
            )
            log.warning("%s", kv(event="connection_rejected", conn=conn_id, code=exc.code.name))
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(encode_notification(ERROR_NOTIFICATION, {"error": error_to_wire(exc)}))
                await asyncio.wait_for(writer.drain(), timeout=1.0)
            writer.close()
            return
        self.accepted += 1
        conn = _Connection(conn_id, reader, writer, asyncio.Semaphore(self.max_in_flight))
        self._connections.add(conn)
        log.debug("%s", kv(event="connected", conn=conn_id, open=len(self._connections)))
        try:
            await self._serve(conn)
        finally:
            self._connections.discard(conn)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)
            conn.done.set()
            log.debug("%s", kv(event="disconnected", conn=conn_id, open=len(self._connections)))

    async def _serve(self, conn: _Connection) -> None:
        decoder = Decoder(self.limits)
        fatal: ProtocolError | None = None
        try:
            while not conn.broken:
                room = decoder.room()
                if room <= 0:
                    limit = self.limits.max_message_bytes
                    raise MessageTooLarge(f"message over {limit} bytes", limit=limit)
                data = await conn.reader.read(min(READ_CHUNK, room))
                if not data:
                    if decoder.pending_bytes:
                        self.protocol_errors += 1
                        log.warning(
                            "%s",
                            kv(event="truncated_frame", conn=conn.id, bytes=decoder.pending_bytes),
                        )
                    break
                decoder.feed(data)
                for obj in decoder:
                    await self._dispatch(conn, obj)
        except ProtocolError as exc:
            fatal = exc
        except (ConnectionError, OSError):
            conn.broken = True
        if fatal is not None:
            self.protocol_errors += 1
            log.warning(
                "%s", kv(event="protocol_error", conn=conn.id, code=fatal.code.name, error=fatal)
            )
            notice = encode_notification(ERROR_NOTIFICATION, {"error": error_to_wire(fatal)})
            await conn.send(notice)
            # Replies still being computed would follow an error that ended the conversation.
            conn.broken = True
            for task in conn.tasks:
                task.cancel()
        if conn.tasks:
            # EOF after requests (a client may half-close): their replies are still owed.
            await asyncio.gather(*conn.tasks, return_exceptions=True)

    async def _dispatch(self, conn: _Connection, obj: Any) -> None:
        try:
            message = parse_message(obj)
        except BadRequest as exc:
            msgid = exc.data.get("msgid")
            if msgid is None:
                raise  # nothing to answer to: fatal for this connection
            await conn.send(encode_response(msgid, error_to_wire(exc), None))
            return
        if isinstance(message, Request):
            # Backpressure: with max_in_flight requests running we stop reading this socket.
            await conn.slots.acquire()
            task = asyncio.create_task(self._handle(conn, message))
            conn.tasks.add(task)
            task.add_done_callback(lambda t: (conn.tasks.discard(t), conn.slots.release()))
        elif isinstance(message, Notification):
            log.debug("%s", kv(event="notification_ignored", conn=conn.id, method=message.method))
        else:
            log.debug("%s", kv(event="response_ignored", conn=conn.id, msgid=message.msgid))

    async def _handle(self, conn: _Connection, request: Request) -> None:
        started = time.perf_counter()
        try:
            if self._closing:
                raise ShuttingDown("the daemon is shutting down")
            result = await self.service.call(request.method, request.params)
            payload = encode_response(request.msgid, None, result)
        except EdgeAgentError as exc:
            payload = encode_response(request.msgid, error_to_wire(exc), None)
        except asyncio.CancelledError:
            # Shutdown ran out of grace: say so if the connection is still usable.
            if self._closing and not conn.broken:
                with contextlib.suppress(Exception):
                    error = error_to_wire(ShuttingDown("the daemon is shutting down"))
                    conn.writer.write(encode_response(request.msgid, error, None))
            raise
        except Exception as exc:
            log.exception("%s", kv(event="internal_error", method=request.method[:80]))
            error = error_to_wire(EdgeAgentError(f"internal error: {type(exc).__name__}"))
            payload = encode_response(request.msgid, error, None)
        log.debug(
            "%s",
            kv(
                event="request",
                conn=conn.id,
                msgid=request.msgid,
                method=request.method[:80],
                ms=(time.perf_counter() - started) * 1000,
            ),
        )
        await conn.send(payload)

