"""TCP: loopback by default, protected mode beyond it, token auth, pre-auth limits, HTTP refusal.

All traffic goes to 127.0.0.1 / ::1. The "non-loopback" refusal is checked before any socket is
bound, so it sends nothing anywhere.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from daemon import ServerThread, options_for

from edge_agent.addresses import is_loopback
from edge_agent.addresses import parse_host_port as parse_listen
from edge_agent.client import AsyncClient, Client, parse_address
from edge_agent.daemon.app import run_server
from edge_agent.daemon.server import PREAUTH_MAX_BYTES
from edge_agent.errors import ErrorCode, InsecureListen, InvalidArgument
from edge_agent.models import ModelStore
from edge_agent.protocol import (
    AuthFailed,
    AuthRequired,
    ConnectionFailed,
    MessageTooLarge,
    ProtocolCode,
    encode_request,
)

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def daemon(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("tcp") / "run" / "edge-agent.sock"
    options = options_for(
        model_store, path, listen="127.0.0.1:0", auth_token=TOKEN, auth_timeout=1.5
    )
    thread = ServerThread(options).start()
    yield thread
    thread.stop()


def _raw(address: str) -> socket.socket:
    endpoint = parse_address(address)
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> list[object]:
    unpacker = msgpack.Unpacker(raw=False)
    while chunk := sock.recv(65536):
        unpacker.feed(chunk)
    return list(unpacker)


def test_parse_listen_and_loopback() -> None:
    assert parse_listen("127.0.0.1:7878") == ("127.0.0.1", 7878)
    assert parse_listen(":7878") == ("127.0.0.1", 7878)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("7878", "host:port", "::1:80", "h:70000"):
        with pytest.raises(InvalidArgument):
            parse_listen(bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("box.lan")


def test_token_client_gets_everything(daemon: ServerThread) -> None:
    with Client(daemon.tcp_address, timeout=60.0, token=TOKEN) as c:
        hello = c.hello()
        assert hello["auth"] == {"required": True, "authenticated": True}
        assert "auth" in hello["capabilities"]
        assert c.embed(["over tcp"]).vectors.shape == (1, 384)
        c.add("tcp", [{"id": "a", "text": "sent over TCP"}])
        assert c.search("tcp", "TCP")[0].id == "a"


def test_stats_count_tcp_connections(daemon: ServerThread) -> None:
    # Regression: the count once compared the transport object with the string "tcp" (always 0).
    with Client(daemon.tcp_address, timeout=60.0, token=TOKEN) as c:
        over_tcp = c.stats()["transport"]["tcp_connections"]
        assert over_tcp >= 1
        with Client(daemon.socket_path, timeout=60.0) as local:
            assert local.stats()["transport"]["tcp_connections"] == over_tcp
        with Client(daemon.tcp_address, timeout=60.0, token=TOKEN) as second:
            assert second.stats()["transport"]["tcp_connections"] == over_tcp + 1


def test_async_client_over_tcp(daemon: ServerThread) -> None:
    async def run() -> int:
        async with AsyncClient(daemon.tcp_address, timeout=60.0, token=TOKEN) as c:
            results = await asyncio.gather(*(c.embed([f"text {i}"]) for i in range(8)))
            return sum(r.count for r in results)

    assert asyncio.run(run()) == 8


def test_token_from_environment(daemon: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_TOKEN", TOKEN)
    with Client(daemon.tcp_address, timeout=30.0) as c:
        assert c.health()["status"] == "ok"


def test_without_auth_only_hello_works(daemon: ServerThread) -> None:
    with Client(daemon.tcp_address, timeout=30.0, token=None) as c:
        os.environ.pop("EDGE_AGENT_TOKEN", None)
        hello = c.hello()
        assert hello["auth"] == {"required": True, "authenticated": False}
        with pytest.raises(AuthRequired) as info:
            c.embed(["x"])
        assert info.value.code == ProtocolCode.AUTH_REQUIRED
        with pytest.raises(AuthRequired):
            c.stats()
        # Still connected and still only allowed hello.
        assert c.hello()["auth"]["authenticated"] is False


def test_wrong_token_is_refused_and_the_connection_closed(daemon: ServerThread) -> None:
    with pytest.raises(AuthFailed) as info:
        Client(daemon.tcp_address, timeout=30.0, token="wrong-token-wrong-token").health()
    assert info.value.code == ProtocolCode.AUTH_FAILED
    sock = _raw(daemon.tcp_address)
    try:
        sock.sendall(encode_request(1, "auth", {"token": "nope"}))
        sock.sendall(encode_request(2, "embed", {"texts": ["x"]}))
        replies = _read_all(sock)  # returns at EOF: the daemon hung up
    finally:
        sock.close()
    assert replies[0][1] == 1 and replies[0][2][0] == ProtocolCode.AUTH_FAILED
    assert len(replies) == 1  # the pipelined embed was never run


def test_pipelined_auth_then_call_in_one_write(daemon: ServerThread) -> None:
    sock = _raw(daemon.tcp_address)
    try:
        sock.sendall(
            encode_request(1, "auth", {"token": TOKEN}) + encode_request(2, "health", None)
        )
        unpacker = msgpack.Unpacker(raw=False)
        replies: list[object] = []
        while len(replies) < 2:
            unpacker.feed(sock.recv(65536))
            replies.extend(unpacker)
    finally:
        sock.close()
    by_id = {r[1]: r for r in replies}  # type: ignore[index]
    assert by_id[1][2] is None and by_id[1][3]["authenticated"] is True
    assert by_id[2][2] is None and by_id[2][3]["status"] == "ok"


def test_preauth_oversize_gets_message_too_large(daemon: ServerThread) -> None:
    sock = _raw(daemon.tcp_address)
    try:
        # A declared 1 MiB str header: over the pre-auth limit however few bytes follow. Only
        # the header is sent: it is refused at once, not after 4 KiB or at the auth timeout.
        sock.sendall(b"\x94\x00\x01\xa5hello\x91\x81\xa6client\xdb" + (1 << 20).to_bytes(4, "big"))
        started = time.monotonic()
        replies = _read_all(sock)
    finally:
        sock.close()
    assert time.monotonic() - started < 1.0  # well before the 1.5 s auth timeout
    (notice,) = replies
    assert notice[0] == 2  # type: ignore[index]
    code, _name, _message, data = notice[2][0]["error"]  # type: ignore[index]
    assert code == ProtocolCode.MESSAGE_TOO_LARGE
    assert data == {"limit": PREAUTH_MAX_BYTES, "declared": 1 << 20}
    # Bytes beyond the pre-auth limit are refused too, whatever their shape.
    sock = _raw(daemon.tcp_address)
    try:
        try:
            sock.sendall(b"\x94\x00\x01\xa5hello\x91\xdc\xff\xff" + b"\x01" * PREAUTH_MAX_BYTES)
        except OSError:
            pass
        try:
            replies = _read_all(sock)
        except ConnectionResetError:
            replies = []  # the kernel resets a connection closed with unread bytes
    finally:
        sock.close()
    assert all(m[0] == 2 for m in replies)  # type: ignore[index]
    with Client(daemon.tcp_address, timeout=30.0, token=TOKEN) as c:
        assert c.stats()["transport"]["protocol_errors"] >= 2


def test_silent_peers_are_dropped_after_the_auth_timeout(daemon: ServerThread) -> None:
    sock = _raw(daemon.tcp_address)
    started = time.monotonic()
    try:
        replies = _read_all(sock)  # blocks until the daemon closes
    finally:
        sock.close()
    elapsed = time.monotonic() - started
    assert 1.0 < elapsed < 8.0
    assert replies and replies[-1][2][0]["error"][0] == ProtocolCode.AUTH_REQUIRED  # type: ignore[index]


def test_http_gets_an_http_answer(daemon: ServerThread) -> None:
    sock = _raw(daemon.tcp_address)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"MessagePack-RPC" in data
    with Client(daemon.tcp_address, timeout=30.0, token=TOKEN) as c:
        assert c.stats()["transport"]["http_rejected"] >= 1


def test_unix_socket_needs_no_token(daemon: ServerThread) -> None:
    with Client(daemon.socket_path, timeout=30.0) as c:
        assert c.health()["status"] == "ok"
        assert c.hello()["auth"] == {"required": False, "authenticated": True}


def _run_until_ready(options: object) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        await run_server(options, stop, lambda _a: stop.set())  # type: ignore[arg-type]

    asyncio.run(main())


def test_non_loopback_without_token_refuses_to_start(
    model_store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGE_AGENT_TOKEN", raising=False)
    path = tmp_path / "s.sock"
    for listen in ("0.0.0.0:0", "[::]:0", "192.0.2.1:7878"):
        with pytest.raises(InsecureListen) as info:
            _run_until_ready(options_for(model_store, path, listen=listen))
        assert info.value.code == ErrorCode.INSECURE_LISTEN
        assert "auth token" in info.value.message
    assert not path.exists()
    with pytest.raises(InvalidArgument, match="advertise needs TCP"):
        _run_until_ready(options_for(model_store, path, advertise=True))


def test_token_file_rules(model_store: ModelStore, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    token_file = tmp_path / "token"
    token_file.write_text("short\n")
    token_file.chmod(0o600)
    with pytest.raises(InsecureListen, match="at least 16"):
        _run_until_ready(
            options_for(model_store, path, listen="127.0.0.1:0", auth_token_file=token_file)
        )
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o644)
    with pytest.raises(InsecureListen, match="chmod 600"):
        _run_until_ready(
            options_for(model_store, path, listen="127.0.0.1:0", auth_token_file=token_file)
        )
    with pytest.raises(InvalidArgument, match="cannot read token file"):
        _run_until_ready(
            options_for(
                model_store, path, listen="127.0.0.1:0", auth_token_file=tmp_path / "absent"
            )
        )


def test_token_file_serves_on_ipv6_loopback(model_store: ModelStore, tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.fail("this host has no IPv6; the suite expects ::1 to exist")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    options = options_for(
        model_store, tmp_path / "s.sock", listen="[::1]:0", auth_token_file=token_file
    )
    thread = ServerThread(options).start()
    try:
        assert thread.tcp_address.startswith("tcp://[::1]:")
        with Client(thread.tcp_address, timeout=30.0, token=TOKEN) as c:
            assert c.embed(["v6"]).count == 1
        with pytest.raises(AuthFailed):
            Client(thread.tcp_address, timeout=30.0, token="x" * 20).health()
    finally:
        thread.stop()


def test_port_in_use_is_a_clear_error(model_store: ModelStore, tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        with pytest.raises(InvalidArgument, match=f"cannot listen on 127.0.0.1:{port}"):
            _run_until_ready(
                options_for(model_store, tmp_path / "s.sock", listen=f"127.0.0.1:{port}")
            )
        assert not (tmp_path / "s.sock").exists()
    finally:
        blocker.close()


def test_connection_refused_message(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(ConnectionFailed, match="connection refused"):
        Client(f"127.0.0.1:{port}", timeout=5.0).health()


def test_loopback_without_token_needs_no_auth(model_store: ModelStore, tmp_path: Path) -> None:
    thread = ServerThread(
        options_for(model_store, tmp_path / "s.sock", listen="127.0.0.1:0")
    ).start()
    try:
        with Client(thread.tcp_address, timeout=30.0) as c:
            assert c.hello()["auth"] == {"required": False, "authenticated": True}
            assert c.embed(["open loopback"]).count == 1
    finally:
        thread.stop()


def test_message_too_large_after_auth_uses_the_full_limit(daemon: ServerThread) -> None:
    with Client(daemon.tcp_address, timeout=30.0, token=TOKEN) as c:
        # Well over the pre-auth limit but under max_message_bytes: fine once authenticated.
        text = "word " * 2000
        assert c.embed([text]).count == 1
        with pytest.raises(MessageTooLarge):
            c.embed(["x" * (2 << 20)])


def _connect_from(source: str, address: str) -> socket.socket:
    """A TCP connection from a second loopback address (all of 127.0.0.0/8 is on lo)."""
    endpoint = parse_address(address)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((endpoint.host, endpoint.port))
    return sock


@pytest.fixture
def patient(model_store: ModelStore, tmp_path: Path) -> Iterator[ServerThread]:
    """A daemon with the default pre-auth limits and time to spare (auth_timeout 30 s)."""
    options = options_for(
        model_store, tmp_path / "run" / "s.sock", listen="127.0.0.1:0", auth_token=TOKEN,
        auth_timeout=30.0,
    )  # fmt: skip
    thread = ServerThread(options).start()
    yield thread
    thread.stop()


def test_unauthenticated_connections_are_capped_per_source(patient: ServerThread) -> None:
    daemon = patient
    with Client(daemon.socket_path) as c:
        limits = c.hello()["limits"]
    assert limits["max_preauth_connections"] == 16
    assert limits["max_preauth_per_source"] == 8
    assert limits["first_byte_timeout_s"] == 3.0 and limits["auth_timeout_s"] == 30.0
    per_source = limits["max_preauth_per_source"]
    waiting = [_raw(daemon.tcp_address) for _ in range(per_source)]
    try:
        # Connected is not enough: the daemon counts them once it has accepted them.
        for sock in waiting:
            sock.sendall(encode_request(1, "hello", None))
            assert sock.recv(65536)[:2] == b"\x94\x01"  # a reply: admitted
        extra = _raw(daemon.tcp_address)
        replies = _read_all(extra)
        extra.close()
        error = replies[-1][2][0]["error"]  # type: ignore[index]
        assert error[0] == ProtocolCode.OVERLOADED
        assert error[3] == {"limit": per_source, "reason": "preauth_per_source"}
        # A token holder from another address is not blocked by strangers at this one...
        other = _connect_from("127.0.0.3", daemon.tcp_address)
        try:
            other.sendall(
                encode_request(1, "auth", {"token": TOKEN}) + encode_request(2, "health", None)
            )
            unpacker = msgpack.Unpacker(raw=False)
            replies = []
            while len(replies) < 2:
                unpacker.feed(other.recv(65536))
                replies.extend(unpacker)
        finally:
            other.close()
        assert [r[2] for r in replies] == [None, None]  # type: ignore[index]
        # ...nor is a local client.
        with Client(daemon.socket_path, timeout=30.0) as c:
            assert c.health()["status"] == "ok"
            assert c.stats()["transport"]["preauth_connections"] == per_source
    finally:
        for sock in waiting:
            sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the daemon notices the closes asynchronously
        try:
            with Client(daemon.tcp_address, timeout=30.0, token=TOKEN) as c:
                assert c.health()["status"] == "ok"
            break
        except Exception:
            time.sleep(0.1)
    else:
        pytest.fail("TCP clients stayed refused after the strangers left")


def test_preauth_message_size_boundary(daemon: ServerThread) -> None:
    def hello_of_size(size: int) -> bytes:
        base = encode_request(1, "hello", {"client": ""})
        return encode_request(1, "hello", {"client": "c" * (size - len(base) - 2)})

    exact = hello_of_size(PREAUTH_MAX_BYTES)
    assert len(exact) == PREAUTH_MAX_BYTES
    sock = _raw(daemon.tcp_address)
    try:
        sock.sendall(exact)
        unpacker = msgpack.Unpacker(raw=False)
        sock.settimeout(10)
        unpacker.feed(sock.recv(65536))
        reply = next(unpacker)
    finally:
        sock.close()
    # Limit-sized is read (the client name is over hello's 256 characters: a typed error).
    assert reply[0] == 1 and reply[2][0] == ErrorCode.INVALID_ARGUMENT
    over = _raw(daemon.tcp_address)
    try:
        try:
            over.sendall(hello_of_size(PREAUTH_MAX_BYTES + 1))
        except OSError:
            pass
        replies = _read_all(over)
    except ConnectionResetError:
        replies = []
    finally:
        over.close()
    assert all(m[0] != 1 for m in replies)  # one byte over: no reply, the connection closed
