"""The HTTP listener: uvicorn's HTTP/1.1 protocol (h11) on the daemon's own event loop.

uvicorn parses HTTP and runs the ASGI app; this module adds what a long-running daemon on a LAN
needs and uvicorn lacks: a deadline for a request's head (slowloris), a cap on open
connections where a newcomer displaces the longest-idle connection (an idle-connection flood
cannot lock clients out), and start/stop driven by the daemon (no signal handlers of its own,
no lifespan, no logging setup). Bodies have their own limit and deadline in ``routes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import OrderedDict
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from ...errors import EdgeAgentError, InvalidArgument
from ...logs import kv
from . import limits

__all__ = ["HttpServer"]

log = logging.getLogger("edge_agent.http")

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def _bad_head_response() -> bytes:
    body = (
        b'{"error":{"message":"malformed request head, or over %d bytes","type":'
        b'"invalid_request_error","param":null,"code":"BAD_REQUEST","number":400,'
        b'"data":{"limit":%d}}}' % (limits.MAX_HEAD_BYTES, limits.MAX_HEAD_BYTES)
    )
    return (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )


def _busy_response(limit: int) -> bytes:
    body = (
        b'{"error":{"message":"all %d HTTP connections are busy; retry later","type":'
        b'"server_error","param":null,"code":"OVERLOADED","number":403,"data":{"limit":%d}}}'
        % (limit, limit)
    )
    return _BUSY % (len(body), body)


class _Connections:
    """Open connections, oldest activity first; a full table evicts its longest-idle member."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: OrderedDict[_Protocol, None] = OrderedDict()
        self.evicted = 0
        self.refused = 0
        self.head_timeouts = 0
        self.bad_heads = 0

    def admit(self, conn: _Protocol) -> bool:
        if len(self.open) >= self.limit:
            idle = next((c for c in self.open if not c.in_request), None)
            if idle is None:
                self.refused += 1
                return False
            self.evicted += 1
            idle.drop()
        self.open[conn] = None
        return True

    def touch(self, conn: _Protocol) -> None:
        if conn in self.open:
            self.open.move_to_end(conn)

    def forget(self, conn: _Protocol) -> None:
        self.open.pop(conn, None)


class _LingeringTransport:
    """The connection's transport, except that ``close`` lingers (as nginx does): the reply is
    flushed and the write side shut, then whatever the client still sends (the rest of a body
    refused with 413) is read and dropped for up to ``LINGER_S`` and ``LINGER_MAX_BYTES``.
    Closing at once with unread bytes would send a TCP reset, which can destroy the 413 before
    the client reads it."""

    def __init__(self, transport: asyncio.Transport, owner: _Protocol) -> None:
        self._transport = transport
        self._owner = owner
        self.lingering = False
        self.dropped = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        self.lingering = True
        try:
            self._transport.resume_reading()
            if self._transport.can_write_eof():
                self._transport.write_eof()
        except (OSError, RuntimeError):
            self._transport.close()
            return
        self._owner.loop.call_later(limits.LINGER_S, self.abort)

    def abort(self) -> None:
        self.lingering = True
        self._transport.close()


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline and the connection table."""

    table: _Connections  # set on the per-server subclass

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    @property
    def in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # asyncio sets this only on sockets created with proto IPPROTO_TCP, and ours is
            # bound by socket.create_server (proto 0): without it a reply written in two parts
            # waits ~40 ms for the client's delayed ACK (Nagle).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lingering = _LingeringTransport(transport, self)
        super().connection_made(self._lingering)  # type: ignore[arg-type]
        if not self.table.admit(self):
            self.transport.write(_busy_response(self.table.limit))
            self.transport.close()
            return
        self._arm_head_timer()

    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self._lingering.lingering:
            self._lingering.abort()  # the client read our reply and is done
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lingering.lingering = True  # gone: nothing left to linger for
        self._cancel_head_timer()
        self.table.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering.lingering:
            # The rest of a refused request: dropped unread, up to a bound.
            self._lingering.dropped += len(data)
            if self._lingering.dropped > limits.LINGER_MAX_BYTES:
                self._lingering.abort()
            return
        self.table.touch(self)
        super().data_received(data)
        if self.in_request:
            self._cancel_head_timer()  # the head is complete; the body has its own deadline
        elif self._head_timer is None and not self.transport.is_closing():
            self._arm_head_timer()  # bytes of the next request's head

    def on_response_complete(self) -> None:
        self._cancel_head_timer()
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a head h11 cannot parse (or too large), in our JSON shape."""
        self.table.bad_heads += 1
        self._cancel_head_timer()
        self.transport.write(_bad_head_response())
        self.transport.close()

    def drop(self) -> None:
        self._cancel_head_timer()
        self._lingering.abort()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(limits.HEAD_TIMEOUT_S, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.in_request and not self.transport.is_closing():
            self.table.head_timeouts += 1
            self._lingering.abort()


class HttpServer:
    """Serves ``app`` on ``host:port`` (port 0: any free port) from the running loop."""

    def __init__(self, app: ASGIApp, host: str, port: int, *, max_connections: int) -> None:
        self.host, self.port = host, port
        self.table = _Connections(max_connections)
        protocol = type("BoundProtocol", (_Protocol,), {"table": self.table})
        self._config = uvicorn.Config(
            app,
            http=protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=limits.KEEP_ALIVE_S,
            h11_max_incomplete_event_size=limits.MAX_HEAD_BYTES,
            ws="none",
        )
        self._server = uvicorn.Server(self._config)
        self._socket: socket.socket | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        return {
            "http_connections": len(self.table.open),
            "http_connections_evicted": self.table.evicted,
            "http_connections_refused": self.table.refused,
            "http_head_timeouts": self.table.head_timeouts,
            "http_bad_heads": self.table.bad_heads,
        }

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family, backlog=1024)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot listen for HTTP on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)
        try:
            await self._server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        log.info("%s", kv(event="http_listening", address=self.address))

    async def close(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish for up to ``grace`` seconds, close."""
        if not self._server.started:
            if self._socket is not None:
                self._socket.close()
            return
        self._config.timeout_graceful_shutdown = max(1, round(grace))
        with contextlib.suppress(EdgeAgentError, OSError):
            await self._server.shutdown()
        self._server.started = False
