"""The transports (Unix socket, optional TCP): bytes in, ``Service.call``, bytes out.

One asyncio task per connection reads frames through its own ``protocol.Decoder``; each request
runs as its own task, so a client may pipeline requests and get replies out of order (msgpack-
rpc matches them by msgid). A frame that cannot be decoded ends that connection only: the
stream cannot be resynchronised, so its decoder is dropped with it.

Unix-socket peers are trusted by the socket's file mode (0600). A TCP peer, when a token is
configured, is unauthenticated until its ``auth`` call succeeds: until then it may call only
``hello`` and ``auth``, one request at a time, in messages of at most PREAUTH_MAX_BYTES, and
must authenticate within ``auth_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
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
    AuthArgs,
    AuthFailed,
    AuthRequired,
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
    named_args,
    parse_message,
)
from .service import Service, kv

__all__ = ["PREAUTH_MAX_BYTES", "Server", "check_socket_free"]

log = logging.getLogger("edge_agent.server")

READ_CHUNK = 256 << 10
# sun_path is 108 bytes on Linux and 104 on macOS/BSD, including the terminating NUL.
_MAX_SOCKET_PATH = 103
# Before auth a TCP peer can send only hello/auth: a few hundred bytes. Anything larger is not a
# client of ours, and must not make us buffer megabytes for a stranger.
PREAUTH_MAX_BYTES = 4096
PREAUTH_METHODS = frozenset({"hello", "auth"})
# How a request line of HTTP/1.x starts: an HTTP client that found our port gets a plain answer.
_HTTP_METHODS = (
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PRI * HTTP/2",
)
_HTTP_BODY = b"This port speaks MessagePack-RPC (edge-agent), not HTTP. See docs/protocol.md.\n"
_HTTP_REPLY = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    + f"Content-Length: {len(_HTTP_BODY)}\r\n\r\n".encode()
    + _HTTP_BODY
)


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
    transport: str = "unix"
    authenticated: bool = True
    peer: str = ""

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
        tcp: tuple[str, int] | None = None,
        auth_token: str | None = None,
        auth_timeout: float = 10.0,
        max_preauth_connections: int = 16,
    ) -> None:
        if max_connections < 1 or max_in_flight < 1 or max_preauth_connections < 1:
            raise InvalidArgument("connection limits must be positive")
        if not 0 < auth_timeout <= 600:
            raise InvalidArgument(f"auth_timeout must be in (0, 600] s, got {auth_timeout!r}")
        self.service = service
        self.socket_path = Path(socket_path)
        self.limits = limits or Limits()
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight  # per connection; beyond it we stop reading
        self.tcp = tcp
        self.auth_token = auth_token
        self.auth_timeout = auth_timeout
        self.max_preauth_connections = max_preauth_connections
        self.tcp_port: int | None = None  # the bound port (``tcp`` may ask for port 0)
        self._server: asyncio.base_events.Server | None = None
        self._tcp_server: asyncio.base_events.Server | None = None
        self._socket_id: tuple[int, int] | None = None
        self._connections: set[_Connection] = set()
        self._ids = itertools.count(1)
        self._closing = False
        self.accepted = 0
        self.rejected = 0
        self.protocol_errors = 0
        self.auth_failures = 0
        self.http_rejected = 0
        service.transport_limits.update(
            max_message_bytes=self.limits.max_message_bytes,
            max_array_len=self.limits.max_array_len,
            max_map_len=self.limits.max_map_len,
            max_connections=max_connections,
            max_in_flight_per_connection=max_in_flight,
        )
        if tcp is not None:
            service.transport_limits.update(
                preauth_max_message_bytes=PREAUTH_MAX_BYTES,
                auth_timeout_s=auth_timeout,
                max_preauth_connections=max_preauth_connections,
            )
        service.transport_stats = self._stats

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def tcp_address(self) -> str | None:
        """``tcp://HOST:PORT`` once listening (IPv6 hosts in brackets), else None."""
        if self.tcp is None or self.tcp_port is None:
            return None
        host = self.tcp[0]
        return f"tcp://[{host}]:{self.tcp_port}" if ":" in host else f"tcp://{host}:{self.tcp_port}"

    @property
    def auth_required(self) -> bool:
        return self.tcp is not None and self.auth_token is not None

    def _stats(self) -> dict[str, Any]:
        return {
            "connections": len(self._connections),
            "tcp_connections": sum(c.transport == "tcp" for c in self._connections),
            "accepted": self.accepted,
            "rejected": self.rejected,
            "protocol_errors": self.protocol_errors,
            "auth_failures": self.auth_failures,
            "http_rejected": self.http_rejected,
        }

    async def start(self) -> None:
        sock = _bind(self.socket_path)
        st = os.stat(self.socket_path)
        self._socket_id = (st.st_dev, st.st_ino)
        try:
            self._server = await asyncio.start_unix_server(
                self._on_unix, sock=sock, limit=READ_CHUNK
            )
        except BaseException:
            sock.close()
            self._remove_socket()
            raise
        log.info("%s", kv(event="listening", address=self.address))
        if self.tcp is None:
            return
        host, port = self.tcp
        try:
            self._tcp_server = await asyncio.start_server(
                self._on_tcp, host, port, limit=READ_CHUNK, reuse_address=True
            )
        except OSError as exc:
            self._server.close()
            self._remove_socket()
            raise InvalidArgument(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}", listen=f"{host}:{port}"
            ) from exc
        self.tcp_port = self._tcp_server.sockets[0].getsockname()[1]
        log.info(
            "%s",
            kv(event="listening", address=self.tcp_address, auth=self.auth_token is not None),
        )

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
        for listener in (self._server, self._tcp_server):
            if listener is not None:
                listener.close()
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
        for listener in (self._server, self._tcp_server):
            if listener is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(listener.wait_closed(), timeout=2.0)
        log.info("%s", kv(event="stopped", address=self.address))

    # -- connections --------------------------------------------------------------------------

    async def _on_unix(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The socket's mode (0600) already limits who can connect: no auth step.
        await self._on_connection(reader, writer, "unix", authenticated=True)

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._on_connection(reader, writer, "tcp", authenticated=self.auth_token is None)

    async def _on_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        transport: str,
        *,
        authenticated: bool,
    ) -> None:
        conn_id = next(self._ids)
        preauth = sum(not c.authenticated for c in self._connections)
        exc: ProtocolError | None = None
        if self._closing:
            exc = ShuttingDown("the daemon is shutting down")
        elif len(self._connections) >= self.max_connections:
            exc = Overloaded(
                f"{self.max_connections} connections are open; retry later",
                limit=self.max_connections,
            )
        elif not authenticated and preauth >= self.max_preauth_connections:
            exc = Overloaded(
                f"{preauth} connections are waiting to authenticate; retry later",
                limit=self.max_preauth_connections,
            )
        if exc is not None:
            self.rejected += 1
            log.warning("%s", kv(event="connection_rejected", conn=conn_id, code=exc.code.name))
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(encode_notification(ERROR_NOTIFICATION, {"error": error_to_wire(exc)}))
                await asyncio.wait_for(writer.drain(), timeout=1.0)
            writer.close()
            return
        self.accepted += 1
        conn = _Connection(conn_id, reader, writer, asyncio.Semaphore(self.max_in_flight))
        conn.transport = transport
        conn.authenticated = authenticated
        if transport == "tcp":
            peer = writer.get_extra_info("peername")
            conn.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._connections.add(conn)
        log.debug(
            "%s",
            kv(
                event="connected",
                conn=conn_id,
                transport=transport,
                peer=conn.peer or "-",
                open=len(self._connections),
            ),
        )
        try:
            await self._serve(conn)
        finally:
            self._connections.discard(conn)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)
            conn.done.set()
            log.debug("%s", kv(event="disconnected", conn=conn_id, open=len(self._connections)))

    async def _read(self, conn: _Connection, decoder: Decoder, deadline: float) -> bytes:
        """The next bytes, never more than the current message may still grow by."""
        limit = self.limits.max_message_bytes if conn.authenticated else PREAUTH_MAX_BYTES
        room = limit - decoder.pending_bytes
        if room <= 0:
            raise MessageTooLarge(f"message over {limit} bytes", limit=limit)
        if conn.authenticated:
            return await conn.reader.read(min(READ_CHUNK, room))
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(conn.reader.read(min(READ_CHUNK, room)), remaining)
        except TimeoutError:
            raise AuthRequired(
                f"not authenticated within {self.auth_timeout:g} s; closing",
                timeout_s=self.auth_timeout,
            ) from None

    async def _serve(self, conn: _Connection) -> None:
        decoder = Decoder(self.limits)
        fatal: ProtocolError | None = None
        deadline = time.monotonic() + self.auth_timeout
        first = conn.transport == "tcp"
        try:
            while not conn.broken:
                data = await self._read(conn, decoder, deadline)
                if first and data:
                    first = False
                    if data.startswith(_HTTP_METHODS):
                        # An HTTP client (a browser, curl, a scanner) found this port: tell it
                        # in its own language instead of a msgpack error it cannot show.
                        self.http_rejected += 1
                        log.warning("%s", kv(event="http_rejected", conn=conn.id, peer=conn.peer))
                        await conn.send(_HTTP_REPLY)
                        conn.broken = True
                        break
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
            if not conn.authenticated:
                # One at a time before auth: a request pipelined after `auth` must see its
                # outcome, and a stranger gets no concurrency.
                await self._handle(conn, message)
                return
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
            if request.method == "auth":
                result = await self._auth(conn, request.params)
            elif not conn.authenticated and request.method not in PREAUTH_METHODS:
                raise AuthRequired(
                    f"{request.method[:80]} needs authentication: call auth with the token first"
                )
            else:
                result = await self.service.call(request.method, request.params)
            if request.method == "hello" and isinstance(result, dict) and self.tcp is not None:
                result = {
                    **result,
                    "capabilities": sorted({*result.get("capabilities", ()), "auth"}),
                    "auth": {
                        "required": conn.transport == "tcp" and self.auth_token is not None,
                        "authenticated": conn.authenticated,
                    },
                }
            payload = encode_response(request.msgid, None, result)
        except AuthFailed as exc:
            # Wrong token: answer, then hang up, so every guess costs a new connection.
            await conn.send(encode_response(request.msgid, error_to_wire(exc), None))
            conn.broken = True
            conn.writer.close()
            return
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

    async def _auth(self, conn: _Connection, params: Any) -> dict[str, Any]:
        args = AuthArgs.from_args(named_args(params))
        if conn.transport == "unix" or self.auth_token is None:
            return {"authenticated": True, "required": False}
        # Constant-time: the comparison must not reveal how many leading bytes were right.
        if hmac.compare_digest(args.token.encode("utf-8"), self.auth_token.encode("utf-8")):
            conn.authenticated = True
            log.info("%s", kv(event="authenticated", conn=conn.id, peer=conn.peer))
            return {"authenticated": True, "required": True}
        self.auth_failures += 1
        log.warning("%s", kv(event="auth_failed", conn=conn.id, peer=conn.peer))
        raise AuthFailed("wrong token")
