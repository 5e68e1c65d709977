"""Field faults (issue #12) through the real daemon: vectors of extreme magnitude over the
socket, what errors tell a remote (TCP) client, reserved collection names, and a full disk
(a real tmpfs) under the index, including SIGTERM while it is full."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon import ServerThread, options_for
from disk import Filler, small_tmpfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.client import Client
from edge_agent.errors import (
    CollectionNotFound,
    EdgeAgentError,
    ErrorCode,
    IndexCorrupt,
    IndexFull,
    InvalidArgument,
)
from edge_agent.index import IndexConfig, IndexStore, ModelFingerprint
from edge_agent.models import ModelStore

DIMS = 384
TOKEN = "faults-token-0123456789abcdef"
EXTREME = [1.4e-45, 1e-40, 1e-38, 1e-20, 1.0, 1e19, 1e20, 1e30, 3e38, 3.4028235e38]


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.standard_normal((n, DIMS)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def direction(vector: np.ndarray) -> np.ndarray:
    """The unit vector, computed in float64 after scaling into [-1, 1] (no overflow)."""
    scaled = vector.astype(np.float64) / np.abs(vector.astype(np.float64)).max()
    return scaled / np.linalg.norm(scaled)


@pytest.fixture(scope="module")
def daemon(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("faults") / "run" / "edge-agent.sock"
    options = options_for(model_store, path, listen="127.0.0.1:0", auth_token=TOKEN)
    index_dir = options.index_dir
    assert index_dir is not None
    # A collection that cannot be opened: its error message names its files.
    with IndexStore(index_dir) as store:
        store.create("broken", ModelFingerprint("m", "e" * 64, DIMS, "mean"))
    (index_dir / "broken" / "manifest.json").write_text("{ not json")
    thread = ServerThread(options).start()
    yield thread
    thread.stop()


@pytest.fixture
def client(daemon: ServerThread) -> Iterator[Client]:
    with Client(daemon.socket_path, timeout=60.0) as c:
        yield c


@pytest.fixture
def remote(daemon: ServerThread) -> Iterator[Client]:
    with Client(daemon.tcp_address, timeout=60.0, token=TOKEN) as c:
        yield c


# -- vectors of extreme magnitude ---------------------------------------------------------------


def test_extreme_vectors_are_stored_and_searched_by_their_direction(client: Client) -> None:
    rows = np.zeros((5, DIMS), dtype=np.float32)
    rows[0, 5], rows[0, 6] = 1e20, 1.0  # the vector: was stored as all zeros
    rows[1] = 3e38
    rows[2, ::2], rows[2, 1::2] = 1.4e-45, -1.4e-45  # subnormals (another direction than 1)
    rows[3, ::7] = 1e-38
    rows[3, 1] = -3e38
    rows[4, :10] = [1e19, -1e20, 1e-45, 3e38, 1, 0, -1e-38, 2e38, 5e37, -1e30]
    ids = [f"x{i}" for i in range(len(rows))]
    assert client.add_vectors("extreme", ids, rows)["added"] == len(rows)
    stored = client.get("extreme", ids, with_vectors=True)
    for row, doc in zip(rows, stored, strict=True):
        assert doc is not None
        np.testing.assert_allclose(doc["vector"], direction(row), atol=1e-6)
    for i, row in enumerate(rows):
        hits = client.search("extreme", vector=row, k=1)
        assert hits[0].id == f"x{i}" and hits[0].score > 0.9999, (i, hits)


sparse_extreme = st.lists(
    st.tuples(
        st.integers(0, DIMS - 1),
        st.sampled_from(EXTREME),
        st.sampled_from([1.0, -1.0]),
    ),
    min_size=1,
    max_size=12,
)


def test_extreme_vectors_over_the_socket_property(client: Client) -> None:
    rng = np.random.default_rng(21)
    client.add_vectors("prop", [f"base{i}" for i in range(30)], unit(rng, 30))
    counter = iter(range(10**6))

    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(entries=sparse_extreme)
    def check(entries: list[tuple[int, float, float]]) -> None:
        vector = np.zeros(DIMS, dtype=np.float32)
        for position, magnitude, sign in entries:
            vector[position] = np.float32(magnitude * sign)
        doc_id = f"p{next(counter)}"
        client.add_vectors("prop", [doc_id], vector[None, :])
        doc = client.get("prop", [doc_id], with_vectors=True)[0]
        assert doc is not None
        np.testing.assert_allclose(doc["vector"], direction(vector), atol=1e-6)
        assert client.search("prop", vector=vector, k=1)[0].score > 0.9999

    check()


def test_a_zero_vector_is_refused_by_index_and_the_connection_serves_on(client: Client) -> None:
    rng = np.random.default_rng(4)
    rows = unit(rng, 3)
    rows[1] = 0.0
    with pytest.raises(InvalidArgument) as info:
        client.add_vectors("never-made", ["a", "b", "c"], rows)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert "vectors[1]" in info.value.message and info.value.data["index"] == 1
    # Refused before the collection was made for it.
    assert "never-made" not in {c["name"] for c in client.collections()}
    client.add_vectors("zeros", ["ok"], rows[:1])
    with pytest.raises(InvalidArgument) as info:
        client.add_vectors("zeros", ["ok2", "bad"], np.stack([rows[0], rows[1]]))
    assert "vectors[1]" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        client.search("zeros", vector=np.zeros(DIMS, dtype=np.float32))
    assert "vector[0]" in info.value.message
    assert client.count("zeros") == 1 and client.health()["model_loaded"]


# -- what a remote client learns ----------------------------------------------------------------


def test_errors_over_tcp_name_no_server_path_and_no_other_collection(
    daemon: ServerThread, remote: Client
) -> None:
    index_dir = str(daemon.options.index_dir)
    remote.add_vectors("private-notes", ["a"], unit(np.random.default_rng(1), 1))
    vector = unit(np.random.default_rng(2), 1)[0]
    for call in (
        lambda: remote.count("missing"),
        lambda: remote.search("missing", vector=vector),
        lambda: remote.get("missing", ["a"]),
        lambda: remote.delete("missing", ["a"]),
        lambda: remote.collection_info("missing"),
        lambda: remote.add_vectors("missing", ["a"], vector[None, :], create=False),
    ):
        with pytest.raises(CollectionNotFound) as info:
            call()
        text = f"{info.value.message} {info.value.data}"
        assert "missing" in text
        for secret in (index_dir, "private-notes", "broken", str(Path(index_dir).parent)):
            assert secret not in text, text
    # A damaged collection: the message still says what to run, naming it, not its path.
    with pytest.raises(IndexCorrupt) as corrupt:
        remote.count("broken")
    assert "edge-agent index check broken" in corrupt.value.message
    assert index_dir not in f"{corrupt.value.message} {corrupt.value.data}"
    health = remote.health()
    assert health["status"] == "degraded" and "broken" in health["index"]["unavailable"]
    assert index_dir not in str(health)
    assert index_dir not in str(remote.collections())


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("CON", "device_name"),
        ("lpt1", "device_name"),
        ("LOCK", "reserved_file_name"),
        ("index", "reserved_file_name"),
        ("manifest", "reserved_file_name"),
    ],
)
def test_reserved_collection_names_are_refused_over_the_wire(
    daemon: ServerThread, remote: Client, name: str, rule: str
) -> None:
    vector = unit(np.random.default_rng(3), 1)
    with pytest.raises(InvalidArgument) as info:
        remote.create_collection(name)
    assert info.value.data["rule"] == rule and name in info.value.message
    with pytest.raises(InvalidArgument) as info:
        remote.add_vectors(name, ["a"], vector)
    assert info.value.data["rule"] == rule
    with pytest.raises(InvalidArgument) as info:
        remote.add(name, [{"id": "a", "text": "hello"}])
    assert info.value.data["rule"] == rule
    assert name not in {c["name"] for c in remote.collections()}
    index_dir = daemon.options.index_dir
    assert index_dir is not None and not (index_dir / name).exists()
    assert remote.health()["model_loaded"]


# -- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "index") as mount:
        yield mount


def index_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("edge_agent")
    ]


def test_a_full_disk_under_the_daemon(
    model_store: ModelStore, tmp_path: Path, disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(8)
    filler = Filler(disk)
    # Synchronous snapshots every 4 writes: a snapshot is tried at known points.
    config = IndexConfig(snapshot_in_background=False, snapshot_wal_records=4)
    options = options_for(
        model_store, tmp_path / "run" / "agent.sock", index_dir=disk, index=config
    )
    acknowledged: list[str] = []

    def add(client: Client, n: int = 1) -> None:
        ids = [f"d{len(acknowledged) + i}" for i in range(n)]
        client.add_vectors("full", ids, unit(rng, n))
        acknowledged.extend(ids)

    server = ServerThread(options).start()
    try:
        with Client(server.socket_path, timeout=60.0) as c:
            add(c, 40)
            assert c.health()["status"] == "ok"
            # Room for a few WAL records, not for a snapshot of 40 x 384-d (~70 KiB).
            filler.fill(leave=40 << 10)
            for _ in range(3):
                add(c)
            health = c.health()
            assert health["status"] == "degraded", health
            assert "disk full" in health["index"]["snapshot_errors"]["full"]
            assert "snapshots of 'full' fail" in health["index"]["reason"]
            # Now until writes fail too: INDEX_FULL, never INTERNAL, nothing acknowledged lost.
            failure: EdgeAgentError | None = None
            for _ in range(200):
                try:
                    add(c, 8)
                except IndexFull as exc:
                    failure = exc
                    break
            assert failure is not None and failure.code == ErrorCode.INDEX_FULL
            assert failure.data["reason"] == "disk_full"
            assert str(disk) not in f"{failure.message} {failure.data}"
            filler.fill()
            with pytest.raises(IndexFull) as created:
                c.create_collection("other")
            assert created.value.code == ErrorCode.INDEX_FULL
            assert str(disk) not in created.value.message
            health = c.health()
            assert health["status"] == "degraded" and "disk full" in health["index"]["write_error"]
            assert "writes fail" in health["index"]["reason"]
            assert c.count("full") == len(acknowledged)
            info = c.collection_info("full")
            assert "disk full" in info["stats"]["snapshot_error"]
            assert str(disk) not in str(info)
            # Space again: the next write succeeds, its snapshot too, and health is ok.
            filler.free()
            add(c)
            assert c.create_collection("other")["name"] == "other"
            health = c.health()
            assert health["status"] == "ok", health
            assert health["index"]["write_error"] is None
            assert health["index"]["snapshot_errors"] == {} and "reason" not in health["index"]
            # Unsnapshotted writes, then the disk fills and the daemon is told to stop.
            add(c, 2)
            filler.fill()
            count = c.count("full")
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            server.stop()  # what SIGTERM does; raises if run_server failed
        logged = index_errors(caplog)
        assert len(logged) == 1 and "snapshot on close failed" in logged[0], logged
    finally:
        server.stop()
    assert count == len(acknowledged)
    # Restarted on the still-full disk: every acknowledged write is there (from the WAL).
    again = ServerThread(options).start()
    try:
        with Client(again.socket_path, timeout=60.0) as c:
            assert c.count("full") == len(acknowledged)
            docs = c.get("full", acknowledged)
            assert all(doc is not None for doc in docs)
    finally:
        again.stop()


def test_sigterm_with_the_disk_full_stops_cleanly(
    model_store: ModelStore, tmp_path: Path, disk: Path
) -> None:
    """The real `edge-agent serve` process: exit status 0 and one clear log line."""
    sock = tmp_path / "run" / "agent.sock"
    config = tmp_path / "config.toml"
    config.write_text(
        f'socket = "{sock}"\nmodels_dir = "{model_store.root}"\nindex_dir = "{disk}"\n'
        f'state_dir = "{tmp_path / "state"}"\nquant = "Q8_0"\nthreads = 1\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "NOTIFY"))}
    env.update(EDGE_AGENT_HOME=str(tmp_path / "home"), EDGE_AGENT_CONFIG=str(config))
    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "w+", encoding="utf-8") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 120
            while not sock.exists():
                assert proc.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, "the daemon did not start"
                time.sleep(0.1)
            rng = np.random.default_rng(12)
            with Client(sock, timeout=60.0) as c:
                c.add_vectors("notes", [f"n{i}" for i in range(50)], unit(rng, 50))
            Filler(disk).fill()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, stderr_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    log_text = stderr_path.read_text(encoding="utf-8")
    failed = [line for line in log_text.splitlines() if "snapshot on close failed" in line]
    assert len(failed) == 1, log_text
    assert "Traceback" not in log_text and "[Errno 28]" not in log_text, log_text
