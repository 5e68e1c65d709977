"""The daemon over real Unix sockets, with the real default model.

Each server runs ``app.run_server`` in a background thread with its own event loop and is
stopped through its stop event, as SIGTERM would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from daemon import CONFIG, MAX_MESSAGE, ServerThread, options_for

from edge_agent import protocol
from edge_agent.client import AsyncClient, Client
from edge_agent.daemon.app import run_server
from edge_agent.embedding import inference as inference_module
from edge_agent.embedding.embedder import Embedder
from edge_agent.errors import (
    DimensionsNotSupported,
    EdgeAgentError,
    EmptyText,
    EngineError,
    ErrorCode,
    InvalidArgument,
)
from edge_agent.models import DEFAULT_MODEL, ModelStore
from edge_agent.protocol import (
    AlreadyRunning,
    BadRequest,
    ConnectionFailed,
    Overloaded,
    ProtocolCode,
    RequestTimeout,
    UnknownMethod,
    encode_request,
)


@pytest.fixture(scope="module")
def server(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("srv") / "run" / "edge-agent.sock"
    thread = ServerThread(options_for(model_store, path)).start()
    yield thread
    thread.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.socket_path, timeout=30.0) as c:
        yield c


def raw_connect(path: Path, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(os.fspath(path))
    return sock


def read_until_closed(sock: socket.socket, limit: int = 1 << 22) -> list[Any]:
    """Every message the server sends until it closes the connection."""
    unpacker = msgpack.Unpacker(raw=False)
    total = 0
    while total < limit:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        total += len(data)
        unpacker.feed(data)
    return list(unpacker)


def read_messages(sock: socket.socket, count: int) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False)
    out: list[Any] = []
    while len(out) < count:
        data = sock.recv(65536)
        assert data, "connection closed early"
        unpacker.feed(data)
        out.extend(unpacker)
    return out


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaped over a sleepy hound.",
    "Quarterly revenue grew by twelve percent.",
    "édition française avec des accents",
]


# -- methods ------------------------------------------------------------------------------------


def test_hello(client: Client) -> None:
    hello = client.hello()
    assert hello["protocol"] == protocol.PROTOCOL_VERSION
    assert hello["server"] == "edge-agent"
    assert isinstance(hello["version"], str) and hello["version"]
    assert (hello["model"], hello["quant"], hello["dims"]) == (DEFAULT_MODEL, "F32", 384)
    assert hello["max_tokens"] == 256
    assert {"hello", "embed", "health", "stats"} <= set(hello["capabilities"])
    limits = hello["limits"]
    assert limits["max_message_bytes"] == MAX_MESSAGE
    assert limits["max_texts"] == CONFIG.max_texts
    assert limits["max_connections"] == 64 and limits["max_queue"] == 256


def test_health(client: Client) -> None:
    health = client.health()
    assert health["status"] == "ok"
    assert health["model_loaded"] is True
    assert health["queue_depth"] == 0


def test_embed_matches_in_process(client: Client, embedder: Embedder) -> None:
    remote = client.embed(TEXTS, kind="query")
    local = embedder.embed(TEXTS, kind="query")
    assert remote.vectors.dtype == np.float32 and remote.vectors.shape == (len(TEXTS), 384)
    assert (remote.dims, remote.count) == (384, len(TEXTS))
    cosines = np.sum(remote.vectors * local.vectors, axis=1)
    assert cosines.min() > 0.9999, cosines
    assert remote.token_counts == local.token_counts
    assert remote.truncated == local.truncated and remote.chunks == local.chunks
    assert (remote.model, remote.quant) == (DEFAULT_MODEL, "F32")


def test_embed_long_text_modes(client: Client) -> None:
    long = "word " * 600
    truncated = client.embed([long])
    assert truncated.truncated == [True] and truncated.chunks == [1]
    chunked = client.embed([long, "short"], long_text="chunk")
    assert chunked.chunks[0] > 1 and chunked.chunks[1] == 1
    with pytest.raises(EdgeAgentError) as info:
        client.embed(["fine", long], long_text="error")
    assert info.value.code == ErrorCode.TEXT_TOO_LONG
    assert info.value.data["index"] == 1


def test_stats(client: Client) -> None:
    client.embed(["stats please"])
    stats = client.stats()
    embed = stats["methods"]["embed"]
    assert embed["count"] >= 1
    assert set(embed["latency_ms"]) == {"p50", "p95", "p99"}
    assert stats["embed"]["texts"] >= 1 and stats["embed"]["engine_calls"] >= 1
    assert stats["embed"]["texts_per_s"] > 0
    assert stats["transport"]["connections"] >= 1


def test_concurrent_clients_are_coalesced_and_exact(client: Client, server: ServerThread) -> None:
    texts = [f"request {i}: the {i}th sentence about topic {i * 7 % 13}" for i in range(32)]
    sequential = np.stack([client.embed([t]).vectors[0] for t in texts])
    before = client.stats()["embed"]
    barrier = threading.Barrier(len(texts))
    results: list[np.ndarray | None] = [None] * len(texts)
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            with Client(server.socket_path, timeout=60.0) as own:
                own.health()  # connected before the barrier, so the embeds arrive together
                barrier.wait(timeout=30)
                results[index] = own.embed([texts[index]]).vectors[0]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    concurrent = np.stack([r for r in results if r is not None])
    assert concurrent.shape == sequential.shape
    # Same vectors up to float rounding: llama.cpp sums in a different order in larger batches.
    np.testing.assert_allclose(concurrent, sequential, atol=1e-3)
    assert np.sum(concurrent * sequential, axis=1).min() > 0.9999
    after = client.stats()["embed"]
    requests = after["requests"] - before["requests"]
    engine_calls = after["engine_calls"] - before["engine_calls"]
    assert requests == len(texts)
    assert engine_calls < requests, (engine_calls, requests)


def test_async_client_pipelines_on_one_connection(server: ServerThread, embedder: Embedder) -> None:
    async def main() -> list[protocol.EmbedResult]:
        async with AsyncClient(server.socket_path, timeout=30.0) as aclient:
            assert (await aclient.health())["status"] == "ok"
            results = await asyncio.gather(*(aclient.embed([t]) for t in TEXTS))
            with pytest.raises(UnknownMethod):
                await aclient.call("nope")
            assert (await aclient.hello())["dims"] == 384
            return list(results)

    results = asyncio.run(main())
    local = embedder.embed(TEXTS)
    for index, result in enumerate(results):
        assert float(result.vectors[0] @ local.vectors[index]) > 0.9999


# -- errors keep the connection -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error", "code"),
    [
        ({"texts": "not a list"}, InvalidArgument, ErrorCode.INVALID_ARGUMENT),
        ({"texts": ["fine", ""]}, EmptyText, ErrorCode.EMPTY_TEXT),
        ({"texts": ["fine"], "kind": "passage"}, InvalidArgument, ErrorCode.INVALID_ARGUMENT),
        (
            {"texts": ["fine"], "dimensions": 100},
            DimensionsNotSupported,
            ErrorCode.DIMENSIONS_NOT_SUPPORTED,
        ),
        (
            {"texts": ["fine"], "dimensions": 0},
            DimensionsNotSupported,
            ErrorCode.DIMENSIONS_NOT_SUPPORTED,
        ),
        (
            {"texts": ["fine"], "instruction": "find it"},
            InvalidArgument,
            ErrorCode.INVALID_ARGUMENT,
        ),
        ({"texts": ["fine"], "colour": "red"}, InvalidArgument, ErrorCode.INVALID_ARGUMENT),
    ],
    ids=[
        "texts-not-list",
        "empty-text",
        "unknown-kind",
        "dimensions",
        "dimensions-zero",
        "instruction",
        "unknown-arg",
    ],
)
def test_bad_params_get_typed_error_and_connection_stays(
    client: Client, args: dict[str, Any], error: type[EdgeAgentError], code: int
) -> None:
    client.health()
    sock = client._sock
    with pytest.raises(error) as info:
        client.call("embed", args)
    assert type(info.value) is error and info.value.code == code
    assert client.embed(["still works"]).count == 1
    assert client._sock is sock  # the same connection, not a reconnect


def test_unknown_method_keeps_connection(client: Client) -> None:
    client.health()
    sock = client._sock
    with pytest.raises(UnknownMethod) as info:
        client.call("no.such.method", {"x": 1})
    assert info.value.code == ProtocolCode.UNKNOWN_METHOD
    assert client.health()["status"] == "ok"
    assert client._sock is sock


def test_params_not_one_map_is_bad_request(server: ServerThread) -> None:
    with raw_connect(server.socket_path) as sock:
        sock.sendall(msgpack.packb([0, 5, "health", [1, 2]]) + encode_request(6, "health"))
        first, second = sorted(read_messages(sock, 2), key=lambda m: m[1])
        assert first[:2] == [1, 5] and first[2][0] == ProtocolCode.BAD_REQUEST
        assert second[:3] == [1, 6, None] and second[3]["status"] == "ok"


def test_pipelined_requests_are_all_answered(server: ServerThread) -> None:
    with raw_connect(server.socket_path) as sock:
        payload = b"".join(
            encode_request(i, "embed", {"texts": [f"pipelined {i}"]}) for i in range(10)
        ) + encode_request(10, "health")
        sock.sendall(payload)
        replies = {m[1]: m for m in read_messages(sock, 11)}
        assert sorted(replies) == list(range(11))
        for i in range(10):
            assert replies[i][2] is None and replies[i][3]["count"] == 1


def test_engine_error_in_a_coalesced_batch_reaches_only_its_sender(
    server: ServerThread, client: Client
) -> None:
    # Too many tokens with long_text="error" is found by the engine, after coalescing: the batch
    # is rerun request by request so the good request still succeeds.
    before = client.stats()["embed"]["engine_calls"]
    with raw_connect(server.socket_path) as sock:
        sock.sendall(
            encode_request(1, "embed", {"texts": ["short and fine"], "long_text": "error"})
            + encode_request(2, "embed", {"texts": ["word " * 600], "long_text": "error"})
            + encode_request(3, "embed", {"texts": ["also fine"], "long_text": "error"})
        )
        replies = {m[1]: m for m in read_messages(sock, 3)}
    assert replies[1][2] is None and replies[1][3]["count"] == 1
    assert replies[3][2] is None and replies[3][3]["count"] == 1
    code, name, _message, data = replies[2][2]
    assert (code, name) == (ErrorCode.TEXT_TOO_LONG, "TEXT_TOO_LONG")
    assert data["index"] == 0  # an index into its own texts, not the batch's
    # One coalesced batch then each alone (4 calls), or 3 when the scheduler's slice budget
    # already kept the long text apart: either way no request paid for another's error.
    assert client.stats()["embed"]["engine_calls"] - before in (3, 4)


# -- hostile frames close only their own connection ---------------------------------------------


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xc1garbage bytes", ProtocolCode.MALFORMED_FRAME),
        (b"\xdd\xff\xff\xff\xff", ProtocolCode.MALFORMED_FRAME),
        (b"\x05", ProtocolCode.BAD_REQUEST),  # valid msgpack, not a message: no msgid to answer
        (
            msgpack.packb([0, 1, "embed", [{"texts": ["x" * MAX_MESSAGE]}]]),
            ProtocolCode.MESSAGE_TOO_LARGE,
        ),
        (encode_request(1, "health")[:-3], None),  # truncated, then EOF
    ],
    ids=["garbage", "huge-array-header", "not-a-message", "too-large", "truncated"],
)
def test_bad_frame_closes_only_that_connection(
    server: ServerThread, client: Client, payload: bytes, code: int | None
) -> None:
    client.health()
    sock_before = client._sock
    with raw_connect(server.socket_path) as bad:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            bad.sendall(payload)
        if code is None:
            bad.shutdown(socket.SHUT_WR)
        messages = read_until_closed(bad)
    if code is None:
        assert messages == []
    else:
        # The server says why before closing: an error notification, since no msgid is known.
        assert len(messages) == 1
        kind, method, params = messages[0]
        assert (kind, method) == (protocol.NOTIFICATION, protocol.ERROR_NOTIFICATION)
        assert params[0]["error"][0] == code
    # Everyone else is still served, on their existing connections and on new ones.
    assert client.embed(["unaffected"]).count == 1
    assert client._sock is sock_before
    with Client(server.socket_path) as other:
        assert other.health()["status"] == "ok"


def test_client_raises_the_servers_fatal_error(server: ServerThread) -> None:
    with Client(server.socket_path) as c, pytest.raises(protocol.MessageTooLarge):
        c.embed(["y" * MAX_MESSAGE])


# -- lifecycle ----------------------------------------------------------------------------------


def test_socket_permissions_and_removal(model_store: ModelStore, tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "agent.sock"
    thread = ServerThread(options_for(model_store, path)).start()
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        with Client(path) as c:
            assert c.health()["status"] == "ok"
    finally:
        thread.stop()
    assert not path.exists()


def test_stale_socket_is_replaced(model_store: ModelStore, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(path))
    dead.close()  # a daemon that died without cleaning up
    assert path.exists()
    thread = ServerThread(options_for(model_store, path)).start()
    try:
        with Client(path) as c:
            assert c.health()["status"] == "ok"
    finally:
        thread.stop()


def test_live_socket_is_an_error(model_store: ModelStore, server: ServerThread) -> None:
    started = time.monotonic()
    with pytest.raises(AlreadyRunning, match="another daemon is listening"):
        asyncio.run(run_server(options_for(model_store, server.socket_path), asyncio.Event()))
    assert time.monotonic() - started < 5  # refused before loading the model
    with Client(server.socket_path) as c:
        assert c.health()["status"] == "ok"  # the running daemon is untouched


def test_regular_file_is_never_replaced(model_store: ModelStore, tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(InvalidArgument, match="not a socket"):
        asyncio.run(run_server(options_for(model_store, path), asyncio.Event()))
    assert path.read_text() == "precious"


def test_shutdown_finishes_in_flight_requests(model_store: ModelStore, tmp_path: Path) -> None:
    path = tmp_path / "drain.sock"
    thread = ServerThread(options_for(model_store, path)).start()
    texts = [f"in flight text number {i} " * 8 for i in range(32)]
    try:
        sock = raw_connect(path, timeout=30)
        sock.sendall(encode_request(1, "embed", {"texts": texts}))
        with Client(path) as watcher:
            deadline = time.monotonic() + 10
            while watcher.stats()["embed"]["requests"] < 1:  # queued: the engine has it
                assert time.monotonic() < deadline
                time.sleep(0.005)
    finally:
        thread.stop()
    with sock:
        (reply,) = read_until_closed(sock)
    assert reply[:3] == [1, 1, None]
    assert reply[3]["count"] == len(texts)
    assert not path.exists()


def test_overload_and_connection_limit(model_store: ModelStore, tmp_path: Path) -> None:
    path = tmp_path / "small.sock"
    thread = ServerThread(options_for(model_store, path, max_queue=1, max_connections=2)).start()
    try:
        with raw_connect(path) as first:
            count = 8
            first.sendall(
                b"".join(
                    encode_request(i, "embed", {"texts": [f"queued text {i} " * 10]})
                    for i in range(count)
                )
            )
            replies = read_messages(first, count)
            codes = [m[2][0] if m[2] else None for m in replies]
            assert codes.count(ProtocolCode.OVERLOADED) >= 1, codes
            assert codes.count(None) >= 1, codes
            with Client(path) as second:
                assert second.health()["status"] == "ok"
                with Client(path) as third, pytest.raises(Overloaded):
                    third.health()

                async def async_third() -> None:
                    async with AsyncClient(path) as aclient:
                        await aclient.health()

                with pytest.raises(Overloaded):
                    asyncio.run(async_third())
                assert second.stats()["transport"]["rejected"] >= 1
    finally:
        thread.stop()


def test_a_burst_of_connects_is_accepted_and_answered_overloaded(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """300 connects at once while the daemon is busy: none fails in the kernel (the listen
    backlog is sized from max_connections); the first max_connections are served and every
    other one gets a typed OVERLOADED frame."""
    path = tmp_path / "burst.sock"
    thread = ServerThread(options_for(model_store, path, max_connections=64)).start()
    socks: list[socket.socket] = []
    try:
        assert thread._loop is not None
        # Hold the event loop for a moment, as a burst of work would: every connect below
        # must wait in the kernel's accept queue.
        thread._loop.call_soon_threadsafe(time.sleep, 1.0)
        time.sleep(0.2)
        for _ in range(300):
            socks.append(raw_connect(path, timeout=10))  # EAGAIN here: the backlog is too small
        served = overloaded = 0
        for sock in socks:
            try:
                sock.sendall(encode_request(1, "health"))
            except OSError:
                pass  # refused and closed: the notification is still readable
            message = read_messages(sock, 1)[0]
            if message[0] == 1:
                assert message[2] is None and message[3]["status"] == "ok"
                served += 1
            else:
                assert message[0] == 2
                assert message[2][0]["error"][0] == ProtocolCode.OVERLOADED
                overloaded += 1
        assert (served, overloaded) == (64, 236)
    finally:
        for sock in socks:
            sock.close()
    try:
        deadline = time.monotonic() + 10
        while True:  # the daemon notices the closes asynchronously
            try:
                with Client(path, timeout=10.0) as c:
                    stats = c.stats()["transport"]
                    backlog = c.hello()["limits"]["listen_backlog"]
                break
            except Overloaded:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert stats["rejected"] == 236
        assert stats["accepted"] >= 65
        assert backlog >= 300
    finally:
        thread.stop()


def test_a_refused_client_that_writes_first_still_reads_why(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """A client writes its request before reading: the daemon that refused it must not have
    closed the socket under it (EPIPE, or a reset that discards the notification)."""
    path = tmp_path / "full.sock"
    thread = ServerThread(options_for(model_store, path, max_connections=1)).start()
    try:
        with Client(path, timeout=10.0) as holder:
            assert holder.health()["status"] == "ok"
            for _ in range(3):
                with raw_connect(path) as sock:
                    time.sleep(0.2)  # the refusal is written (and the socket half-closed) by now
                    sock.sendall(encode_request(1, "health"))  # EPIPE if it were closed
                    (notice,) = read_until_closed(sock)
                assert notice[0] == 2 and notice[2][0]["error"][0] == ProtocolCode.OVERLOADED

                async def async_client() -> None:
                    async with AsyncClient(path, timeout=10.0) as aclient:
                        await aclient.health()

                with pytest.raises(Overloaded):
                    asyncio.run(async_client())
            assert holder.stats()["transport"]["rejected"] == 6
    finally:
        thread.stop()


def test_idle_connections_time_out_and_make_room(model_store: ModelStore, tmp_path: Path) -> None:
    """Idle local connections cannot lock new clients out: a full table of idle ones makes
    room (the one idle longest, once idle for idle_timeout / 2) and each is closed after
    idle_timeout anyway. A connection in use is never idle."""
    path = tmp_path / "idle.sock"
    options = options_for(model_store, path, max_connections=4, idle_timeout=3.0)
    thread = ServerThread(options).start()
    idle: list[socket.socket] = []
    try:
        for _ in range(4):
            sock = raw_connect(path)
            sock.sendall(encode_request(1, "health"))
            read_messages(sock, 1)
            idle.append(sock)
        opened = time.monotonic()
        # Just opened: nobody has been idle long enough to be displaced.
        with Client(path, timeout=10.0) as c, pytest.raises(Overloaded):
            c.health()
        time.sleep(max(0.0, opened + 1.7 - time.monotonic()))
        # Idle for 1.5 s or more: the idlest (the first) makes room, closed without a word.
        with Client(path, timeout=10.0) as c:
            assert c.health()["status"] == "ok"
            assert read_until_closed(idle[0]) == []
            stats = c.stats()["transport"]
            assert stats["evicted"] == 1 and stats["connections"] == 4
        # A client that keeps talking is not idle; the silent ones are closed at 3 s.
        with Client(path, timeout=10.0) as busy:
            accepted = busy.stats()["transport"]["accepted"]
            deadline = time.monotonic() + 10
            while busy.stats()["transport"]["idle_closed"] < 3:
                assert time.monotonic() < deadline, "idle connections were not closed"
                time.sleep(0.25)
            closed_at = time.monotonic() - opened
            assert 2.9 < closed_at < 8.0
            for sock in idle[1:]:
                assert read_until_closed(sock) == []  # closed: EOF with no message
            stats = busy.stats()["transport"]
            assert stats["connections"] == 1
            # No new connection since: the busy client was never closed and reopened.
            assert stats["accepted"] == accepted
            assert busy.hello()["limits"]["idle_timeout_s"] == 3.0
    finally:
        for sock in idle:
            sock.close()
        thread.stop()


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"\xdb\xff\xff\xff\xff", id="str32-4GiB"),
        pytest.param(b"\xc6\xff\xff\xff\xff", id="bin32-4GiB"),
        pytest.param(b"\x94\x00\x01\xa5embed\x91\x81\xa5texts\x91\xdb\x00\x10\x00\x01",
                     id="str32-just-over-inside-a-request"),
    ],
)  # fmt: skip
def test_declared_length_over_the_limit_is_refused_at_the_header(
    server: ServerThread, client: Client, header: bytes
) -> None:
    # Only the header is sent: the daemon must not wait for the megabytes it announces.
    assert MAX_MESSAGE == 1 << 20
    with raw_connect(server.socket_path, timeout=10) as sock:
        sock.sendall(header)
        (notice,) = read_until_closed(sock)
    assert notice[0] == 2
    code, _name, _message, data = notice[2][0]["error"]
    assert code == ProtocolCode.MESSAGE_TOO_LARGE and data["limit"] == MAX_MESSAGE
    assert client.health()["status"] == "ok"


def test_client_reconnects_after_daemon_restart(model_store: ModelStore, tmp_path: Path) -> None:
    path = tmp_path / "restart.sock"
    options = options_for(model_store, path)
    with Client(path, timeout=30.0) as c:
        first = ServerThread(options).start()
        try:
            assert c.health()["status"] == "ok"
        finally:
            first.stop()
        with pytest.raises(ConnectionFailed):
            c.health()  # nobody there now
        second = ServerThread(options).start()
        try:
            assert c.embed(["back again"]).count == 1
        finally:
            second.stop()


def test_client_reuses_dead_connection_transparently(
    model_store: ModelStore, tmp_path: Path
) -> None:
    path = tmp_path / "bounce.sock"
    options = options_for(model_store, path)
    with Client(path, timeout=30.0) as c:
        first = ServerThread(options).start()
        try:
            c.health()
        finally:
            first.stop()
        second = ServerThread(options).start()
        try:
            # The connection to the first daemon is dead: one retry on a new connection.
            assert c.health()["status"] == "ok"
        finally:
            second.stop()


def test_client_timeout(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(os.fspath(path))
    silent.listen(1)  # accepts into the backlog, never answers
    try:
        with Client(path, timeout=0.3) as c:
            started = time.monotonic()
            with pytest.raises(RequestTimeout) as info:
                c.health()
            assert time.monotonic() - started < 3
            assert isinstance(info.value, TimeoutError)
            assert info.value.code == ProtocolCode.TIMEOUT
    finally:
        silent.close()


def test_no_daemon_is_connection_failed(tmp_path: Path) -> None:
    absent = Client(tmp_path / "absent.sock", timeout=1.0)
    with absent, pytest.raises(ConnectionFailed) as info:
        absent.health()
    assert "edge-agent serve" in str(info.value)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_announces_and_stops_on_signal(
    model_store: ModelStore, tmp_path: Path, signum: signal.Signals
) -> None:
    path = tmp_path / "cli.sock"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from edge_agent.daemon.app import serve\n"
        "from edge_agent.options import ServeOptions\n"
        "from edge_agent.embedding.embedder import EmbedderConfig\n"
        "serve(ServeOptions(socket_path=Path(sys.argv[1]), models_dir=Path(sys.argv[2]),"
        " quant='F32', embedder=EmbedderConfig(threads=1), state_dir=Path(sys.argv[3]),"
        " index_dir=Path(sys.argv[3]) / 'index'))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, os.fspath(path), os.fspath(model_store.root),
         os.fspath(tmp_path / "state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or ()])
    reader.start()
    try:
        assert lines.get(timeout=60) == f"edge-agent listening on unix:{path}\n"
        assert lines.get(timeout=5) == f'try: edge-agent embed --socket {path} "hello world"\n'
        with Client(path) as c:
            assert c.embed(["hello world"]).count == 1
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_no_document_text_in_logs(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    secret = "confidential-merger-plan-7731"
    with caplog.at_level(logging.DEBUG, logger="edge_agent"):
        client.embed([secret])
        with pytest.raises(EmptyText):
            client.embed([secret, " "])
    assert any("event=" in r.getMessage() for r in caplog.records)
    assert secret not in caplog.text


# -- layering -----------------------------------------------------------------------------------


def test_client_import_loads_no_engine() -> None:
    code = (
        "import sys, edge_agent.client\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'hnswlib')"
        " or m.startswith(('edge_agent.embedding', 'edge_agent.index', 'edge_agent.daemon',"
        " 'edge_agent.selection'))]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_protocol_constants_match_the_engine_side() -> None:
    assert protocol.KINDS == inference_module.KINDS
    assert protocol.LONG_TEXT_MODES == inference_module.LONG_TEXT_MODES


def test_bad_request_code_is_distinct_from_invalid_argument() -> None:
    assert BadRequest.code == ProtocolCode.BAD_REQUEST != ErrorCode.INVALID_ARGUMENT


def test_engine_crash_costs_the_child_not_the_daemon(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """llama.cpp aborts the process on some faults: the daemon runs it in a child process."""
    thread = ServerThread(options_for(model_store, tmp_path / "crash.sock", quant="Q8_0")).start()
    try:
        with Client(thread.socket_path, timeout=60.0) as c:
            assert c.embed(["warm up"]).vectors.shape == (1, 384)
            engine_pid = c.stats()["memory"]["engine_pid"]
            assert engine_pid not in (None, os.getpid())
            # The engine is a child of this (the daemon's) process, running our worker.
            assert Path(f"/proc/{engine_pid}/stat").read_text().split()[3] == str(os.getpid())
            cmdline = Path(f"/proc/{engine_pid}/cmdline").read_bytes()
            assert b"edge_agent.embedding.child" in cmdline
            outcome: dict[str, Any] = {}

            def long_call() -> None:
                with Client(thread.socket_path, timeout=60.0) as other:
                    try:
                        other.embed([f"text number {i}" for i in range(3000)])
                    except EdgeAgentError as exc:
                        outcome["error"] = exc

            caller = threading.Thread(target=long_call)
            caller.start()
            time.sleep(1.0)
            os.kill(engine_pid, signal.SIGABRT)  # what a GGML_ASSERT does
            caller.join(timeout=60)
            assert isinstance(outcome.get("error"), EngineError), outcome
            assert outcome["error"].code == ErrorCode.ENGINE_ERROR
            # Same daemon, same connection: the next request gets a fresh engine.
            assert c.embed(["after the crash"]).vectors.shape == (1, 384)
            assert c.health()["status"] == "ok"
            assert c.stats()["memory"]["engine_pid"] not in (None, engine_pid)
    finally:
        thread.stop()
