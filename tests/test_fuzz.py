"""Hostile bytes against a real daemon: the decoder and the dispatcher, fuzzed with Hypothesis
over real Unix and TCP sockets. Whatever arrives, the daemon answers or closes that connection,
never dies, keeps memory bounded and keeps serving a bystander client.

Bounded: a fixed number of examples, each with a 5 s socket timeout; all traffic is loopback.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daemon import ServerThread, options_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.client import Client, parse_address
from edge_agent.daemon.server import PREAUTH_MAX_BYTES
from edge_agent.models import ModelStore
from edge_agent.protocol import ARGUMENTS, ProtocolCode, encode_request

TOKEN = "fuzz-token-0123456789abcdef"
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def rss_mb() -> float:
    """This process's resident memory: the daemon runs on a thread in it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def daemon(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("fuzz") / "run" / "edge-agent.sock"
    options = options_for(model_store, path, listen="127.0.0.1:0", auth_token=TOKEN)
    thread = ServerThread(options).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def bystander(daemon: ServerThread) -> Iterator[Client]:
    """A client that stays connected through the whole fuzz run."""
    with Client(daemon.socket_path, timeout=30.0) as c:
        c.add("fuzz-keep", [{"id": "k", "text": "a document that must survive"}])
        yield c


def exchange(sock: socket.socket, payload: bytes) -> list[Any]:
    """Send, half-close, read until the daemon closes; return the messages it sent."""
    sock.settimeout(5.0)
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the daemon may hang up mid-send on a fatal frame: that is an answer too
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    try:
        while chunk := sock.recv(65536):
            unpacker.feed(chunk)
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return list(unpacker)


def unix(daemon: ServerThread) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket_path))
    return sock


def tcp(daemon: ServerThread) -> socket.socket:
    endpoint = parse_address(daemon.tcp_address)
    return socket.create_connection((endpoint.host, endpoint.port), timeout=5.0)


def still_serving(bystander: Client) -> None:
    assert bystander.health()["status"] == "ok"
    assert bystander.search("fuzz-keep", "document", k=1)[0].id == "k"


HOSTILE = [
    b"\xdd\xff\xff\xff\xff",  # array32 declaring 4 billion elements
    b"\xdf\xff\xff\xff\xff",  # map32, same
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\x91" * 100_000,  # 100k nested arrays
    b"\x94\x00\x01\xa5embed\x91" + b"\x81" * 50_000,  # nested maps inside params
    b"\xc1",  # the one byte MessagePack never uses
    b"\x94\x00\xce\xff\xff\xff\xff\xa5hello\x90" * 1000,  # many valid requests, max msgid
    b"\x93\x00\x01\xa5hello",  # a request with 3 elements
    b"\x94\x00\x01\xa5hello\x91\x81\x01\x02",  # int map key
    b"GET / HTTP/1.1\r\n\r\n",
    b"\x00" * 4096,
]


@pytest.mark.parametrize("payload", HOSTILE, ids=range(len(HOSTILE)))
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_known_hostile_frames(
    daemon: ServerThread, bystander: Client, payload: bytes, transport: str
) -> None:
    before = rss_mb()
    exchange((unix if transport == "unix" else tcp)(daemon), payload)
    assert rss_mb() - before < 64  # no allocation from a declared length
    still_serving(bystander)


@pytest.mark.parametrize("header", [b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"],
                         ids=["str32", "bin32"])  # fmt: skip
@pytest.mark.parametrize("transport", ["unix", "tcp-before-auth", "tcp-after-auth"])
def test_declared_lengths_are_refused_at_the_header(
    daemon: ServerThread, bystander: Client, header: bytes, transport: str
) -> None:
    """A 5-byte header declaring 4 GiB gets MESSAGE_TOO_LARGE at once, on every transport and
    before or after auth, with the limit that applies there; nothing more is read."""
    sock = unix(daemon) if transport == "unix" else tcp(daemon)
    limit = daemon.options.max_message_bytes
    if transport == "tcp-before-auth":
        limit = PREAUTH_MAX_BYTES
    elif transport == "tcp-after-auth":
        sock.sendall(encode_request(1, "auth", {"token": TOKEN}))
        unpacker = msgpack.Unpacker(raw=False)
        sock.settimeout(5.0)
        while not (replies := list(unpacker)):
            unpacker.feed(sock.recv(65536))
        assert replies[0][2] is None  # authenticated
    sock.settimeout(5.0)
    sock.sendall(header)  # no shutdown: the daemon must not wait for more
    unpacker = msgpack.Unpacker(raw=False)
    try:
        while chunk := sock.recv(65536):
            unpacker.feed(chunk)
    finally:
        sock.close()
    (notice,) = list(unpacker)
    code, _name, _message, data = notice[2][0]["error"]
    assert code == ProtocolCode.MESSAGE_TOO_LARGE
    assert data == {"limit": limit, "declared": 2**32 - 1}
    still_serving(bystander)


@FUZZ
@given(payload=st.binary(max_size=2048))
def test_random_bytes(daemon: ServerThread, bystander: Client, payload: bytes) -> None:
    replies = exchange(unix(daemon), payload)
    for message in replies:
        # Only replies and the fatal-error notification ever come back.
        assert isinstance(message, list) and message[0] in (1, 2)
    still_serving(bystander)


@FUZZ
@given(data=st.data())
def test_truncated_valid_frames(
    daemon: ServerThread, bystander: Client, data: st.DataObject
) -> None:
    frame = encode_request(7, "embed", {"texts": ["one", "two"], "kind": "query"})
    cut = data.draw(st.integers(0, len(frame) - 1))
    assert exchange(unix(daemon), frame[:cut]) == []  # dropped without a reply
    still_serving(bystander)


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=20,
)  # fmt: skip
# Methods the fuzzer may call; "collections" is left out so random arguments cannot drop the
# bystander's collection (its argument checks are covered in test_daemon_index.py).
METHODS = st.sampled_from([*sorted(set(ARGUMENTS) - {"collections"}), "", "nope", "x" * 300])
ARG_NAMES = st.sampled_from(
    ["texts", "kind", "collection", "docs", "ids", "text", "vector", "dims", "k", "filter",
     "ef", "token", "dimensions", "long_text", "with_vectors", "if_exists", "create", "zz"]
)  # fmt: skip


@FUZZ
@given(
    method=METHODS,
    args=st.dictionaries(ARG_NAMES, MSGPACK_VALUES, max_size=6) | st.none(),
    raw_params=st.none() | MSGPACK_VALUES,
)
def test_dispatcher_answers_every_request(
    daemon: ServerThread, bystander: Client, method: str, args: Any, raw_params: Any
) -> None:
    if raw_params is not None and args is None:
        payload = msgpack.packb([0, 42, method, raw_params], use_bin_type=True)
    else:
        if isinstance(args, dict) and args.get("collection") is not None:
            args["collection"] = "fuzz-" + str(args["collection"])[:20]
        payload = encode_request(42, method, args)
    payload += encode_request(43, "health")
    replies = exchange(unix(daemon), payload)
    by_id = {m[1]: m for m in replies if m[0] == 1}
    if 42 in by_id:
        error = by_id[42][2]
        if error is not None:
            code, name, message, _data = error
            assert isinstance(code, int) and isinstance(name, str) and isinstance(message, str)
            assert code != 500, error  # never an internal error for bad input
        # The connection stayed usable: the next request was answered too.
        assert by_id[43][2] is None
    else:
        # Only a params value that is not an array of one map may end the conversation, and
        # then with the fatal notification.
        assert replies and replies[-1][0] == 2
    still_serving(bystander)


@FUZZ
@given(payload=st.binary(max_size=512))
def test_random_bytes_before_auth_on_tcp(
    daemon: ServerThread, bystander: Client, payload: bytes
) -> None:
    replies = exchange(tcp(daemon), payload)
    for message in replies:
        if isinstance(message, list) and message and message[0] == 1 and message[2] is None:
            # Anything answered without an error before auth can only be hello or auth.
            assert "model" in message[3] or "authenticated" in message[3]
    still_serving(bystander)


def test_memory_stays_bounded_after_the_fuzz(daemon: ServerThread, bystander: Client) -> None:
    before = rss_mb()
    for payload in HOSTILE * 3:
        exchange(unix(daemon), payload)
        exchange(tcp(daemon), payload)
    assert rss_mb() - before < 64
    still_serving(bystander)
