"""Pre-auth admission over real TCP: a flood from one address never locks out a token holder
from another, the tables are fair, silent peers are dropped early, and refusals do not grow the
log without bound.

Every socket here is loopback (127.0.0.0/8: Linux routes the whole block to ``lo``, so a client
socket bound to 127.0.0.2 is a second source address), except in the namespace test, which
talks only between network namespaces it creates and removes (tests/lan.py). Every loop is
bounded in count and time.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daemon import ServerThread, options_for
from lan import ROOT, Lan, namespaces_available

from edge_agent.client import Client, parse_address
from edge_agent.daemon import server as server_module
from edge_agent.daemon.server import listen_backlog, source_of
from edge_agent.logs import KeyValueFormatter, LogLimiter
from edge_agent.models import ModelStore
from edge_agent.protocol import ProtocolCode, encode_request

TOKEN = "admission-token-0123456789abcdef"
HELLO = encode_request(1, "hello", {"client": "flood"})


def connect_from(source: str, address: str, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to ``address`` whose source address is ``source``."""
    endpoint = parse_address(address)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.bind((source, 0))
        sock.connect((endpoint.host, endpoint.port))
    except BaseException:
        sock.close()
        raise
    return sock


def first_message(sock: socket.socket, timeout: float = 10.0) -> list[Any] | None:
    """The first message the daemon sends (None: it closed without one)."""
    sock.settimeout(timeout)
    unpacker = msgpack.Unpacker(raw=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not data:
            return None
        unpacker.feed(data)
        for message in unpacker:
            return message  # type: ignore[no-any-return]
    raise AssertionError("no message and no close within the timeout")


def hello_from(source: str, address: str) -> tuple[socket.socket, list[Any] | None]:
    """Connect from ``source``, send hello, return the socket and what came back first: a
    hello reply (admitted) or an error notification (refused or displaced)."""
    sock = connect_from(source, address)
    try:
        sock.sendall(HELLO)
    except OSError:
        pass  # refused: the notification may still be readable
    return sock, first_message(sock)


def admitted(message: list[Any] | None) -> bool:
    return message is not None and message[0] == 1 and message[2] is None


def refusal(message: list[Any] | None) -> tuple[int, dict[str, Any]]:
    """(code, data) of an error notification."""
    assert message is not None and message[0] == 2, message
    code, _name, _text, data = message[2][0]["error"]
    return code, data


def closed_by_daemon(sock: socket.socket, timeout: float = 10.0) -> list[Any]:
    """Everything the daemon sends until it closes ``sock``."""
    sock.settimeout(timeout)
    unpacker = msgpack.Unpacker(raw=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        unpacker.feed(data)
    else:
        raise AssertionError("the daemon did not close the connection")
    return list(unpacker)


def transport_stats(daemon: ServerThread) -> dict[str, Any]:
    with Client(daemon.socket_path, timeout=30.0) as c:
        return c.stats()["transport"]  # type: ignore[no-any-return]


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


class Flood(threading.Thread):
    """Keeps ``width`` connections from ``source`` open that have sent hello but never
    authenticate, reopening each as soon as the daemon closes it: the field report's attack."""

    def __init__(self, address: str, source: str, width: int = 40, max_s: float = 60.0) -> None:
        super().__init__(name=f"flood-{source}", daemon=True)
        self.address = address
        self.source = source
        self.width = width
        self.max_s = max_s
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.opened = 0
        self.refused = 0
        self.connect_errors = 0

    def run(self) -> None:
        open_socks: list[socket.socket] = []
        deadline = time.monotonic() + self.max_s
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                while len(open_socks) < self.width:
                    try:
                        sock = connect_from(self.source, self.address, timeout=2.0)
                        sock.sendall(HELLO)
                    except OSError:
                        self.connect_errors += 1
                        break
                    sock.setblocking(False)
                    open_socks.append(sock)
                    self.opened += 1
                self.ready.set()
                readable, _, _ = select.select(open_socks, [], [], 0.05)
                for sock in readable:
                    try:
                        data = sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if data.startswith(b"\x93\x02"):  # [2, "error", ...]: refused or displaced
                        self.refused += 1
                    if not data or data.startswith(b"\x93\x02"):
                        sock.close()
                        open_socks.remove(sock)
        finally:
            self.ready.set()
            for sock in open_socks:
                sock.close()


@pytest.fixture(scope="module")
def daemon(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("admission") / "run" / "edge-agent.sock"
    options = options_for(model_store, path, listen="127.0.0.1:0", auth_token=TOKEN)
    thread = ServerThread(options).start()
    yield thread
    thread.stop()


@pytest.fixture
def small(model_store: ModelStore, tmp_path: Path) -> Iterator[ServerThread]:
    """Tables small enough to fill by hand: 4 waiting in all, 3 per source."""
    options = options_for(
        model_store,
        tmp_path / "run" / "edge-agent.sock",
        listen="127.0.0.1:0",
        auth_token=TOKEN,
        max_preauth_connections=4,
        max_preauth_per_source=3,
    )
    thread = ServerThread(options).start()
    yield thread
    thread.stop()


# -- the field report: one address holding many connections ------------------------------------


def test_flood_from_one_address_does_not_lock_out_token_holders(daemon: ServerThread) -> None:
    flood = Flood(daemon.tcp_address, "127.0.0.2", width=40)
    flood.start()
    try:
        assert flood.ready.wait(30)
        wait_for(lambda: flood.refused > 0, timeout=30)  # the flood is at its cap
        results = []
        for _ in range(10):
            with Client(daemon.tcp_address, timeout=30.0, token=TOKEN) as c:
                results.append(c.health()["status"])
        stats = transport_stats(daemon)
        assert results == ["ok"] * 10
        # The flood holds its per-source share and no more; the rest of it is refused.
        with Client(daemon.socket_path, timeout=30.0) as c:
            limits = c.hello()["limits"]
        assert stats["preauth_connections"] <= limits["max_preauth_per_source"] == 8
        assert stats["rejected"] > 0
        assert flood.connect_errors == 0  # accepted and answered, not dropped by the kernel
    finally:
        flood.stop.set()
        flood.join(30)


def test_per_source_cap_refuses_only_that_source(small: ServerThread) -> None:
    held = [hello_from("127.0.0.2", small.tcp_address) for _ in range(3)]
    try:
        assert all(admitted(message) for _, message in held)
        extra, message = hello_from("127.0.0.2", small.tcp_address)
        extra.close()
        code, data = refusal(message)
        assert code == ProtocolCode.OVERLOADED
        assert data == {"limit": 3, "reason": "preauth_per_source"}
        other, message = hello_from("127.0.0.3", small.tcp_address)
        other.close()
        assert admitted(message)
    finally:
        for sock, _ in held:
            sock.close()


def test_a_full_table_displaces_the_oldest_of_the_biggest_holder(small: ServerThread) -> None:
    address = small.tcp_address
    socks: dict[str, list[socket.socket]] = {"127.0.0.2": [], "127.0.0.3": [], "127.0.0.4": []}

    def join(source: str) -> list[Any] | None:
        sock, message = hello_from(source, address)
        socks[source].append(sock)
        return message

    try:
        assert admitted(join("127.0.0.2")) and admitted(join("127.0.0.2"))
        assert admitted(join("127.0.0.2")) and admitted(join("127.0.0.3"))  # 4 of 4
        # A newcomer from elsewhere takes the place of 127.0.0.2's oldest, which is told why.
        assert admitted(join("127.0.0.4"))
        (notice,) = closed_by_daemon(socks["127.0.0.2"][0])
        code, data = refusal(notice)
        assert code == ProtocolCode.OVERLOADED and data == {"reason": "preauth_total"}
        # 127.0.0.2 still holds the most (2): its own newcomer is refused, nobody displaced.
        code, data = refusal(join("127.0.0.2"))
        assert code == ProtocolCode.OVERLOADED
        assert data == {"limit": 4, "reason": "preauth_total"}
        # 127.0.0.3 holds fewer: its newcomer displaces 127.0.0.2's next oldest.
        assert admitted(join("127.0.0.3"))
        (notice,) = closed_by_daemon(socks["127.0.0.2"][1])
        assert refusal(notice)[0] == ProtocolCode.OVERLOADED
        stats = transport_stats(small)
        assert stats["preauth_connections"] == 4
        assert stats["evicted"] == 2 and stats["rejected"] == 1
        # Everyone left waiting is still served, 127.0.0.2 included (one slot).
        for live in (socks["127.0.0.2"][2], *socks["127.0.0.3"], socks["127.0.0.4"][0]):
            live.sendall(HELLO)
            assert admitted(first_message(live))
        # A token holder from yet another address still gets in, and authenticates.
        with Client(address, timeout=30.0, token=TOKEN) as c:
            assert c.health()["status"] == "ok"
    finally:
        for group in socks.values():
            for sock in group:
                sock.close()


def test_a_full_connection_table_makes_room_for_a_local_client(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """Strangers waiting to authenticate cannot take every connection slot from local clients:
    a full table is shared by the same rule as the pre-auth table, and a Unix client displaces
    the oldest stranger of the source holding the most."""
    options = options_for(
        model_store,
        tmp_path / "run" / "edge-agent.sock",
        listen="127.0.0.1:0",
        auth_token=TOKEN,
        max_connections=3,
    )
    thread = ServerThread(options).start()
    waiting: list[socket.socket] = []
    try:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            sock, message = hello_from(source, thread.tcp_address)
            waiting.append(sock)
            assert admitted(message)
        # Full. A stranger from an address that holds as many as any other is refused...
        sock, message = hello_from("127.0.0.4", thread.tcp_address)
        sock.close()
        code, data = refusal(message)
        assert code == ProtocolCode.OVERLOADED
        assert data == {"limit": 3, "reason": "connections_full"}
        # ...one from a new address takes the oldest stranger's place (127.0.0.2)...
        sock, message = hello_from("127.0.0.5", thread.tcp_address)
        waiting.append(sock)
        assert admitted(message)
        (notice,) = closed_by_daemon(waiting[0])
        assert refusal(notice) == (ProtocolCode.OVERLOADED, {"reason": "connections_full"})
        # ...and so does a local client (127.0.0.3's place, the oldest now).
        with Client(thread.socket_path, timeout=30.0) as c:
            assert c.health()["status"] == "ok"
            (notice,) = closed_by_daemon(waiting[1])
            assert refusal(notice) == (ProtocolCode.OVERLOADED, {"reason": "connections_full"})
            stats = c.stats()["transport"]
            assert stats["connections"] == 3 and stats["evicted"] == 2
            assert stats["tcp_connections"] == 2 and stats["preauth_connections"] == 2
    finally:
        for sock in waiting:
            sock.close()
        thread.stop()


def test_sources_and_backlog() -> None:
    assert source_of(("127.0.0.2", 5000)) == "127.0.0.2"
    # One IPv6 host may use any address of its /64: they count as one source.
    assert source_of(("2001:db8::1", 1, 0, 0)) == source_of(("2001:db8::ffff:1", 2, 0, 0))
    assert source_of(("2001:db8::1", 1, 0, 0)) == "2001:db8::/64"
    assert source_of(("2001:db8:0:1::1", 1, 0, 0)) != source_of(("2001:db8::1", 1, 0, 0))
    assert source_of(("::ffff:10.0.0.7", 1, 0, 0)) == "10.0.0.7"  # mapped IPv4: the IPv4
    assert source_of(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"
    assert listen_backlog(64) == 512 and listen_backlog(1000) == 4000
    assert listen_backlog(65536) == 65535


def test_silent_connections_are_dropped_at_the_first_byte_deadline(
    model_store: ModelStore, tmp_path: Path
) -> None:
    options = options_for(
        model_store,
        tmp_path / "run" / "edge-agent.sock",
        listen="127.0.0.1:0",
        auth_token=TOKEN,
        first_byte_timeout=0.5,
        auth_timeout=4.0,
    )
    thread = ServerThread(options).start()
    try:
        silent = connect_from("127.0.0.2", thread.tcp_address)
        talking = connect_from("127.0.0.2", thread.tcp_address)
        started = time.monotonic()
        talking.sendall(HELLO[:3])  # the start of a request: past the first-byte deadline
        (notice,) = closed_by_daemon(silent)
        silent_for = time.monotonic() - started
        code, data = refusal(notice)
        assert code == ProtocolCode.AUTH_REQUIRED and data == {"timeout_s": 0.5}
        assert 0.3 < silent_for < 3.0
        # The one that spoke keeps its slot until the auth timeout.
        (notice,) = closed_by_daemon(talking)
        talked_for = time.monotonic() - started
        code, data = refusal(notice)
        assert code == ProtocolCode.AUTH_REQUIRED and data == {"timeout_s": 4.0}
        assert 3.5 < talked_for < 8.0
        silent.close()
        talking.close()
    finally:
        thread.stop()


# -- the log under a flood ----------------------------------------------------------------------


def test_log_limiter_counts_what_it_drops() -> None:
    now = [0.0]
    limiter = LogLimiter(burst=3, window=10.0, clock=lambda: now[0])
    assert [limiter.allow("x") for _ in range(5)] == [0, 0, 0, None, None]
    assert limiter.allow("y") == 0  # keys are limited separately
    assert limiter.flush() == []  # the window is still open
    now[0] = 10.0
    assert limiter.allow("x") == 2  # the first line of the next window says what was dropped
    assert limiter.flush() == []
    for _ in range(4):
        limiter.allow("x")
    now[0] = 25.0
    assert limiter.flush() == [("x", 2)]  # a window that ended quietly: one summary
    assert limiter.flush() == []  # reported once
    limiter.allow("z")
    for _ in range(7):
        limiter.allow("z")
    assert limiter.flush(everything=True) == [("z", 5)]  # at shutdown, whatever is pending
    with pytest.raises(ValueError):
        LogLimiter(burst=0)


def test_a_flood_of_refusals_does_not_grow_the_log(
    model_store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A one-second window, so the test sees windows end and their summaries written.
    monkeypatch.setattr(server_module, "LOG_WINDOW_S", 1.0)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(KeyValueFormatter())
    logger = logging.getLogger("edge_agent.server")
    logger.addHandler(handler)
    options = options_for(
        model_store,
        tmp_path / "run" / "edge-agent.sock",
        listen="127.0.0.1:0",
        auth_token=TOKEN,
        max_preauth_per_source=2,
    )
    thread = ServerThread(options).start()
    flood_started = time.monotonic()
    try:
        held = [hello_from("127.0.0.2", thread.tcp_address) for _ in range(2)]
        refused = 0
        for _ in range(400):  # each refused at once: the source holds its 2
            sock, message = hello_from("127.0.0.2", thread.tcp_address)
            sock.close()
            refused += refusal(message)[0] == ProtocolCode.OVERLOADED
        assert refused == 400
        for sock, _ in held:
            sock.close()
        rejected = transport_stats(thread)["rejected"]
    finally:
        thread.stop()  # reports what is still suppressed
        logger.removeHandler(handler)
    windows = (time.monotonic() - flood_started) / 1.0 + 1
    lines = out.getvalue().splitlines()
    written = [line for line in lines if "event=connection_rejected" in line]
    summaries = [line for line in lines if "event=log_suppressed of=connection_rejected" in line]

    def suppressed(line: str) -> int:
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        return int(fields.get("suppressed", 0))

    # Bounded: at most LOG_BURST lines per window, plus one summary per window...
    assert len(written) <= server_module.LOG_BURST * windows
    assert len(summaries) <= windows
    assert len(out.getvalue()) < 400 * len(written[0])  # far less than a line per refusal
    # ...and nothing silently lost: every refusal is a line or counted in one.
    assert rejected == 400
    assert len(written) + sum(map(suppressed, written + summaries)) == rejected
    assert all("similar connection_rejected messages suppressed" in line for line in summaries)


# -- across network namespaces ------------------------------------------------------------------

FLOOD_SCRIPT = r"""
import json, select, socket, sys, time
# Floods until its stdin closes (or for at most `seconds`).
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
hello = bytes.fromhex(sys.argv[4])
open_socks, opened, refused, errors = [], 0, 0, 0
deadline = time.monotonic() + seconds
announced = False
while time.monotonic() < deadline:
    while len(open_socks) < 40:
        try:
            s = socket.create_connection((host, port), timeout=2)
            s.sendall(hello)
        except OSError:
            errors += 1
            break
        s.setblocking(False)
        open_socks.append(s)
        opened += 1
    if not announced and opened >= 40:
        print(json.dumps({"event": "flooding"}), flush=True)
        announced = True
    readable, _, _ = select.select([sys.stdin, *open_socks], [], [], 0.05)
    if sys.stdin in readable:
        break
    for s in readable:
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if data.startswith(b"\x93\x02"):
            refused += 1
        if not data or data.startswith(b"\x93\x02"):
            s.close()
            open_socks.remove(s)
print(json.dumps({"event": "done", "opened": opened, "refused": refused, "errors": errors}),
      flush=True)
"""

CLIENT_SCRIPT = r"""
import json, sys
from edge_agent.client import Client
ok, errors = 0, []
for _ in range(10):
    try:
        with Client(sys.argv[1], timeout=30.0, token=sys.argv[2]) as c:
            ok += c.health()["status"] == "ok"
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
print(json.dumps({"ok": ok, "errors": errors}))
"""


def test_flood_from_another_host_does_not_lock_out_a_token_holder(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """The same attack between separate network stacks: the daemon on one namespace, the
    flood on a second, the token holder on a third, joined by a bridge of their own."""
    available, reason = namespaces_available()
    if not available:
        pytest.skip(f"network namespaces unavailable: {reason}")
    (tmp_path / "lan").mkdir()
    lan = Lan(tmp_path / "lan", True)
    flood: subprocess.Popen[str] | None = None
    try:
        box, attacker, user = (lan.add_host(name) for name in ("box", "attacker", "user"))
        assert box.netns is not None and attacker.netns is not None
        agent = box.spawn(
            "agent", "--models-dir", os.fspath(model_store.root), "--data",
            os.fspath(tmp_path / "box"), "--listen", f"{box.ipv4}:0", "--token", TOKEN,
        )  # fmt: skip
        address = ""
        for _ in range(4):  # the Unix socket's "ready" comes first, then TCP's
            address = agent.expect("ready", timeout=120)["address"]
            if address.startswith("tcp://"):
                break
        endpoint = parse_address(address)
        flood = subprocess.Popen(
            ["ip", "netns", "exec", attacker.netns, sys.executable, "-c", FLOOD_SCRIPT,
             endpoint.host, str(endpoint.port), "60", HELLO.hex()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT,
        )  # fmt: skip
        assert flood.stdout is not None
        ready, _, _ = select.select([flood.stdout], [], [], 30)
        assert ready, "the flood did not start"
        assert json.loads(flood.stdout.readline())["event"] == "flooding"
        result = user.run(sys.executable, "-c", CLIENT_SCRIPT, address, TOKEN, timeout=120)
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)
        assert outcome == {"ok": 10, "errors": []}
        flood_out, flood_err = flood.communicate(timeout=30)  # closes its stdin: it stops
        summary = json.loads(flood_out.splitlines()[-1])
        assert summary["refused"] > 0, flood_err  # it was held to its share, not ignored
        assert summary["errors"] == 0  # accepted and answered, never dropped by the kernel
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                flood.communicate(timeout=10)
        lan.close()
