"""Clients for the daemon: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak docs/protocol.md over the Unix socket or TCP and raise the same typed exceptions the
server raised (errors.py and protocol.py classes, matched by code). Importing this module loads
no engine code (llama.cpp, hnswlib): only msgpack and numpy.

Addresses: a socket path (``/run/edge-agent/agent.sock``, ``unix:PATH``), or TCP as
``tcp://HOST:PORT`` / ``HOST:PORT`` / ``[IPv6]:PORT``. Over TCP a token (argument, else
$EDGE_AGENT_TOKEN) is sent with ``auth`` on every new connection.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from ._version import __version__
from .addresses import parse_host_port
from .errors import InvalidArgument
from .paths import default_paths
from .protocol import (
    ERROR_NOTIFICATION,
    PROTOCOL_VERSION,
    AddArgs,
    AddVectorsArgs,
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
    SearchArgs,
    SearchHit,
    decode_vectors,
    encode_request,
    encode_vectors,
    error_from_wire,
    named_args,
    parse_message,
)

if TYPE_CHECKING:  # at run time the LAN layer (zeroconf) is imported on first use
    from .lan.fleet import FleetResult

__all__ = [
    "AsyncClient",
    "Client",
    "EmbedResult",
    "Endpoint",
    "SearchHit",
    "async_fleet_search",
    "fleet_search",
    "parse_address",
]

# Replies are not bounded by the server's request limit: a batch of long vectors can exceed it.
DEFAULT_MAX_RESPONSE_BYTES = 1 << 30
_RESPONSE_LIMITS_ARRAY = 1 << 24
_RESPONSE_LIMITS_MAP = 1 << 16
_READ_CHUNK = 256 << 10
# Safe to send twice: they change nothing on the server.
IDEMPOTENT_METHODS = frozenset({"hello", "health", "stats", "embed", "search", "get", "count"})
CLIENT_NAME = f"edge-agent-python/{__version__}"


@dataclass(frozen=True)
class Endpoint:
    """Where a daemon listens: a Unix socket ``path``, or TCP ``host`` and ``port``."""

    path: Path | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_tcp(self) -> bool:
        return self.host is not None

    def __str__(self) -> str:
        if self.host is None:
            return str(self.path)
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(address: str | os.PathLike[str] | Endpoint | None) -> Endpoint:
    """A socket path, ``unix:PATH``, ``tcp://HOST:PORT``, ``HOST:PORT`` or ``[V6]:PORT``;
    None: $EDGE_AGENT_SOCKET, else the default socket. A string with a ``/`` is a path."""
    if isinstance(address, Endpoint):
        return address
    if address is None:
        env = os.environ.get("EDGE_AGENT_SOCKET")
        return Endpoint(path=Path(env).expanduser() if env else default_paths().default_socket)
    if not isinstance(address, str):
        return Endpoint(path=Path(address).expanduser())
    if address.startswith("unix:"):
        return Endpoint(path=Path(address[5:]).expanduser())
    text = address[6:] if address.startswith("tcp://") else address
    # HOST:PORT as the daemon's --listen reads it (addresses.py); a host is required here,
    # and whatever else (a path with a colon, say) is a socket path.
    if "/" not in text and not text.startswith(":"):
        try:
            host, port = parse_host_port(text)
        except InvalidArgument:
            pass
        else:
            return Endpoint(host=host, port=port)
    if address.startswith("tcp://"):
        raise InvalidArgument(f"a TCP address is tcp://HOST:PORT, got {address!r:.80}")
    return Endpoint(path=Path(address).expanduser())


def _token_for(endpoint: Endpoint, token: str | None) -> str | None:
    if token is not None or not endpoint.is_tcp:
        return token
    return os.environ.get("EDGE_AGENT_TOKEN") or None


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


def _connect_error(endpoint: Endpoint, exc: OSError) -> ConnectionFailed:
    if isinstance(exc, FileNotFoundError):
        reason = "no daemon socket (start one with `edge-agent serve`)"
    elif isinstance(exc, ConnectionRefusedError):
        reason = (
            "connection refused (is `edge-agent serve --listen` running there?)"
            if endpoint.is_tcp
            else "nothing is listening (a daemon died and left its socket)"
        )
    elif isinstance(exc, PermissionError):
        reason = "permission denied (the socket belongs to another user)"
    else:
        reason = str(exc)
    return ConnectionFailed(f"cannot connect to {endpoint}: {reason}", address=str(endpoint))


def _read_message(message: Any) -> Response | Notification:
    try:
        parsed = parse_message(message)
    except BadRequest as exc:
        raise BadResponse(f"malformed message from the daemon: {exc.message}") from None
    if not isinstance(parsed, (Response, Notification)):
        raise BadResponse("the daemon sent a request; this client serves none")
    return parsed


def _responses(decoder: Decoder, data: bytes | None = None) -> Iterator[Response]:
    """The responses decoded from ``data`` (fed first, if given) or already buffered; raises
    the error the daemon sent before closing the connection, if that is what came."""
    for obj in decoder if data is None else decoder.feed_iter(data):
        message = _read_message(obj)
        if isinstance(message, Notification):
            fatal = _fatal_from_notification(message)
            if fatal is not None:
                raise fatal
            continue
        yield message


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


# -- index method arguments and results (shared by both clients) ----------------------------------


def _doc_map(doc: Any, index: int) -> dict[str, Any]:
    if isinstance(doc, Mapping):
        return {k: v for k, v in doc.items() if v is not None}
    if isinstance(doc, tuple) and len(doc) in (2, 3):
        return {"id": doc[0], "text": doc[1], **({"metadata": doc[2]} if len(doc) == 3 else {})}
    raise InvalidArgument(f"docs[{index}] must be a map with id/text/metadata or (id, text)")


def _add_args(
    collection: str,
    docs: Sequence[Any],
    if_exists: str,
    create: bool,
    store_text: bool,
    long_text: str,
) -> dict[str, Any]:
    if isinstance(docs, (str, bytes, Mapping)):
        raise InvalidArgument("docs must be a list of documents")
    args = {
        "collection": collection,
        "docs": [_doc_map(doc, i) for i, doc in enumerate(docs)],
        "if_exists": if_exists,
        "create": create,
        "store_text": store_text,
        "long_text": long_text,
    }
    AddArgs.from_args(args)  # the server checks again; this fails fast, before any bytes move
    return args


def _add_vectors_args(
    collection: str,
    ids: Sequence[str],
    vectors: Any,
    texts: Sequence[str | None] | None,
    metadata: Sequence[Mapping[str, Any] | None] | None,
    if_exists: str,
    create: bool,
) -> dict[str, Any]:
    encoded = encode_vectors(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
    args: dict[str, Any] = {
        "collection": collection,
        "ids": list(ids),
        "vectors": encoded["vectors"],
        "dims": encoded["dims"],
        "if_exists": if_exists,
        "create": create,
    }
    if texts is not None:
        args["texts"] = list(texts)
    if metadata is not None:
        args["metadata"] = [None if m is None else dict(m) for m in metadata]
    AddVectorsArgs.from_args(args)
    return args


def _search_args(
    collection: str,
    text: str | None,
    vector: Any,
    k: int,
    filter: Mapping[str, Any] | None,
    ef: int | None,
    instruction: str | None,
    include_text: bool,
    mode: str | None = None,
    fusion: str | None = None,
    weight: float | None = None,
    explain: bool = False,
) -> dict[str, Any]:
    args: dict[str, Any] = {"collection": collection, "k": k, "include_text": include_text}
    for name, value in (("mode", mode), ("fusion", fusion), ("weight", weight)):
        if value is not None:
            args[name] = value
    if explain:
        args["explain"] = True
    if text is not None:
        args["text"] = text
    if vector is not None:
        encoded = encode_vectors(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        args["vector"], args["dims"] = encoded["vectors"], encoded["dims"]
    if filter:
        args["filter"] = dict(filter)
    if ef is not None:
        args["ef"] = ef
    if instruction is not None:
        args["instruction"] = instruction
    SearchArgs.from_args(args)
    return args


def _hits(result: Any) -> list[SearchHit]:
    if not isinstance(result, dict) or not isinstance(result.get("hits"), list):
        raise BadResponse("search result has no hits list")
    return [SearchHit.from_wire(hit) for hit in result["hits"]]


def _documents(result: Any, with_vectors: bool) -> list[dict[str, Any] | None]:
    if not isinstance(result, dict) or not isinstance(result.get("documents"), list):
        raise BadResponse("get result has no documents list")
    docs = result["documents"]
    if with_vectors:
        vectors = decode_vectors(result.get("vectors"), result.get("dims"), result.get("count"))
        found = [d for d in docs if d is not None]
        if len(found) != len(vectors):
            raise BadResponse(f"{len(vectors)} vectors for {len(found)} documents")
        for doc, vector in zip(found, vectors, strict=True):
            doc["vector"] = vector
    return docs


def _create_args(
    name: str,
    dimensions: int | None,
    backend: str | None,
    uri: str | None,
    token_file: str | None,
) -> dict[str, Any]:
    args: dict[str, Any] = {"action": "create", "name": name}
    for key, value in (
        ("dimensions", dimensions),
        ("backend", backend),
        ("uri", uri),
        ("token_file", token_file),
    ):
        if value is not None:
            args[key] = value
    return args


def _ids_page(result: Any) -> dict[str, Any]:
    if (
        not isinstance(result, dict)
        or not isinstance(result.get("ids"), list)
        or not all(isinstance(i, str) for i in result["ids"])
        or not (result.get("next") is None or isinstance(result.get("next"), str))
    ):
        raise BadResponse("collections ids result has no ids list")
    return result


def _int_field(result: Any, name: str) -> int:
    if not isinstance(result, dict) or not isinstance(result.get(name), int):
        raise BadResponse(f"result has no integer {name}")
    return result[name]


def _collection_list(result: Any) -> list[dict[str, Any]]:
    if not isinstance(result, dict) or not isinstance(result.get("collections"), list):
        raise BadResponse("collections result has no list")
    return result["collections"]


class Client:
    """Blocking client; one connection, one call at a time (thread-safe by a lock).

    ``timeout`` (seconds, None for none) bounds each call, connecting included.
    """

    def __init__(
        self,
        address: str | os.PathLike[str] | Endpoint | None = None,
        timeout: float | None = 30.0,
        *,
        token: str | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.endpoint = parse_address(address)
        self.socket_path = self.endpoint.path  # None over TCP
        self.timeout = timeout
        self._token = _token_for(self.endpoint, token)
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
        endpoint = self.endpoint
        try:
            if endpoint.is_tcp:
                sock = socket.create_connection(
                    (endpoint.host, endpoint.port), timeout=self._remaining(deadline)
                )
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._remaining(deadline))
                try:
                    assert endpoint.path is not None  # not TCP: a socket path
                    sock.connect(os.fspath(endpoint.path))
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError:
            raise RequestTimeout(f"connecting to {endpoint} timed out") from None
        except OSError as exc:
            raise _connect_error(endpoint, exc) from exc
        self._sock = sock
        self._decoder = Decoder(self._limits)
        if self._token is not None:
            reply = self._roundtrip("auth", {"token": self._token}, deadline)
            if reply.error is not None:
                self._disconnect()
                raise error_from_wire(reply.error)
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
            raise ConnectionFailed(f"connection to {self.endpoint} broke: {exc}") from exc
        decoder = self._decoder
        assert decoder is not None
        while True:
            for message in _responses(decoder):
                if message.msgid == msgid:
                    return message
                # Anything else is a reply we no longer wait for: ignore it.
            try:
                sock.settimeout(self._remaining(deadline))
                data = sock.recv(min(_READ_CHUNK, max(decoder.room(), 1)))
            except TimeoutError:
                raise RequestTimeout(f"{method} timed out after {self.timeout}s") from None
            except OSError as exc:
                raise ConnectionFailed(f"connection to {self.endpoint} broke: {exc}") from exc
            if not data:
                raise ConnectionFailed(f"the daemon at {self.endpoint} closed the connection")
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

    # -- index --------------------------------------------------------------------------------

    def add(
        self,
        collection: str,
        docs: Sequence[Any],
        *,
        if_exists: str = "replace",
        create: bool = True,
        store_text: bool = True,
        long_text: str = "truncate",
    ) -> dict[str, Any]:
        """Embed and store documents: maps with id, text, metadata (or (id, text) pairs).
        Returns {"added", "lsn", "truncated": [indices], "tokens"} once durable."""
        args = _add_args(collection, docs, if_exists, create, store_text, long_text)
        return self.call("add", args)

    def add_vectors(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: Any,
        *,
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        if_exists: str = "replace",
        create: bool = True,
    ) -> dict[str, Any]:
        args = _add_vectors_args(collection, ids, vectors, texts, metadata, if_exists, create)
        return self.call("add_vectors", args)

    def search(
        self,
        collection: str,
        text: str | None = None,
        *,
        vector: Any = None,
        k: int = 10,
        filter: Mapping[str, Any] | None = None,
        ef: int | None = None,
        instruction: str | None = None,
        include_text: bool = True,
        mode: str | None = None,
        fusion: str | None = None,
        weight: float | None = None,
        explain: bool = False,
    ) -> list[SearchHit]:
        """Top-k, best first, by query ``text`` or a ``vector``. ``mode``: "dense"
        (embedding similarity), "keyword" (BM25), "hybrid" (both fused: ``fusion`` "rrf" or
        "weighted" with ``weight`` for the dense part); unset: hybrid for a text query on a
        collection with texts, else dense. ``explain``: hits carry both component scores."""
        args = _search_args(
            collection, text, vector, k, filter, ef, instruction, include_text,
            mode, fusion, weight, explain,
        )  # fmt: skip
        return _hits(self.call("search", args))

    def get(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[dict[str, Any] | None]:
        """Documents by id, in order (None where absent); ``vector`` added on request."""
        args = {"collection": collection, "ids": list(ids), "with_vectors": with_vectors}
        return _documents(self.call("get", args), with_vectors)

    def delete(self, collection: str, ids: Sequence[str]) -> int:
        """Delete by id; returns how many existed."""
        result = self.call("delete", {"collection": collection, "ids": list(ids)})
        return _int_field(result, "deleted")

    def count(self, collection: str) -> int:
        return _int_field(self.call("count", {"collection": collection}), "count")

    def collections(self) -> list[dict[str, Any]]:
        return _collection_list(self.call("collections", {"action": "list"}))

    def create_collection(
        self,
        name: str,
        dimensions: int | None = None,
        *,
        backend: str | None = None,
        uri: str | None = None,
        token_file: str | None = None,
    ) -> dict[str, Any]:
        """A new collection. ``backend``: "local" or "milvus" (unset: the daemon's
        index.backend); for Milvus, ``uri`` (a Milvus Lite *.db path or http://host:19530)
        and ``token_file``, a file on the daemon's host holding the token."""
        return self.call(
            "collections", _create_args(name, dimensions, backend, uri, token_file)
        )

    def collection_ids(
        self, name: str, *, after: str | None = None, limit: int = 1000
    ) -> dict[str, Any]:
        """One page of a collection's ids, sorted: ``ids``, ``next`` (pass it as ``after``
        for the next page; None after the last) and ``total``."""
        args: dict[str, Any] = {"action": "ids", "name": name, "limit": limit}
        if after is not None:
            args["after"] = after
        return _ids_page(self.call("collections", args))

    def drop_collection(self, name: str) -> None:
        self.call("collections", {"action": "drop", "name": name})

    def collection_info(self, name: str) -> dict[str, Any]:
        return self.call("collections", {"action": "info", "name": name})

    # -- LAN discovery --------------------------------------------------------------------------

    @classmethod
    def discover(
        cls,
        agent: str,
        browse_timeout: float = 3.0,
        *,
        token: str | None = None,
        timeout: float | None = 30.0,
        interfaces: Sequence[str] = (),
    ) -> Client:
        """A client connected to the agent with this id (or unique id prefix) or instance name,
        found on the LAN with mDNS (edge_agent.lan.discovery). Each announced address is tried in
        turn; the one whose ``hello`` names the same agent id wins. AgentNotFound otherwise."""
        from .lan.discovery import find_agent

        found = find_agent(agent, browse_timeout, interfaces=interfaces)
        failures: list[str] = []
        for endpoint in found.endpoints():
            client = cls(endpoint, timeout, token=token)
            try:
                reason = _hello_mismatch(client.hello(), found.agent_id)
            except ConnectionFailed as exc:
                reason = exc.message
            except BaseException:
                client.close()
                raise
            if reason is None:
                return client
            client.close()
            failures.append(f"{endpoint}: {reason}")
        raise _unreachable(found.label(), failures)

    @staticmethod
    def fleet_search(collection: str, **kwargs: Any) -> FleetResult:
        """``edge_agent.fleet_search``: one query across every agent on the LAN."""
        return fleet_search(collection, **kwargs)


def _hello_mismatch(hello: Mapping[str, Any], agent_id: str | None) -> str | None:
    """Why this answer is not the agent that was discovered (None: it is). The address may
    have been reused by another daemon since the announcement."""
    theirs = hello.get("agent_id")
    if agent_id is not None and theirs is not None and theirs != agent_id:
        return f"another agent answers there ({theirs})"
    return None


def _unreachable(label: str, failures: Sequence[str]) -> Exception:
    from .errors import AgentNotFound

    return AgentNotFound(
        f"{label} was discovered but no announced address answers as it: {'; '.join(failures)}",
        agent=label,
    )


class _AsyncConnection(asyncio.Protocol):
    """One connection of an AsyncClient. A Protocol: each reply is decoded in the callback that
    received its bytes and handed straight to its caller's future (no reader task between)."""

    def __init__(self, endpoint: Endpoint, limits: Limits) -> None:
        self.endpoint = endpoint
        self.decoder = Decoder(limits)
        self.pending: dict[int, asyncio.Future[Response]] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.error: Exception = ConnectionFailed(
            f"the daemon at {endpoint} closed the connection"
        )
        self._write_ready: asyncio.Future[None] | None = None  # set while writes are paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            # Several replies in one read are fine; one reply over max_response_bytes is not.
            for message in _responses(self.decoder, data):
                future = self.pending.pop(message.msgid, None)
                if future is not None and not future.done():
                    future.set_result(message)
        except ProtocolError as exc:
            self.fail(exc)

    def eof_received(self) -> bool:
        return False  # the daemon hung up: close our side too (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not isinstance(self.error, ProtocolError):
            self.error = ConnectionFailed(f"connection to {self.endpoint} broke: {exc}")
        self.fail(self.error)

    def pause_writing(self) -> None:
        self._write_ready = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)
        self._write_ready = None

    def fail(self, exc: Exception) -> None:
        """End the connection: every caller still waiting gets ``exc``."""
        if not self.closed:
            self.closed = True
            self.error = exc
            if self.transport is not None:
                self.transport.close()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)
        self.pending.clear()
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)

    async def send(self, payload: bytes) -> None:
        if self.closed or self.transport is None:
            raise self.error
        self.transport.write(payload)
        if self._write_ready is not None:
            # A large request the kernel has not taken yet: wait, so a loop of big calls
            # cannot buffer without bound.
            await self._write_ready


class AsyncClient:
    """asyncio client; concurrent calls share one connection (pipelined, matched by msgid)."""

    def __init__(
        self,
        address: str | os.PathLike[str] | Endpoint | None = None,
        timeout: float | None = 30.0,
        *,
        token: str | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.endpoint = parse_address(address)
        self.socket_path = self.endpoint.path  # None over TCP
        self.timeout = timeout
        self._token = _token_for(self.endpoint, token)
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
            conn.fail(ConnectionFailed("the client was closed"))

    async def _connection(self) -> tuple[_AsyncConnection, bool]:
        """The live connection, and whether it was opened just now."""
        if self._conn is not None and not self._conn.closed:
            return self._conn, False
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn, False
            endpoint = self.endpoint
            loop = asyncio.get_running_loop()

            def factory() -> _AsyncConnection:
                return _AsyncConnection(endpoint, self._limits)

            if endpoint.is_tcp:
                assert endpoint.host is not None and endpoint.port is not None
                opening = loop.create_connection(factory, endpoint.host, endpoint.port)
            else:
                assert endpoint.path is not None
                opening = loop.create_unix_connection(factory, os.fspath(endpoint.path))
            try:
                async with asyncio.timeout(self.timeout):
                    transport, conn = await opening
            except TimeoutError:
                raise RequestTimeout(f"connecting to {endpoint} timed out") from None
            except OSError as exc:
                raise _connect_error(endpoint, exc) from exc
            if endpoint.is_tcp:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
            if self._token is not None:
                response = await self._request(conn, "auth", {"token": self._token})
                if response.error is not None:
                    conn.fail(ConnectionFailed("authentication failed"))
                    raise error_from_wire(response.error)
            return conn, True

    async def _request(
        self, conn: _AsyncConnection, method: str, args: Mapping[str, Any] | None
    ) -> Response:
        msgid = next(self._ids) & 0xFFFFFFFF
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        conn.pending[msgid] = future
        try:
            # asyncio.timeout, not wait_for: no extra task (and loop turn) per request.
            async with asyncio.timeout(self.timeout):
                await conn.send(encode_request(msgid, method, args))
                return await future
        except TimeoutError:
            raise RequestTimeout(f"{method} timed out after {self.timeout}s") from None
        finally:
            conn.pending.pop(msgid, None)  # a late reply is dropped by msgid

    async def call(self, method: str, args: Mapping[str, Any] | None = None) -> Any:
        attempts = 2 if method in IDEMPOTENT_METHODS else 1
        for attempt in range(attempts):
            conn, fresh = await self._connection()
            try:
                response = await self._request(conn, method, args)
            except ConnectionFailed:
                if not fresh and attempt + 1 < attempts:
                    continue
                raise
            if response.error is not None:
                raise error_from_wire(response.error)
            return response.result
        raise AssertionError("unreachable")

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

    # -- index --------------------------------------------------------------------------------

    async def add(
        self,
        collection: str,
        docs: Sequence[Any],
        *,
        if_exists: str = "replace",
        create: bool = True,
        store_text: bool = True,
        long_text: str = "truncate",
    ) -> dict[str, Any]:
        """Embed and store documents: maps with id, text, metadata (or (id, text) pairs).
        Returns {"added", "lsn", "truncated": [indices], "tokens"} once durable."""
        args = _add_args(collection, docs, if_exists, create, store_text, long_text)
        return await self.call("add", args)

    async def add_vectors(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: Any,
        *,
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        if_exists: str = "replace",
        create: bool = True,
    ) -> dict[str, Any]:
        args = _add_vectors_args(collection, ids, vectors, texts, metadata, if_exists, create)
        return await self.call("add_vectors", args)

    async def search(
        self,
        collection: str,
        text: str | None = None,
        *,
        vector: Any = None,
        k: int = 10,
        filter: Mapping[str, Any] | None = None,
        ef: int | None = None,
        instruction: str | None = None,
        include_text: bool = True,
        mode: str | None = None,
        fusion: str | None = None,
        weight: float | None = None,
        explain: bool = False,
    ) -> list[SearchHit]:
        """Top-k, best first, by query ``text`` or a ``vector``. ``mode``: "dense"
        (embedding similarity), "keyword" (BM25), "hybrid" (both fused: ``fusion`` "rrf" or
        "weighted" with ``weight`` for the dense part); unset: hybrid for a text query on a
        collection with texts, else dense. ``explain``: hits carry both component scores."""
        args = _search_args(
            collection, text, vector, k, filter, ef, instruction, include_text,
            mode, fusion, weight, explain,
        )  # fmt: skip
        return _hits(await self.call("search", args))

    async def get(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[dict[str, Any] | None]:
        """Documents by id, in order (None where absent); ``vector`` added on request."""
        args = {"collection": collection, "ids": list(ids), "with_vectors": with_vectors}
        return _documents(await self.call("get", args), with_vectors)

    async def delete(self, collection: str, ids: Sequence[str]) -> int:
        """Delete by id; returns how many existed."""
        result = await self.call("delete", {"collection": collection, "ids": list(ids)})
        return _int_field(result, "deleted")

    async def count(self, collection: str) -> int:
        return _int_field(await self.call("count", {"collection": collection}), "count")

    async def collections(self) -> list[dict[str, Any]]:
        return _collection_list(await self.call("collections", {"action": "list"}))

    async def create_collection(
        self,
        name: str,
        dimensions: int | None = None,
        *,
        backend: str | None = None,
        uri: str | None = None,
        token_file: str | None = None,
    ) -> dict[str, Any]:
        """A new collection. ``backend``: "local" or "milvus" (unset: the daemon's
        index.backend); for Milvus, ``uri`` (a Milvus Lite *.db path or http://host:19530)
        and ``token_file``, a file on the daemon's host holding the token."""
        return await self.call(
            "collections", _create_args(name, dimensions, backend, uri, token_file)
        )

    async def collection_ids(
        self, name: str, *, after: str | None = None, limit: int = 1000
    ) -> dict[str, Any]:
        """One page of a collection's ids, sorted: ``ids``, ``next`` (pass it as ``after``
        for the next page; None after the last) and ``total``."""
        args: dict[str, Any] = {"action": "ids", "name": name, "limit": limit}
        if after is not None:
            args["after"] = after
        return _ids_page(await self.call("collections", args))

    async def drop_collection(self, name: str) -> None:
        await self.call("collections", {"action": "drop", "name": name})

    async def collection_info(self, name: str) -> dict[str, Any]:
        return await self.call("collections", {"action": "info", "name": name})

    # -- LAN discovery --------------------------------------------------------------------------

    @classmethod
    async def discover(
        cls,
        agent: str,
        browse_timeout: float = 3.0,
        *,
        token: str | None = None,
        timeout: float | None = 30.0,
        interfaces: Sequence[str] = (),
    ) -> AsyncClient:
        """``Client.discover`` for asyncio."""
        from .lan.discovery import async_find_agent

        found = await async_find_agent(agent, browse_timeout, interfaces=interfaces)
        failures: list[str] = []
        for endpoint in found.endpoints():
            client = cls(endpoint, timeout, token=token)
            try:
                reason = _hello_mismatch(await client.hello(), found.agent_id)
            except ConnectionFailed as exc:
                reason = exc.message
            except BaseException:
                await client.close()
                raise
            if reason is None:
                return client
            await client.close()
            failures.append(f"{endpoint}: {reason}")
        raise _unreachable(found.label(), failures)

    @staticmethod
    async def fleet_search(collection: str, **kwargs: Any) -> FleetResult:
        """``edge_agent.client.async_fleet_search``."""
        return await async_fleet_search(collection, **kwargs)


# -- fleet search: the LAN layer's algorithm, talking to each agent through an AsyncClient -------


def _connect_agent(address: str, timeout: float, token: str | None) -> AsyncClient:
    return AsyncClient(address, timeout=timeout, token=token)


async def async_fleet_search(collection: str, **kwargs: Any) -> FleetResult:
    """Search ``collection`` on every agent on the LAN and merge the top ``k``.

    The arguments are those of ``edge_agent.lan.fleet.search_fleet`` (text or vector, k,
    filter, ef, agents, browse_timeout, interfaces, timeout, token, fingerprint, raw).
    """
    from .lan.fleet import search_fleet  # deferred: zeroconf is only needed for the LAN

    return await search_fleet(collection, connect=_connect_agent, **kwargs)


def fleet_search(collection: str, **kwargs: Any) -> FleetResult:
    """Blocking ``async_fleet_search`` (same arguments)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(async_fleet_search(collection, **kwargs))
    raise InvalidArgument("called from a running event loop: use async_fleet_search")
