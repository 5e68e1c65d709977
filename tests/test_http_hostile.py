"""Hostile HTTP against a real daemon: huge and slow bodies, slow and oversized heads, idle
connection floods, garbage and unauthenticated requests. After each, the daemon is up and a
well-behaved client is served. The head and body deadlines are shortened (module constants of
edge_agent.daemon.http.limits) so the test takes seconds, not the production 10 s / 30 s."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from daemon import ServerThread
from httpd import TOKEN, host_port, start_http_daemon

from edge_agent.client import Client
from edge_agent.daemon.http import limits
from edge_agent.models import DEFAULT_MODEL, ModelStore

SHORT_S = 1.0  # the shortened head and body deadlines
MAX_CONNECTIONS = 64


@pytest.fixture(scope="module")
def served(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, str]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(limits, "HEAD_TIMEOUT_S", SHORT_S)
        patch.setattr(limits, "BODY_TIMEOUT_S", SHORT_S)
        thread, base = start_http_daemon(
            model_store,
            tmp_path_factory.mktemp("hostile"),
            auth_token=TOKEN,
            max_connections=MAX_CONNECTIONS,
        )
        yield thread, base
        thread.stop()


@pytest.fixture(scope="module")
def base(served: tuple[ServerThread, str]) -> str:
    return served[1]


AUTH = f"Authorization: Bearer {TOKEN}\r\n"


def _connect(base: str) -> socket.socket:
    sock = socket.create_connection(host_port(base), timeout=10.0)
    return sock


def _read_until_closed(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _still_serving(base: str) -> None:
    """A well-behaved client gets a real embedding, promptly."""
    started = time.monotonic()
    with httpx.Client(base_url=base, timeout=10.0) as http:
        response = http.post(
            "/v1/embeddings",
            json={"model": DEFAULT_MODEL, "input": "still here?"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == 384
    assert time.monotonic() - started < 5.0


def test_a_100_mb_body_is_refused_before_it_is_read(base: str) -> None:
    before = _rss()
    sock = _connect(base)
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n{AUTH}Content-Type: application/json\r\n"
        f"Content-Length: {100 * 1000 * 1000}\r\n\r\n"
    ).encode()
    sock.sendall(head)
    sent = 0
    outcome: dict[str, bytes] = {}

    def read() -> None:
        outcome["reply"] = _read_until_closed(sock)

    reader = threading.Thread(target=read)
    reader.start()
    chunk = b"x" * 65536
    try:
        while sent < 100 * 1000 * 1000:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the daemon closed the connection: it will not read 100 MB
    reader.join(15)
    sock.close()
    reply = outcome["reply"]
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b'"code":"MESSAGE_TOO_LARGE"' in reply
    assert sent < 20 * 1000 * 1000  # kernel buffers, plus what the daemon dropped unread
    assert _rss() - before < 50 << 20
    _still_serving(base)


def test_a_chunked_body_over_the_limit_is_cut_off(served: tuple[ServerThread, str]) -> None:
    base = served[1]
    limit = served[0].options.max_message_bytes
    sock = _connect(base)
    sock.sendall(
        f"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n{AUTH}Content-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    piece = b"y" * 32768
    sent = 0
    try:
        while sent < 100 * 1000 * 1000:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
    except OSError:
        pass
    reply = _read_until_closed(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert sent < limit + 20 * 1000 * 1000  # kernel buffers, plus what was dropped unread
    _still_serving(base)


def test_slowloris_head_is_cut_off(base: str) -> None:
    sock = _connect(base)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n")
    started = time.monotonic()
    closed = False
    for _ in range(40):  # one header byte every 0.1 s: never a complete head
        try:
            sock.sendall(b"X")
        except OSError:
            closed = True
            break
        sock.settimeout(0.1)
        try:
            if sock.recv(1024) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except OSError:
            closed = True
            break
    sock.close()
    assert closed
    assert time.monotonic() - started < SHORT_S + 2.0
    _still_serving(base)


def test_silent_connection_is_closed(base: str) -> None:
    sock = _connect(base)
    started = time.monotonic()
    assert _read_until_closed(sock, 5.0) == b""
    sock.close()
    assert SHORT_S * 0.8 < time.monotonic() - started < SHORT_S + 2.0


def test_slowloris_body_gets_408(base: str) -> None:
    sock = _connect(base)
    sock.sendall(
        f"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n{AUTH}Content-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n{\"input\": ".encode()
    )
    started = time.monotonic()
    reply = _read_until_closed(sock, 10.0)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert time.monotonic() - started < SHORT_S + 2.0
    _still_serving(base)


def test_oversized_and_garbage_heads(base: str) -> None:
    for request in (
        b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (limits.MAX_HEAD_BYTES + 10)
        + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: t\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(4000)) + b"\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS hello
        b"NOT HTTP AT ALL\r\n\r\n",
    ):
        sock = _connect(base)
        try:
            sock.sendall(request)
        except OSError:
            pass
        reply = _read_until_closed(sock, 5.0)
        sock.close()
        assert reply.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), reply[:200]
        assert b'"code":"BAD_REQUEST"' in reply
    # Many headers within the limit are fine.
    headers = {f"x-h{i}": "v" for i in range(300)}
    headers["Authorization"] = f"Bearer {TOKEN}"
    assert httpx.get(f"{base}/health", headers=headers, timeout=10).status_code == 200
    _still_serving(base)


def test_a_thousand_idle_keep_alive_connections(served: tuple[ServerThread, str]) -> None:
    base = served[1]
    request = f"GET /v1/models HTTP/1.1\r\nHost: t\r\n{AUTH}\r\n".encode()
    socks = []
    answered = 0
    try:
        for _ in range(1000):
            sock = _connect(base)
            socks.append(sock)
            try:
                sock.sendall(request)
                sock.settimeout(5.0)
                if sock.recv(65536).startswith(b"HTTP/1.1 200 "):
                    answered += 1  # then left open and idle
            except OSError:
                pass
        # Each newcomer displaced the longest-idle connection: all were served.
        assert answered == 1000
        _still_serving(base)
        with Client(served[0].socket_path, timeout=30.0) as client:
            transport = client.stats()
        found = {k: v for k, v in _flatten(transport).items() if "http_connections" in k}
        assert found, transport
        open_now = [v for k, v in found.items() if k.endswith("http_connections")]
        assert open_now and open_now[0] <= MAX_CONNECTIONS
        evicted = [v for k, v in found.items() if k.endswith("http_connections_evicted")]
        assert evicted and evicted[0] >= 1000 - MAX_CONNECTIONS
    finally:
        for sock in socks:
            sock.close()


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def test_unauthenticated_floods_are_refused_cheaply(base: str) -> None:
    big = b"{" + b" " * (2 << 20) + b"}"
    for _ in range(20):
        sock = _connect(base)
        try:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(big)
            )
            sock.sendall(big[:65536])
        except OSError:
            pass
        reply = _read_until_closed(sock, 5.0)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
    with httpx.Client(base_url=base, timeout=10.0) as http:
        for _ in range(200):
            wrong = http.get("/v1/models", headers={"Authorization": "Bearer guess"})
            assert wrong.status_code == 401
            assert wrong.json()["error"]["code"] == "AUTH_FAILED"
    _still_serving(base)


def test_when_every_connection_is_busy_a_newcomer_gets_503(base: str) -> None:
    """Connections in the middle of a request are never evicted: with all of them busy
    (bodies trickling in), a newcomer is told OVERLOADED at once; once the slow bodies hit
    their deadline, clients are served again."""
    busy = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = _connect(base)
            sock.sendall(
                f"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n{AUTH}"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
            )
            busy.append(sock)
        time.sleep(0.2)  # every head parsed: each connection has a request in flight
        newcomer = _connect(base)
        reply = _read_until_closed(newcomer, 5.0)
        newcomer.close()
        assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
        assert b'"code":"OVERLOADED"' in reply and b"retry-after: 1" in reply
    finally:
        for sock in busy:
            sock.close()
    _still_serving(base)


def test_metrics_are_off_unless_enabled(base: str) -> None:
    response = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 404
    assert "metrics_listen" in response.json()["error"]["message"]
