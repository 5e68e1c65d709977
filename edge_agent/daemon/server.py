"""The transports (Unix socket, optional TCP): bytes in, ``Service.call``, bytes out.

Each connection is an asyncio Protocol that decodes frames through its own ``protocol.Decoder``
and starts each request as soon as it is decoded, so a client may pipeline requests and get
replies out of order (msgpack-rpc matches them by msgid). A frame that cannot be decoded ends
that connection only: the stream cannot be resynchronised, so its decoder is dropped with it.

Unix-socket peers are trusted by the socket's file mode (0600). A TCP peer, when a token is
configured, is unauthenticated until its ``auth`` call succeeds: until then it may call only
``hello`` and ``auth``, one request at a time, in messages of at most PREAUTH_MAX_BYTES, must
send its first bytes within ``first_byte_timeout`` seconds and authenticate within
``auth_timeout``.

Admission (``Server._admit``) keeps anyone from locking others out. Unauthenticated TCP
connections are capped per source address (``max_preauth_per_source``; an IPv6 /64 is one
source) and in total (``max_preauth_connections``); when the total is reached, a newcomer takes
the place of the oldest waiting connection of the source holding the most, unless its own source
holds as many. When every connection slot is taken, a trusted newcomer (Unix socket, or TCP
without a token) takes the place of a connection waiting to authenticate, else of the one idle
longest if it has been idle long enough. Idle connections are closed after ``idle_timeout``.
The listen backlog is sized from ``max_connections``, so a burst of connects is accepted and
answered OVERLOADED instead of failing in the kernel. Warnings a stranger can cause at will are
rate-limited (``logs.LogLimiter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import itertools
import logging
import os
import socket
import stat
import time
from collections import deque
from pathlib import Path
from typing import Any

from ..errors import EdgeAgentError, InvalidArgument
from ..logs import LogLimiter, kv
from ..options import ServeOptions
from ..protocol import (
    ERROR_NOTIFICATION,
    AlreadyRunning,
    AuthArgs,
    AuthFailed,
    AuthRequired,
    BadRequest,
    Decoder,
    Limits,
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
from .service import Service

__all__ = ["PREAUTH_MAX_BYTES", "Server", "check_socket_free", "listen_backlog", "source_of"]

log = logging.getLogger("edge_agent.server")

# sun_path is 108 bytes on Linux and 104 on macOS/BSD, including the terminating NUL.
_MAX_SOCKET_PATH = 103
# Before auth a TCP peer can send only hello/auth: a few hundred bytes. Anything larger is not a
# client of ours, and must not make us buffer megabytes for a stranger.
PREAUTH_MAX_BYTES = 4096
PREAUTH_METHODS = frozenset({"hello", "auth"})
# A connection idle this long (or idle_timeout / 2, if shorter) may be closed to make room for a
# new client when every slot is taken; younger ones are left alone, so a burst of connects
# cannot make the daemon close clients that are about to send their first request.
EVICT_IDLE_AFTER_S = 10.0
# Warnings a peer can cause at will (refusals, bad frames, wrong tokens): at most this many
# lines per event per window; the rest are counted and reported (logs.LogLimiter).
LOG_BURST = 10
LOG_WINDOW_S = 60.0
# How often idle connections are looked for (and suppressed-log counts reported), at most.
_SWEEP_S = 1.0
# A refused connection is half-closed and kept (reading and dropping) until the peer closes it,
# for at most this long: a client that writes its first request before it reads must find our
# OVERLOADED notification, not a reset (EPIPE, RST) that discards it. At most _LINGER_MAX at once;
# beyond that a refused connection is closed at once.
REFUSAL_LINGER_S = 1.0
_LINGER_MAX = 256
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


def listen_backlog(max_connections: int) -> int:
    """The listen() backlog: room for a burst several times the connection limit, so that
    connects beyond the limit are accepted and answered OVERLOADED rather than failing in the
    kernel (EAGAIN on a Unix socket, a dropped SYN on TCP). Linux caps it at
    net.core.somaxconn (4096 by default)."""
    return min(max(512, 4 * max_connections), 65535)


def source_of(peer: Any) -> str:
    """The source a TCP peer counts against for the per-source pre-auth cap: its IPv4 address
    (an IPv4-mapped IPv6 address counts as that IPv4 address), or its IPv6 /64, since one
    host can use any address of its /64."""
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


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


class _Connection(asyncio.Protocol):
    """One client connection: bytes in through its own Decoder, replies out as they finish.

    A Protocol, not a stream reader task: a request is decoded and started in the callback that
    received its bytes, and its reply is written from the callback that completes it, so a
    request costs no task switches of its own (the embed batcher adds none either).

    Limits: at most ``max_in_flight`` requests run at once (reading pauses beyond that); before
    TCP auth, one request at a time and messages of at most PREAUTH_MAX_BYTES; a reply the peer
    does not read pauses reading too, so a slow reader cannot make us buffer without bound.
    ``last_active`` (bytes received, a reply written) is what the idle timeout measures.
    """

    def __init__(self, server: Server, transport_kind: str, authenticated: bool) -> None:
        self.server = server
        self.id = next(server._ids)
        self.transport_kind = transport_kind
        self.authenticated = authenticated
        self.peer = ""
        self.source = ""  # TCP: what the per-source pre-auth cap counts (source_of)
        self.transport: asyncio.Transport | None = None
        self.decoder = Decoder(server.limits)
        self.backlog: deque[Any] = deque()  # decoded messages not started yet
        self.in_flight: dict[asyncio.Future[Any], Request] = {}
        self.broken = False  # the peer is gone or the conversation ended: write nothing more
        self.admitted = False
        self.eof = False
        self.first = transport_kind == "tcp"
        self.read_paused = False
        self.write_paused = False
        self.auth_timer: asyncio.TimerHandle | None = None
        self.linger_timer: asyncio.TimerHandle | None = None  # refused: closing (Server._linger)
        self.received = False  # any byte yet (the first-byte deadline)
        self.last_active = time.monotonic()
        self.closed = asyncio.get_running_loop().create_future()

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        if self.transport_kind == "tcp":
            peer = transport.get_extra_info("peername")
            self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
            self.source = source_of(peer)
        refusal = self.server._admit(self)
        if refusal is not None:
            self.broken = True
            with contextlib.suppress(Exception):
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(
                    encode_notification(ERROR_NOTIFICATION, {"error": error_to_wire(refusal)})
                )
            self.server._linger(self)
            return
        self.admitted = True
        if not self.authenticated:
            server = self.server
            loop = asyncio.get_running_loop()
            if server.first_byte_timeout < server.auth_timeout:
                self.auth_timer = loop.call_later(
                    server.first_byte_timeout, self._first_byte_deadline
                )
            else:
                self.auth_timer = loop.call_later(server.auth_timeout, self._auth_timed_out)

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        self.last_active = time.monotonic()
        self.received = True
        if self.first and data:
            self.first = False
            if data.startswith(_HTTP_METHODS):
                # An HTTP client (a browser, curl, a scanner) found this port: tell it in its
                # own language instead of a msgpack error it cannot show.
                self.server.http_rejected += 1
                self.server._warn("http_rejected", conn=self.id, peer=self.peer)
                self._write(_HTTP_REPLY)
                self._end()
                return
        try:
            self._feed(data)
        except ProtocolError as exc:
            self._fatal(exc)
            return
        self._pump()

    def eof_received(self) -> bool:
        if self.decoder.pending_bytes and not self.broken:
            self.server.protocol_errors += 1
            self.server._warn("truncated_frame", conn=self.id, bytes=self.decoder.pending_bytes)
        self.eof = True
        # A client may half-close after its requests: their replies are still owed, so keep
        # the transport open for writing until they are sent.
        self._close_if_done()
        return not self.broken and self.transport is not None and not self.transport.is_closing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        if self.auth_timer is not None:
            self.auth_timer.cancel()
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            self.server._lingering.discard(self)
        for future, request in list(self.in_flight.items()):
            # A queued embed whose caller left costs engine time for nobody: drop it. Other
            # work (an index write) runs to completion; only its reply has nowhere to go.
            if request.method == "embed":
                future.cancel()
        if self.admitted:
            self.server._release(self)
            log.debug(
                "%s", kv(event="disconnected", conn=self.id, open=len(self.server._connections))
            )
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_active = time.monotonic()  # the peer is reading what we wrote
        self._update_reading()

    def idle_for(self, now: float) -> float:
        """Seconds since the last sign of life; 0 while a request is being served."""
        if self.in_flight or self.backlog or self.broken:
            return 0.0
        return now - self.last_active

    # -- reading --------------------------------------------------------------------------------

    def _limit(self) -> int:
        return self.server.limits.max_message_bytes if self.authenticated else PREAUTH_MAX_BYTES

    def _feed(self, data: bytes) -> None:
        """Decode ``data`` into the backlog (the decoder enforces the current message limit)."""
        for message in self.decoder.feed_iter(data, self._limit):
            self.backlog.append(message)
            if not self.authenticated:
                # Before auth, requests run as they are decoded: an `auth` earlier in this
                # chunk lifts the small pre-auth limit for the bytes after it.
                self._pump()
                if self.broken:
                    return

    def _pump(self) -> None:
        """Start backlogged requests while there is room, then pause or resume reading."""
        while self.backlog and not self.broken:
            if self.authenticated:
                if len(self.in_flight) >= self.server.max_in_flight:
                    break
            elif self.in_flight:
                # One at a time before auth: a request pipelined after `auth` must see its
                # outcome, and a stranger gets no concurrency.
                break
            try:
                self._dispatch(self.backlog.popleft())
            except ProtocolError as exc:
                self._fatal(exc)
                return
        self._update_reading()
        self._close_if_done()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.broken or transport.is_closing():
            return
        full = bool(self.backlog) or len(self.in_flight) >= self.server.max_in_flight
        want_paused = full or self.write_paused
        if want_paused and not self.read_paused:
            transport.pause_reading()
            self.read_paused = True
        elif not want_paused and self.read_paused and not self.eof:
            transport.resume_reading()
            self.read_paused = False

    # -- requests -------------------------------------------------------------------------------

    def _dispatch(self, obj: Any) -> None:
        try:
            message = parse_message(obj)
        except BadRequest as exc:
            msgid = exc.data.get("msgid")
            if msgid is None:
                raise  # nothing to answer to: fatal for this connection
            self._write(encode_response(msgid, error_to_wire(exc), None))
            return
        if isinstance(message, Request):
            self._start(message)
        elif isinstance(message, Notification):
            log.debug("%s", kv(event="notification_ignored", conn=self.id, method=message.method))
        else:
            log.debug("%s", kv(event="response_ignored", conn=self.id, msgid=message.msgid))

    def _start(self, request: Request) -> None:
        server = self.server
        started = time.perf_counter()
        try:
            if server._closing:
                raise ShuttingDown("the daemon is shutting down")
            if request.method == "auth":
                self._reply(request, started, server._auth(self, request.params))
                return
            if not self.authenticated and request.method not in PREAUTH_METHODS:
                raise AuthRequired(
                    f"{request.method[:80]} needs authentication: call auth with the token first"
                )
            future = server.service.submit(request.method, request.params)
        except AuthFailed as exc:
            # Wrong token: answer, then hang up, so every guess costs a new connection.
            self._write(encode_response(request.msgid, error_to_wire(exc), None))
            self._end()
            return
        except EdgeAgentError as exc:
            self._write(encode_response(request.msgid, error_to_wire(exc), None))
            return
        except Exception:
            log.exception("%s", kv(event="internal_error", method=request.method[:80]))
            error = error_to_wire(EdgeAgentError("internal error"))
            self._write(encode_response(request.msgid, error, None))
            return
        if future.done():
            self._finish(request, started, future)
            return
        self.in_flight[future] = request
        future.add_done_callback(functools.partial(self._completed, request, started))

    def _completed(self, request: Request, started: float, future: asyncio.Future[Any]) -> None:
        self.in_flight.pop(future, None)
        self._finish(request, started, future)
        self._pump()

    def _finish(self, request: Request, started: float, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            if self.server._closing and not self.broken:
                # Shutdown ran out of grace: say so while the connection is still usable.
                error = error_to_wire(ShuttingDown("the daemon is shutting down"))
                self._write(encode_response(request.msgid, error, None))
            return
        exc = future.exception()
        if exc is None:
            self._reply(request, started, future.result())
            return
        if isinstance(exc, EdgeAgentError):
            payload = encode_response(request.msgid, error_to_wire(exc), None)
        else:
            log.error(
                "%s", kv(event="internal_error", method=request.method[:80]), exc_info=exc
            )
            error = error_to_wire(EdgeAgentError(f"internal error: {type(exc).__name__}"))
            payload = encode_response(request.msgid, error, None)
        self._write(payload)

    def _reply(self, request: Request, started: float, result: Any) -> None:
        server = self.server
        if request.method == "hello" and isinstance(result, dict) and server.tcp is not None:
            result = {
                **result,
                "capabilities": sorted({*result.get("capabilities", ()), "auth"}),
                "auth": {
                    "required": self.transport_kind == "tcp" and server.auth_token is not None,
                    "authenticated": self.authenticated,
                },
            }
        try:
            payload = encode_response(request.msgid, None, result)
        except Exception:
            log.exception("%s", kv(event="internal_error", method=request.method[:80]))
            error = error_to_wire(EdgeAgentError("internal error: unencodable result"))
            payload = encode_response(request.msgid, error, None)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s",
                kv(
                    event="request",
                    conn=self.id,
                    msgid=request.msgid,
                    method=request.method[:80],
                    ms=(time.perf_counter() - started) * 1000,
                ),
            )
        self._write(payload)

    # -- writing and ending ---------------------------------------------------------------------

    def _write(self, payload: bytes) -> None:
        if self.broken or self.transport is None or self.transport.is_closing():
            return
        self.last_active = time.monotonic()
        self.transport.write(payload)

    def _fatal(self, exc: ProtocolError) -> None:
        """A frame we cannot decode (or a limit broken): say why, then end the conversation."""
        self.server.protocol_errors += 1
        self.server._warn(
            "protocol_error", conn=self.id, peer=self.peer or "-", code=exc.code.name, error=exc
        )
        self._write(encode_notification(ERROR_NOTIFICATION, {"error": error_to_wire(exc)}))
        # Replies still being computed would follow an error that ended the conversation.
        for future in list(self.in_flight):
            future.cancel()
        self._end()

    def _first_byte_deadline(self) -> None:
        self.auth_timer = None
        if self.authenticated or self.broken:
            return
        server = self.server
        if not self.received:
            # A client sends hello or auth as soon as it connects: silence is a held slot.
            self._fatal(
                AuthRequired(
                    f"nothing received within {server.first_byte_timeout:g} s; closing",
                    timeout_s=server.first_byte_timeout,
                )
            )
            return
        remaining = server.auth_timeout - server.first_byte_timeout
        self.auth_timer = asyncio.get_running_loop().call_later(remaining, self._auth_timed_out)

    def _auth_timed_out(self) -> None:
        self.auth_timer = None
        if self.authenticated or self.broken:
            return
        self._fatal(
            AuthRequired(
                f"not authenticated within {self.server.auth_timeout:g} s; closing",
                timeout_s=self.server.auth_timeout,
            )
        )

    def _evict(self, notice: ProtocolError | None) -> None:
        """Closed to make room for a new client: say why (``notice``) or, for an idle one, just
        close, as an idle timeout does (clients reconnect on their next call)."""
        for future in list(self.in_flight):
            future.cancel()
        if notice is None:
            self._end()
            return
        self._write(encode_notification(ERROR_NOTIFICATION, {"error": error_to_wire(notice)}))
        self.broken = True
        self.backlog.clear()
        if self.read_paused and self.transport is not None:
            self.transport.resume_reading()  # to see the peer's EOF (what it sends is dropped)
            self.read_paused = False
        self.server._linger(self)

    def _end(self) -> None:
        """Write nothing more; close once what is already written is flushed."""
        self.broken = True
        self.backlog.clear()
        if self.transport is not None:
            self.transport.close()

    def _close_if_done(self) -> None:
        if self.eof and not self.backlog and not self.in_flight and self.transport is not None:
            self.broken = True
            self.transport.close()


class Server:
    def __init__(
        self,
        service: Service,
        socket_path: Path,
        *,
        limits: Limits | None = None,
        # The defaults are ServeOptions' (options.py), the one place they are written.
        max_connections: int = ServeOptions.max_connections,
        max_in_flight: int = 64,
        tcp: tuple[str, int] | None = None,
        auth_token: str | None = None,
        auth_timeout: float = ServeOptions.auth_timeout,
        max_preauth_connections: int = ServeOptions.max_preauth_connections,
        max_preauth_per_source: int = ServeOptions.max_preauth_per_source,
        first_byte_timeout: float = ServeOptions.first_byte_timeout,
        idle_timeout: float = ServeOptions.idle_timeout,
    ) -> None:
        if (
            max_connections < 1
            or max_in_flight < 1
            or max_preauth_connections < 1
            or max_preauth_per_source < 1
        ):
            raise InvalidArgument("connection limits must be positive")
        if not 0 < auth_timeout <= 600:
            raise InvalidArgument(f"auth_timeout must be in (0, 600] s, got {auth_timeout!r}")
        if not 0 < first_byte_timeout <= 600:
            raise InvalidArgument(
                f"first_byte_timeout must be in (0, 600] s, got {first_byte_timeout!r}"
            )
        if not 0 <= idle_timeout <= 86400:
            raise InvalidArgument(
                f"idle_timeout must be in [0, 86400] s (0: never), got {idle_timeout!r}"
            )
        self.service = service
        self.socket_path = Path(socket_path)
        self.limits = limits or Limits()
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight  # per connection; beyond it we stop reading
        self.tcp = tcp
        self.auth_token = auth_token
        self.auth_timeout = auth_timeout
        self.max_preauth_connections = max_preauth_connections
        self.max_preauth_per_source = max_preauth_per_source
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout  # 0: never
        self.listen_backlog = listen_backlog(max_connections)
        self.tcp_port: int | None = None  # the bound port (``tcp`` may ask for port 0)
        self._server: asyncio.base_events.Server | None = None
        self._tcp_server: asyncio.base_events.Server | None = None
        self._socket_id: tuple[int, int] | None = None
        self._connections: set[_Connection] = set()
        # Connections waiting to authenticate, by source, oldest first (dicts keep order).
        self._preauth: dict[str, dict[_Connection, None]] = {}
        self._preauth_count = 0
        self._ids = itertools.count(1)
        self._closing = False
        self._sweeper: asyncio.Task[None] | None = None
        self._lingering: set[_Connection] = set()  # refused, half-closed (_linger)
        self._log_limiter = LogLimiter(LOG_BURST, LOG_WINDOW_S)
        self.accepted = 0
        self.rejected = 0
        self.evicted = 0
        self.idle_closed = 0
        self.protocol_errors = 0
        self.auth_failures = 0
        self.http_rejected = 0
        self._limits_report: dict[str, Any] = {
            "max_message_bytes": self.limits.max_message_bytes,
            "max_array_len": self.limits.max_array_len,
            "max_map_len": self.limits.max_map_len,
            "max_connections": max_connections,
            "max_in_flight_per_connection": max_in_flight,
            "idle_timeout_s": idle_timeout,
            "listen_backlog": self.listen_backlog,
        }
        if tcp is not None:
            self._limits_report.update(
                preauth_max_message_bytes=PREAUTH_MAX_BYTES,
                auth_timeout_s=auth_timeout,
                first_byte_timeout_s=first_byte_timeout,
                max_preauth_connections=max_preauth_connections,
                max_preauth_per_source=max_preauth_per_source,
            )

    def transport_limits(self) -> dict[str, Any]:
        """The limits this transport enforces (``hello``'s ``limits``)."""
        return dict(self._limits_report)

    def stats(self) -> dict[str, Any]:
        """The ``transport`` section of ``stats``."""
        return self._stats()

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
            "tcp_connections": sum(c.transport_kind == "tcp" for c in self._connections),
            "preauth_connections": self._preauth_count,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "evicted": self.evicted,
            "idle_closed": self.idle_closed,
            "protocol_errors": self.protocol_errors,
            "auth_failures": self.auth_failures,
            "http_rejected": self.http_rejected,
        }

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = _bind(self.socket_path)
        st = os.stat(self.socket_path)
        self._socket_id = (st.st_dev, st.st_ino)
        try:
            # The socket's mode (0600) already limits who can connect: no auth step.
            self._server = await loop.create_unix_server(
                lambda: _Connection(self, "unix", authenticated=True),
                sock=sock,
                backlog=self.listen_backlog,
            )
        except BaseException:
            sock.close()
            self._remove_socket()
            raise
        log.info("%s", kv(event="listening", address=self.address))
        self._sweeper = loop.create_task(self._sweep(), name="edge-agent-connection-sweep")
        if self.tcp is None:
            return
        host, port = self.tcp
        try:
            self._tcp_server = await loop.create_server(
                lambda: _Connection(self, "tcp", authenticated=self.auth_token is None),
                host,
                port,
                reuse_address=True,
                backlog=self.listen_backlog,
            )
        except OSError as exc:
            self._server.close()
            self._remove_socket()
            self._sweeper.cancel()
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
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.service.begin_shutdown()
        for listener in (self._server, self._tcp_server):
            if listener is not None:
                listener.close()
        self._remove_socket()
        pending = {future for conn in self._connections for future in conn.in_flight}
        if pending:
            log.info("%s", kv(event="draining", requests=len(pending), grace_s=grace))
            _, late = await asyncio.wait(pending, timeout=grace)
            for future in late:
                future.cancel()  # the connection answers SHUTTING_DOWN for it
            if late:
                await asyncio.wait(late, timeout=2.0)
        for conn in list(self._connections):
            conn._end()
        for conn in list(self._lingering):
            if conn.transport is not None:
                conn.transport.close()
        waiting = [conn.closed for conn in self._connections if not conn.closed.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=2.0)
        for listener in (self._server, self._tcp_server):
            if listener is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(listener.wait_closed(), timeout=2.0)
        self._report_suppressed(everything=True)
        log.info("%s", kv(event="stopped", address=self.address))

    # -- connections --------------------------------------------------------------------------

    def _admit(self, conn: _Connection) -> ProtocolError | None:
        """None if ``conn`` may stay (and is now counted), else why it is refused. May close
        other connections to make room (see the module docstring for the rules)."""
        refusal: ProtocolError | None = None
        if self._closing:
            refusal = ShuttingDown("the daemon is shutting down")
        elif not conn.authenticated:
            refusal = self._preauth_room(conn)
        if refusal is None and len(self._connections) >= self.max_connections:
            refusal = self._connection_room(conn)
        if refusal is not None:
            self.rejected += 1
            self._warn(
                "connection_rejected",
                conn=conn.id,
                transport=conn.transport_kind,
                peer=conn.peer or "-",
                code=refusal.code.name,
                reason=refusal.data.get("reason", "-"),
            )
            return refusal
        self.accepted += 1
        self._connections.add(conn)
        if not conn.authenticated:
            self._preauth.setdefault(conn.source, {})[conn] = None
            self._preauth_count += 1
        log.debug(
            "%s",
            kv(
                event="connected",
                conn=conn.id,
                transport=conn.transport_kind,
                peer=conn.peer or "-",
                open=len(self._connections),
            ),
        )
        return None

    def _preauth_room(self, conn: _Connection) -> ProtocolError | None:
        """Room for one more unauthenticated connection from ``conn.source``, or why not."""
        held = len(self._preauth.get(conn.source, ()))
        if held >= self.max_preauth_per_source:
            return Overloaded(
                f"{held} connections from this address are waiting to authenticate; retry later",
                limit=self.max_preauth_per_source,
                reason="preauth_per_source",
            )
        if self._preauth_count < self.max_preauth_connections:
            return None
        victim = self._preauth_victim(held)
        if victim is None:
            return Overloaded(
                f"{self._preauth_count} connections are waiting to authenticate; retry later",
                limit=self.max_preauth_connections,
                reason="preauth_total",
            )
        self._evict(victim, "preauth_total")
        return None

    def _preauth_victim(self, held: int) -> _Connection | None:
        """The oldest waiting connection of the source holding the most waiting slots, if that
        source holds more than ``held`` (the newcomer's own count). A source can only displace
        one holding more than itself, so a flooding address ends up displacing its own
        connections and cannot keep a client of another address out."""
        best: dict[_Connection, None] | None = None
        for conns in self._preauth.values():
            if best is None or (len(conns), -next(iter(conns)).id) > (
                len(best),
                -next(iter(best)).id,
            ):
                best = conns
        if best is None or len(best) <= held:
            return None
        return next(iter(best))

    def _connection_room(self, conn: _Connection) -> ProtocolError | None:
        """Room in a full connection table, or why not. Any newcomer may displace a connection
        waiting to authenticate (by the per-source rule); only a trusted one (Unix socket, TCP
        without a token) may displace an idle trusted connection."""
        held = len(self._preauth.get(conn.source, ())) if not conn.authenticated else -1
        victim = self._preauth_victim(held)
        if victim is not None:
            self._evict(victim, "connections_full")
            return None
        if conn.authenticated:
            idle = self._idlest()
            if idle is not None:
                self._evict(idle, "idle")
                return None
        return Overloaded(
            f"{self.max_connections} connections are open; retry later",
            limit=self.max_connections,
            reason="connections_full",
        )

    def _idlest(self) -> _Connection | None:
        """The authenticated connection idle longest, if idle long enough to be displaced."""
        now = time.monotonic()
        threshold = EVICT_IDLE_AFTER_S
        if self.idle_timeout > 0:
            threshold = min(threshold, self.idle_timeout / 2)
        best, best_idle = None, threshold
        for other in self._connections:
            if other.authenticated:
                idle = other.idle_for(now)
                if idle >= best_idle:
                    best, best_idle = other, idle
        return best

    def _evict(self, victim: _Connection, reason: str) -> None:
        """Close ``victim`` now to make room: one waiting to authenticate is told OVERLOADED
        (its client may retry at once); an idle one is just closed, as by the idle timeout."""
        self.evicted += 1
        self._warn(
            "connection_evicted",
            conn=victim.id,
            transport=victim.transport_kind,
            peer=victim.peer or "-",
            reason=reason,
        )
        notice = None
        if not victim.authenticated:
            notice = Overloaded(
                "closed to make room: too many connections are waiting to authenticate",
                reason=reason,
            )
        self._release(victim)
        victim._evict(notice)

    def _linger(self, conn: _Connection) -> None:
        """Close refused or displaced ``conn`` without losing the notification just written to
        it (see REFUSAL_LINGER_S): half-close now, close at the peer's EOF or after the delay.
        Its slot is already free; only the socket lingers."""
        transport = conn.transport
        if transport is None:
            return
        if self._closing or len(self._lingering) >= _LINGER_MAX or not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except Exception:  # already closing or reset: nothing left to protect
            transport.close()
            return
        self._lingering.add(conn)

        def close() -> None:
            self._lingering.discard(conn)
            transport.close()

        conn.linger_timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, close)

    def _release(self, conn: _Connection) -> None:
        """Stop counting ``conn`` (closed, evicted). Safe to call more than once."""
        self._connections.discard(conn)
        self._forget_preauth(conn)

    def _forget_preauth(self, conn: _Connection) -> None:
        conns = self._preauth.get(conn.source)
        if conns is not None and conn in conns:
            del conns[conn]
            self._preauth_count -= 1
            if not conns:
                del self._preauth[conn.source]

    async def _sweep(self) -> None:
        """Close connections idle past idle_timeout; report suppressed log lines."""
        interval = _SWEEP_S if self.idle_timeout <= 0 else min(_SWEEP_S, self.idle_timeout / 4)
        while not self._closing:
            await asyncio.sleep(interval)
            try:
                self._close_idle()
                self._report_suppressed()
            except Exception:  # a bug here must not end the sweeping for good
                log.exception("%s", kv(event="internal_error", where="connection_sweep"))

    def _close_idle(self) -> None:
        if self.idle_timeout <= 0:
            return
        now = time.monotonic()
        for conn in list(self._connections):
            # Connections waiting to authenticate have their own, shorter deadlines.
            if conn.authenticated and conn.idle_for(now) >= self.idle_timeout:
                self.idle_closed += 1
                self._release(conn)
                conn._evict(None)
                self._info("idle_closed", conn=conn.id, transport=conn.transport_kind)

    def _report_suppressed(self, everything: bool = False) -> None:
        for event, count in self._log_limiter.flush(everything):
            log.warning(
                "%s",
                kv(
                    event="log_suppressed",
                    of=event,
                    suppressed=count,
                    msg=f"{count} similar {event} messages suppressed",
                ),
            )

    def _warn(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def _info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        """One line, unless this event has already been logged LOG_BURST times in the last
        LOG_WINDOW_S seconds; the first line after suppressed ones says how many there were."""
        if not log.isEnabledFor(level):
            return
        suppressed = self._log_limiter.allow(event)
        if suppressed is None:
            return
        if suppressed:
            fields["suppressed"] = suppressed
        log.log(level, "%s", kv(event=event, **fields))

    def _auth(self, conn: _Connection, params: Any) -> dict[str, Any]:
        args = AuthArgs.from_args(named_args(params))
        if conn.transport_kind == "unix" or self.auth_token is None:
            return {"authenticated": True, "required": False}
        # Constant-time: the comparison must not reveal how many leading bytes were right.
        if hmac.compare_digest(args.token.encode("utf-8"), self.auth_token.encode("utf-8")):
            if not conn.authenticated:
                conn.authenticated = True
                conn.last_active = time.monotonic()  # idle time counts from here
                self._forget_preauth(conn)
            if conn.auth_timer is not None:
                conn.auth_timer.cancel()
                conn.auth_timer = None
            log.info("%s", kv(event="authenticated", conn=conn.id, peer=conn.peer))
            return {"authenticated": True, "required": True}
        self.auth_failures += 1
        self._warn("auth_failed", conn=conn.id, peer=conn.peer)
        raise AuthFailed("wrong token")
