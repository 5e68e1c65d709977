"""`models pull` against a real HTTP server on 127.0.0.1 serving the real default model's GGUF."""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from edge_agent.embedding.embedder import Embedder, EmbedderConfig
from edge_agent.errors import (
    DownloadError,
    IntegrityError,
    InvalidArgument,
    ModelFileError,
)
from edge_agent.models import DEFAULT_MODEL, ModelStore
from edge_agent.models import pull as pull_module
from edge_agent.models.pull import pull_gguf

SENTENCE = "A man is playing a guitar on a sunny afternoon."
# Not a multiple of the client's read size, so resume offsets are not accidentally aligned.
DROP_AT = 3_000_001


@dataclass
class Behaviour:
    """What the test server does; tests set it before pulling."""

    payload: bytes = b""
    status: int | None = None  # answer every request with this error status
    first_status: int | None = None  # answer only the first request with this error status
    ignore_range: bool = False  # always 200 with the whole payload
    drop_after: int | None = None  # first request: send this many body bytes, then hang up
    drop_every: bool = False  # apply drop_after to every request, not just the first
    reset: bool = False  # hang up with a TCP RST instead of a clean close
    redirect: str | None = None  # first request: 302 to this location
    part_file: Path | None = None  # recorded at each request: how many bytes the client holds
    requests: list[dict[str, str]] = field(default_factory=list)
    bytes_on_disk: list[int | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: Behaviour

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.to_reset: set[socket.socket] = set()

    def handle_error(self, request: object, client_address: object) -> None:
        # The tests cut connections on purpose (resets, stalls, aborted downloads): the
        # handler's broken-pipe traceback on stderr would be noise, not a finding.
        pass

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        if request in self.to_reset:
            # The stock shutdown(SHUT_WR) would send a FIN first and the client would see a
            # clean EOF; closing with SO_LINGER 0 and nothing else sends the RST.
            self.to_reset.discard(request)
            self.close_request(request)
            return
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean

    def do_GET(self) -> None:
        b = self.server.behaviour
        with b.lock:
            b.requests.append({k.lower(): v for k, v in self.headers.items()})
            b.bytes_on_disk.append(
                b.part_file.stat().st_size if b.part_file and b.part_file.exists() else None
            )
            first = len(b.requests) == 1
        if b.status is not None or (first and b.first_status is not None):
            self.send_error(b.status if b.status is not None else b.first_status or 500)
            return
        if first and b.redirect is not None:
            self.send_response(302)
            self.send_header("Location", b.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data, start = b.payload, 0
        wanted = self.headers.get("Range")
        if wanted and not b.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", wanted.strip())
            assert match, f"client sent an unexpected Range: {wanted!r}"
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if b.drop_after is not None and (first or b.drop_every):
            self.wfile.write(body[: b.drop_after])
            self.wfile.flush()
            if b.reset:
                # Give the client time to drain its receive buffer: an RST makes the kernel
                # drop unread data, and the test wants some bytes on disk to resume from.
                time.sleep(0.5)
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.server.to_reset.add(self.connection)
            self.close_connection = True
            return
        self.wfile.write(body)


@dataclass
class Server:
    behaviour: Behaviour
    base: str

    def url(self, path: str = "/models/minilm.Q8_0.gguf") -> str:
        return self.base + path


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours proxy variables; a proxy would take the test's traffic off 127.0.0.1.
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setattr(pull_module, "RETRY_BACKOFF_S", 0.0)


@pytest.fixture(scope="session")
def gguf_bytes(model_store: ModelStore) -> bytes:
    return model_store.resolve(DEFAULT_MODEL, "Q8_0").path.read_bytes()


@pytest.fixture
def server(gguf_bytes: bytes) -> Iterator[Server]:
    httpd = _Server(("127.0.0.1", 0))
    httpd.behaviour = Behaviour(payload=gguf_bytes)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Server(httpd.behaviour, f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def part_path(store: ModelStore, digest: str) -> Path:
    return store.root / ".downloads" / f"{digest}.part"


def test_pull_registers_a_model_that_embeds_like_the_source(
    server: Server, store: ModelStore, model_store: ModelStore, gguf_bytes: bytes
) -> None:
    digest = sha(gguf_bytes)
    manifest = pull_gguf(store, server.url(), digest.upper(), name="minilm")

    assert manifest.name == "minilm"
    assert manifest.source == server.url()
    assert manifest.files["Q8_0"].sha256 == digest
    assert manifest.files["Q8_0"].size == len(gguf_bytes)
    assert manifest.dims == model_store.get(DEFAULT_MODEL).dims
    assert store.names() == ["minilm"]
    assert not part_path(store, digest).exists()
    assert len(server.behaviour.requests) == 1
    assert "range" not in server.behaviour.requests[0]

    config = EmbedderConfig(threads=2)
    with (
        Embedder(store.resolve("minilm"), config) as pulled,
        Embedder.open(model_store, DEFAULT_MODEL, "Q8_0", config) as source,
    ):
        a = pulled.embed([SENTENCE]).vectors[0]
        b = source.embed([SENTENCE]).vectors[0]
    cosine = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cosine > 0.9999


def test_second_pull_makes_no_request(server: Server, store: ModelStore, gguf_bytes: bytes) -> None:
    digest = sha(gguf_bytes)
    first = pull_gguf(store, server.url(), digest, name="minilm")
    assert len(server.behaviour.requests) == 1

    assert pull_gguf(store, server.url(), digest, name="minilm") == first
    # Without a name, any model holding the digest counts.
    assert pull_gguf(store, server.url("/elsewhere.gguf"), digest) == first
    assert len(server.behaviour.requests) == 1


def test_default_name_comes_from_gguf_metadata(
    server: Server, store: ModelStore, gguf_bytes: bytes
) -> None:
    manifest = pull_gguf(store, server.url(), sha(gguf_bytes))
    assert store.names() == [manifest.name]
    assert manifest.name != sha(gguf_bytes)  # not the part file's stem


@pytest.mark.parametrize("reset", [False, True], ids=["eof", "rst"])
def test_dropped_connection_resumes_with_range(
    server: Server, store: ModelStore, gguf_bytes: bytes, reset: bool
) -> None:
    digest = sha(gguf_bytes)
    b = server.behaviour
    b.drop_after, b.reset, b.part_file = DROP_AT, reset, part_path(store, digest)

    manifest = pull_gguf(store, server.url(), digest, name="minilm")

    assert len(b.requests) == 2
    held = b.bytes_on_disk[1]
    assert held is not None and 0 < held <= DROP_AT
    if not reset:
        assert held == DROP_AT
    assert b.requests[1]["range"] == f"bytes={held}-"
    assert store.verify_all("minilm") == {"Q8_0": "ok"}
    assert manifest.files["Q8_0"].sha256 == digest
    assert not b.part_file.exists()


def test_leftover_part_file_is_resumed(
    server: Server, store: ModelStore, gguf_bytes: bytes
) -> None:
    digest = sha(gguf_bytes)
    part = part_path(store, digest)
    part.parent.mkdir(parents=True)
    part.write_bytes(gguf_bytes[:DROP_AT])

    pull_gguf(store, server.url(), digest, name="minilm")

    assert [r.get("range") for r in server.behaviour.requests] == [f"bytes={DROP_AT}-"]
    assert store.verify_all("minilm") == {"Q8_0": "ok"}


def test_complete_part_file_needs_no_request(
    server: Server, store: ModelStore, gguf_bytes: bytes
) -> None:
    digest = sha(gguf_bytes)
    part = part_path(store, digest)
    part.parent.mkdir(parents=True)
    part.write_bytes(gguf_bytes)

    pull_gguf(store, server.url(), digest, name="minilm")

    assert server.behaviour.requests == []
    assert store.verify_all("minilm") == {"Q8_0": "ok"}


def test_stale_part_longer_than_file_restarts_after_416(
    server: Server, store: ModelStore, gguf_bytes: bytes
) -> None:
    digest = sha(gguf_bytes)
    part = part_path(store, digest)
    part.parent.mkdir(parents=True)
    part.write_bytes(gguf_bytes + b"junk")

    pull_gguf(store, server.url(), digest, name="minilm")

    assert [r.get("range") for r in server.behaviour.requests] == [
        f"bytes={len(gguf_bytes) + 4}-",
        None,
    ]
    assert store.verify_all("minilm") == {"Q8_0": "ok"}


def test_server_ignoring_range_restarts_from_zero(
    server: Server, store: ModelStore, gguf_bytes: bytes
) -> None:
    digest = sha(gguf_bytes)
    b = server.behaviour
    b.drop_after, b.ignore_range = DROP_AT, True
    # Garbage in the part file proves the 200 body replaces it rather than being appended.
    part = part_path(store, digest)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)

    pull_gguf(store, server.url(), digest, name="minilm")

    assert [r.get("range") for r in b.requests] == ["bytes=1000-", f"bytes={DROP_AT}-"]
    assert store.verify_all("minilm") == {"Q8_0": "ok"}
    assert not part.exists()


def test_404_is_a_download_error_without_retries(server: Server, store: ModelStore) -> None:
    server.behaviour.status = 404
    digest = sha(server.behaviour.payload)
    with pytest.raises(DownloadError) as info:
        pull_gguf(store, server.url("/missing.gguf"), digest)
    assert "404" in info.value.message
    assert info.value.data["status"] == 404
    assert info.value.data["url"] == server.url("/missing.gguf")
    assert len(server.behaviour.requests) == 1
    assert store.names() == []
    assert not part_path(store, digest).exists()


def test_transient_status_is_retried(server: Server, store: ModelStore, gguf_bytes: bytes) -> None:
    server.behaviour.first_status = 503
    pull_gguf(store, server.url(), sha(gguf_bytes), name="minilm")
    assert len(server.behaviour.requests) == 2
    assert store.names() == ["minilm"]


def test_persistent_500_gives_up_after_retries(server: Server, store: ModelStore) -> None:
    server.behaviour.status = 500
    with pytest.raises(DownloadError) as info:
        pull_gguf(store, server.url(), sha(server.behaviour.payload), retries=2)
    assert info.value.data["status"] == 500
    assert "500" in info.value.message
    assert len(server.behaviour.requests) == 3


def test_retries_are_bounded_and_keep_the_part(
    server: Server, store: ModelStore, gguf_bytes: bytes
) -> None:
    digest = sha(gguf_bytes)
    b = server.behaviour
    b.drop_after, b.drop_every = 1000, True

    with pytest.raises(DownloadError) as info:
        pull_gguf(store, server.url(), digest, retries=2)

    assert len(b.requests) == 3
    assert info.value.data["attempts"] == 3
    assert store.names() == []
    # What arrived is kept for the next pull to resume from.
    assert part_path(store, digest).stat().st_size == 3000

    b.drop_after = None
    pull_gguf(store, server.url(), digest, name="minilm")
    assert b.requests[-1]["range"] == "bytes=3000-"
    assert store.verify_all("minilm") == {"Q8_0": "ok"}


def test_redirects_are_followed_over_http_only(
    server: Server, store: ModelStore, gguf_bytes: bytes
) -> None:
    b = server.behaviour
    b.redirect = server.url("/real/minilm.Q8_0.gguf")
    pull_gguf(store, server.url("/latest.gguf"), sha(gguf_bytes), name="minilm")
    assert len(b.requests) == 2
    assert store.verify_all("minilm") == {"Q8_0": "ok"}

    b.requests.clear()
    b.redirect = "ftp://127.0.0.1/minilm.Q8_0.gguf"
    with pytest.raises(DownloadError) as info:
        pull_gguf(store, server.url("/latest.gguf"), sha(b"other"), name="other")
    assert "ftp" in info.value.message
    assert len(b.requests) == 1  # given up at the redirect, not retried
    assert store.names() == ["minilm"]


def test_connection_refused_is_a_download_error(store: ModelStore) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now.
    with pytest.raises(DownloadError) as info:
        pull_gguf(store, f"http://127.0.0.1:{port}/x.gguf", "a" * 64, retries=1, timeout=2)
    assert "network error" in info.value.message
    assert info.value.data["attempts"] == 2


def test_wrong_sha256_is_an_integrity_error(
    server: Server, store: ModelStore, gguf_bytes: bytes
) -> None:
    wrong = sha(b"something else")
    with pytest.raises(IntegrityError) as info:
        pull_gguf(store, server.url(), wrong, name="minilm")
    message = info.value.message
    assert server.url() in message and wrong in message and sha(gguf_bytes) in message
    assert info.value.data == {"url": server.url(), "expected": wrong, "actual": sha(gguf_bytes)}
    assert store.names() == []
    assert not part_path(store, wrong).exists()
    assert list((store.root / ".downloads").iterdir()) == []


def test_non_gguf_payload_is_a_model_file_error(server: Server, store: ModelStore) -> None:
    junk = b"<html>definitely not a model</html>" * 1000
    server.behaviour.payload = junk
    with pytest.raises(ModelFileError) as info:
        pull_gguf(store, server.url("/junk.gguf"), sha(junk), name="junk")
    assert not isinstance(info.value, IntegrityError)
    assert "not a GGUF" in info.value.message
    assert "junk" not in store.names()
    assert store.names() == []
    assert not part_path(store, sha(junk)).exists()


def test_max_bytes_is_enforced(server: Server, store: ModelStore, gguf_bytes: bytes) -> None:
    digest = sha(gguf_bytes)
    with pytest.raises(DownloadError) as info:
        pull_gguf(store, server.url(), digest, max_bytes=1_000_000)
    assert info.value.data["limit"] == 1_000_000
    assert info.value.data["size"] == len(gguf_bytes)
    assert not part_path(store, digest).exists()
    assert store.names() == []


def test_credentials_in_the_url_are_refused_without_echoing_them(store: ModelStore) -> None:
    with pytest.raises(InvalidArgument) as info:
        pull_gguf(store, "http://user:s3cret@127.0.0.1:9/m.gguf", "a" * 64)
    assert "s3cret" not in str(info.value) and "s3cret" not in repr(info.value.data)


@pytest.mark.parametrize(
    ("url", "digest", "kwargs"),
    [
        ("ftp://127.0.0.1/model.gguf", "a" * 64, {}),
        ("file:///etc/passwd", "a" * 64, {}),
        ("127.0.0.1/model.gguf", "a" * 64, {}),
        ("http:///model.gguf", "a" * 64, {}),
        ("http://127.0.0.1/model gguf", "a" * 64, {}),
        ("http://127.0.0.1:99999999/model.gguf", "a" * 64, {}),
        ("http://127.0.0.1/model.gguf", "a" * 63, {}),
        ("http://127.0.0.1/model.gguf", "g" * 64, {}),
        ("http://127.0.0.1/model.gguf", "a" * 65, {}),
        ("http://127.0.0.1/model.gguf", "a" * 64, {"name": "../escape"}),
        ("http://127.0.0.1/model.gguf", "a" * 64, {"retries": -1}),
        ("http://127.0.0.1/model.gguf", "a" * 64, {"max_bytes": 0}),
        ("http://127.0.0.1/model.gguf", "a" * 64, {"timeout": 0}),
    ],
)
def test_bad_arguments_are_rejected_before_any_io(
    store: ModelStore, url: str, digest: str, kwargs: dict[str, object]
) -> None:
    with pytest.raises(InvalidArgument):
        pull_gguf(store, url, digest, **kwargs)  # type: ignore[arg-type]
    assert not store.root.exists()
