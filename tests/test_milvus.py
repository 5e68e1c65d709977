"""Collections in Milvus, with the real pymilvus client against Milvus Lite: in file mode (a
``*.db`` path, served in-process by milvus-lite) and in its gRPC server mode (``milvus-lite
server`` on loopback, a child process this test starts, kills and restarts). The daemon is
the real one with the real default model; results are compared with a local collection
holding the same documents."""

from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon import ServerThread, options_for

pytest.importorskip("pymilvus", reason="the milvus extra: pip install 'edge-agent[milvus]'")

from edge_agent.cli import main as cli_main
from edge_agent.client import Client
from edge_agent.errors import (
    BackendUnavailable,
    DocumentExists,
    ErrorCode,
    InvalidArgument,
    ModelMismatch,
)
from edge_agent.index import IndexStore, ModelFingerprint
from edge_agent.index.filters import compile_filter
from edge_agent.index.milvus_collection import MilvusTarget, expression, quote
from edge_agent.models import ModelStore

DOCS = [
    ("pw", "To reset your password, open Settings and choose Security.",
     {"lang": "en", "topic": "account", "year": 2021, "stars": 4.5, "pinned": True}),
    ("wifi", "The router restarts when you hold the power button for ten seconds.",
     {"lang": "en", "topic": "network", "year": 2019, "stars": 3}),
    ("cake", "Bake the chocolate cake at 180 degrees for forty minutes.",
     {"lang": "en", "topic": "cooking", "year": 2023, "pinned": 1}),
    ("brot", "Das Brot backt bei 220 Grad eine Stunde lang.",
     {"lang": "de", "topic": "cooking", "year": 2020, "note": None}),
    ("quote", 'He said "or id != x" and left \\ behind.',
     {"lang": 'en" or true or "', "topic": "tricky", "year": 2022}),
]
FILTERS: list[dict[str, Any]] = [
    {"lang": "en"},
    {"topic": {"in": ["cooking", "network"]}},
    {"year": {"gte": 2020, "lt": 2023}},
    {"lang": {"ne": "en"}},
    {"topic": {"nin": ["cooking"]}},
    {"pinned": True},  # True is not 1: only "pw"
    {"pinned": 1},
    {"note": None},
    {"stars": {"exists": True}},
    {"stars": {"exists": False}},
    {"or": [{"lang": "de"}, {"year": {"gt": 2022}}]},
    {"not": {"topic": "cooking"}},
    {"lang": 'en" or true or "'},
    {"lang": '" or id != "'},
]
FP = ModelFingerprint("test-model", "ab" * 32, 4, "mean")
# milvus-lite logs at interpreter exit, after pytest closed the captured streams.
logging.getLogger("milvus_lite").setLevel(logging.WARNING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MilvusServer:
    """``milvus-lite server`` on a loopback port, as a child process."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MilvusServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir),
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            assert self.proc.poll() is None, "milvus-lite server exited"
            time.sleep(0.1)
        raise AssertionError("milvus-lite server did not listen within 60 s")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    milvus = MilvusServer(tmp_path_factory.mktemp("milvus-server")).start()
    yield milvus
    milvus.kill()


@pytest.fixture(scope="module")
def daemon(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = tmp_path_factory.mktemp("milvus-daemon") / "run" / "edge-agent.sock"
    thread = ServerThread(options_for(model_store, path)).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def client(daemon: ServerThread) -> Iterator[Client]:
    with Client(str(daemon.socket_path), timeout=120) as c:
        yield c


def _fill(client: Client, name: str) -> None:
    client.add(name, [{"id": i, "text": t, "metadata": m} for i, t, m in DOCS])


def _ids(hits: list[Any]) -> list[str]:
    return [hit.id for hit in hits]


@pytest.fixture(scope="module")
def local(client: Client) -> str:
    client.create_collection("ref-local")
    _fill(client, "ref-local")
    return "ref-local"


@pytest.mark.parametrize("mode", ["file", "server"])
def test_every_method_on_milvus_as_on_a_local_collection(
    mode: str, client: Client, local: str, server: MilvusServer, tmp_path: Path
) -> None:
    uri = str(tmp_path / "lite.db") if mode == "file" else server.uri
    name = f"m-{mode}"
    info = client.create_collection(name, backend="milvus", uri=uri)
    assert info["backend"] == "milvus" and info["uri"] == uri and info["count"] == 0
    assert info["full_text"] is True  # Milvus Lite 3 has the BM25 function
    _fill(client, name)
    assert client.count(name) == len(DOCS)
    listed = {c["name"]: c for c in client.collections()}
    assert listed[name]["backend"] == "milvus" and listed[local]["backend"] == "local"

    # add of a stored id is refused; upsert replaces
    with pytest.raises(DocumentExists):
        client.add(name, [{"id": "pw", "text": "again"}], if_exists="error")
    client.add(name, [{"id": "pw", "text": DOCS[0][1], "metadata": DOCS[0][2]}])
    assert client.count(name) == len(DOCS)

    # get: texts, metadata and vectors as stored locally (same model; the engine's batches
    # differ between the two adds, which moves a vector by ~1e-4)
    got = client.get(name, ["pw", "nope", "brot"], with_vectors=True)
    ref = client.get(local, ["pw", "nope", "brot"], with_vectors=True)
    assert got[1] is None
    for mine, theirs in zip([got[0], got[2]], [ref[0], ref[2]], strict=True):
        assert mine is not None and theirs is not None
        assert mine["text"] == theirs["text"] and mine["metadata"] == theirs["metadata"]
        np.testing.assert_allclose(mine["vector"], theirs["vector"], atol=1e-3)

    # dense search, by text and by vector, with every filter: the same hits as local
    for query in ("how do I change my password", "baking bread"):
        assert _ids(client.search(name, query, k=3, mode="dense")) == _ids(
            client.search(local, query, k=3, mode="dense")
        )
    vector = ref[0]["vector"]  # type: ignore[index]
    top = client.search(name, vector=vector, k=1)
    assert top[0].id == "pw" and top[0].score == pytest.approx(1.0, abs=1e-4)
    for flt in FILTERS:
        mine_hits = client.search(name, "cooking and passwords", k=5, mode="dense", filter=flt)
        ref_hits = client.search(local, "cooking and passwords", k=5, mode="dense", filter=flt)
        assert sorted(_ids(mine_hits)) == sorted(_ids(ref_hits)), flt
        assert _ids(mine_hits) == _ids(ref_hits), flt
    # a filter error is the local one, word for word
    for bad in ({"year": {"gt": [1]}}, {"and": []}, {"lang": {"like": "x"}}):
        with pytest.raises(InvalidArgument) as milvus_error:
            client.search(name, "x", filter=bad)
        with pytest.raises(InvalidArgument) as local_error:
            client.search(local, "x", filter=bad)
        assert milvus_error.value.message == local_error.value.message

    # keyword (Milvus' BM25) and hybrid (RRF by Milvus, weighted fused as locally)
    keyword = client.search(name, "chocolate cake", k=3, mode="keyword")
    assert keyword[0].id == "cake" and keyword[0].score > 0
    assert keyword[0].id == client.search(local, "chocolate cake", k=3, mode="keyword")[0].id
    assert client.search(name, "Brot", k=2, mode="keyword", filter={"lang": "en"}) == []
    for fusion in ("rrf", "weighted"):
        hybrid = client.search(name, "reset password security", k=3, mode="hybrid", fusion=fusion)
        assert hybrid[0].id == "pw", fusion
    explained = client.search(name, "chocolate cake", k=2, mode="hybrid", explain=True)
    assert explained[0].id == "cake" and explained[0].keyword_score is not None
    assert client.search(name, "chocolate cake", k=1)[0].id == "cake"  # default: hybrid

    # add_vectors and delete
    client.add_vectors(name, ["v1", "v2"], np.stack([vector, -vector]), texts=["a", None])
    assert client.count(name) == len(DOCS) + 2
    assert client.get(name, ["v2"])[0] == {"id": "v2", "text": None, "metadata": {}}
    assert client.delete(name, ["v1", "v2", "never"]) == 2
    assert client.count(name) == len(DOCS)

    # bytes metadata cannot be JSON: a typed error naming why, nothing stored
    with pytest.raises(InvalidArgument, match="JSON"):
        client.add(name, [{"id": "b", "text": "x", "metadata": {"raw": b"\x00"}}])
    assert client.get(name, ["b"]) == [None]

    # dropped: gone from the list and from Milvus
    client.drop_collection(name)
    assert name not in {c["name"] for c in client.collections()}
    from pymilvus import MilvusClient

    assert not MilvusClient(uri).has_collection(name)


def test_filter_values_never_become_expression_syntax(tmp_path: Path) -> None:
    hostile = ['" or id != "', 'x"]', "\\", '\\" or true or \\"', "a\nb", "tab\there",
               "nul\x00byte", "del\x7f", "ünï 日本 😀", "${v}", "{v}", "' or 1 == 1 or '"]
    assert quote('a"b\\c') == '"a\\"b\\\\c"'
    assert quote("nul\x00") is None  # not sendable: left to the exact check
    # A key or value Milvus cannot be told about is not sent at all (the superset is "all").
    assert expression(compile_filter({"k": "nul\x00"})) == ""
    assert expression(compile_filter({"not": {"k": "v"}})) == ""
    store = IndexStore(tmp_path / "index")
    coll = store.create("hostile", FP, MilvusTarget(str(tmp_path / "h.db")))
    n = len(hostile)
    vectors = np.eye(4, dtype=np.float32)[np.arange(n) % 4] + 0.01
    coll.add(FP, [f"d{i}" for i in range(n)], vectors, None,
             [{"k": h, h: "as-key"} for h in hostile])  # fmt: skip
    for i, h in enumerate(hostile):
        for flt in ({"k": h}, {h: "as-key"}, {"k": {"in": [h, "absent"]}}):
            hits = coll.search(FP, vectors[i], 10, where=flt)
            assert hits is not None and [hit.id for hit in hits] == [f"d{i}"], (h, flt)
        assert len(coll.search(FP, vectors[i], 20, where={"k": {"ne": h}}) or []) == n - 1
    store.close()


def test_the_model_fingerprint_is_pinned_in_milvus(
    client: Client, daemon: ServerThread, local: str, tmp_path: Path
) -> None:
    uri = str(tmp_path / "pin.db")
    other = ModelFingerprint("another-model", "cd" * 32, 384, "mean")
    index_dir = daemon.options.index_dir
    # Another daemon (another model) made the collection: this one refuses to embed into it.
    IndexStore(index_dir).create("foreign", other, MilvusTarget(uri)).close()
    with pytest.raises(ModelMismatch):
        client.add("foreign", [{"id": "x", "text": "hello"}])
    with pytest.raises(ModelMismatch):
        client.search("foreign", "hello")
    # Another agent with this daemon's model attaching to that Milvus collection (same name,
    # its own index directory): refused, and nothing is left behind.
    ours = ModelFingerprint.from_json(client.collection_info(local)["fingerprint"])
    elsewhere = IndexStore(tmp_path / "agent-2")
    with pytest.raises(ModelMismatch) as caught:
        elsewhere.create("foreign", ours, MilvusTarget(uri))
    assert caught.value.code == ErrorCode.MODEL_MISMATCH
    assert elsewhere.names() == []
    from pymilvus import MilvusClient

    described = MilvusClient(uri).describe_collection("foreign")
    assert json.loads(described["properties"]["edge_agent.fingerprint"])["model"] == "another-model"


def _run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        cli_main(argv)
    return int(done.value.code or 0)


def test_copy_local_to_milvus_and_back_resumable_and_export(
    client: Client, daemon: ServerThread, local: str, server: MilvusServer, tmp_path: Path
) -> None:
    sock = ["--connect", str(daemon.socket_path)]
    state = tmp_path / "copy.json"
    # Resume: the first two documents are already there and the state file says so.
    ids = sorted(i for i, _, _ in DOCS)
    client.create_collection("copied", backend="milvus", uri=server.uri)
    first = client.get(local, ids[:2], with_vectors=True)
    client.add_vectors("copied", ids[:2], np.stack([d["vector"] for d in first]),  # type: ignore[index]
                       texts=[d["text"] for d in first],  # type: ignore[index]
                       metadata=[d["metadata"] for d in first])  # type: ignore[index]  # fmt: skip
    state.write_text(json.dumps({"after": ids[1], "copied": 2}))
    code = _run_cli(["collections", "copy", local, "copied", "--state", str(state),
                     "--batch", "2", *sock])  # fmt: skip
    assert code == 0 and not state.exists()
    listed = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "collections", "list", *sock],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert any(
        line.startswith("copied ") and f"milvus {server.uri}" in line
        for line in listed.splitlines()
    ), listed
    assert client.count("copied") == len(DOCS)
    # ... and back into a new local collection, made by the copy
    code = _run_cli(["collections", "copy", "copied", "back", "--backend", "local",
                     "--state", str(state), *sock])  # fmt: skip
    assert code == 0
    assert client.collection_info("back")["backend"] == "local"
    original = client.get(local, ids, with_vectors=True)
    for name in ("copied", "back"):
        for mine, theirs in zip(client.get(name, ids, with_vectors=True), original, strict=True):
            assert mine is not None and theirs is not None
            assert (mine["id"], mine["text"], mine["metadata"]) == (
                theirs["id"], theirs["text"], theirs["metadata"])  # fmt: skip
            np.testing.assert_allclose(mine["vector"], theirs["vector"], atol=1e-6)
    # export: one JSON line per document, the vector as base64 float32
    out = tmp_path / "export.jsonl"
    assert _run_cli(["collections", "export", "copied", "-o", str(out), *sock]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == ids
    by_id = {d["id"]: d for d in original if d is not None}
    for line in lines:
        vector = np.frombuffer(base64.b64decode(line["vector"]), dtype="<f4")
        np.testing.assert_allclose(vector, by_id[line["id"]]["vector"], atol=1e-6)
        assert line["text"] == by_id[line["id"]]["text"]
        assert line["metadata"] == by_id[line["id"]]["metadata"]


def test_milvus_killed_mid_ingest_fails_fast_and_recovers(
    client: Client, daemon: ServerThread, local: str, server: MilvusServer
) -> None:
    """The Milvus server is SIGKILLed while a writer adds batches and restarted: every
    acknowledged id is there afterwards; meanwhile the Milvus collection fails fast with
    BACKEND_UNAVAILABLE, the local one serves, health is degraded; the daemon reconnects by
    itself."""
    client.create_collection("ingest", backend="milvus", uri=server.uri)
    rng = np.random.default_rng(7)
    acked: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        with Client(str(daemon.socket_path), timeout=60) as c:
            for batch in range(400):
                if stop.is_set():
                    return
                ids = [f"b{batch}-{i}" for i in range(20)]
                try:
                    c.add_vectors("ingest", ids, rng.standard_normal((20, 384)).astype("f4"))
                except BackendUnavailable as exc:
                    failures.append(exc)
                    time.sleep(0.05)
                    continue
                acked.extend(ids)

    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acked) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()
    try:
        # fast, typed, with a retry hint; the local collection serves meanwhile
        with pytest.raises(BackendUnavailable) as caught:
            for _ in range(3):  # the first call may be the one that finds the server gone
                started = time.monotonic()
                client.count("ingest")
                time.sleep(0.2)
        assert time.monotonic() - started < 5
        assert caught.value.data["retry_after_ms"] > 0
        assert client.search(local, "password", k=1, mode="dense")[0].id == "pw"
        health = client.health()
        assert health["status"] == "degraded" and "ingest" in health["index"]["backend_errors"]
        # What a daemon starting now does: the collection opens from its manifest without
        # a network call, and its calls fail typed until the server is back.
        t0 = time.monotonic()
        reopened = IndexStore(daemon.options.index_dir).open("ingest")
        assert time.monotonic() - t0 < 1
        with pytest.raises(BackendUnavailable):
            reopened.count()
        reopened.close()
        time.sleep(1.0)
    finally:
        server.start()
    deadline = time.monotonic() + 60
    while client.health()["status"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.health()["status"] == "ok"
    time.sleep(1.0)
    stop.set()
    thread.join(timeout=120)
    assert failures, "the writer never met the outage"
    present = [d for i in range(0, len(acked), 1000)
               for d in client.get("ingest", acked[i : i + 1000])]  # fmt: skip
    missing = [doc_id for doc_id, d in zip(acked, present, strict=True) if d is None]
    assert not missing, f"{len(missing)} acknowledged ids lost"
    assert client.count("ingest") >= len(acked)


def test_three_daemons_share_one_milvus_collection(
    model_store: ModelStore,
    daemon: ServerThread,
    server: MilvusServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Three daemons (this module's and two more, each with its own engine and index
    directory; in-process on loopback, not in network namespaces) write into one Milvus
    collection; a search from any of them sees every agent's documents."""
    others = [
        ServerThread(
            options_for(model_store, tmp_path_factory.mktemp(f"agent{i}") / "run" / "a.sock")
        ).start()
        for i in (2, 3)
    ]
    try:
        agents = [daemon, *others]
        clients = [Client(str(agent.socket_path), timeout=120) for agent in agents]
        for c in clients:  # each agent records the shared collection in its own index
            info = c.create_collection("fleet", backend="milvus", uri=server.uri)
            assert info["milvus_collection"] == "fleet"
        for n, (c, (doc_id, text, meta)) in enumerate(zip(clients * 2, DOCS, strict=False)):
            c.add("fleet", [{"id": doc_id, "text": text, "metadata": {**meta, "agent": n % 3}}])
        for c in clients:
            assert c.count("fleet") == len(DOCS)
            assert c.search("fleet", "reset my password", k=1, mode="dense")[0].id == "pw"
            hits = c.search("fleet", "anything", k=10, mode="dense")
            assert sorted(hit.id for hit in hits) == sorted(d[0] for d in DOCS)
            assert {hit.metadata["agent"] for hit in hits} == {0, 1, 2}
        for c in clients:
            c.close()
    finally:
        for agent in others:
            agent.stop()


def test_collections_arguments_are_checked_before_any_work() -> None:
    from edge_agent.protocol import CollectionsArgs

    args = CollectionsArgs.from_args(
        {"action": "create", "name": "n", "backend": "milvus", "uri": "http://127.0.0.1:1"}
    )
    assert (args.backend, args.uri, args.token_file) == ("milvus", "http://127.0.0.1:1", None)
    for bad, word in (
        ({"action": "create", "name": "n", "backend": "qdrant"}, "backend"),
        ({"action": "create", "name": "n", "backend": "local", "uri": "x.db"}, "milvus"),
        ({"action": "info", "name": "n", "uri": "x.db"}, "create only"),
        ({"action": "info", "name": "n", "after": "a"}, "ids only"),
        ({"action": "ids", "name": "n", "limit": 0}, "limit"),
    ):
        with pytest.raises(InvalidArgument, match=word):
            CollectionsArgs.from_args(bad)
    for uri in ("", "ftp://x", "notes"):
        with pytest.raises(InvalidArgument, match="uri"):
            MilvusTarget(uri)


def test_the_async_client_creates_and_pages_a_milvus_collection(
    daemon: ServerThread, tmp_path: Path
) -> None:
    from edge_agent.client import AsyncClient

    async def run() -> None:
        async with AsyncClient(daemon.socket_path, timeout=60.0) as c:
            info = await c.create_collection(
                "async-m", backend="milvus", uri=str(tmp_path / "a.db")
            )
            assert info["backend"] == "milvus"
            ids = [f"id{i:03d}" for i in range(25)]
            vectors = np.random.default_rng(1).standard_normal((25, 384)).astype("f4")
            await c.add_vectors("async-m", ids, vectors)
            seen: list[str] = []
            after = None
            for _ in range(10):
                page = await c.collection_ids("async-m", after=after, limit=10)
                seen += page["ids"]
                after = page["next"]
                if after is None:
                    break
            assert seen == ids and page["total"] == 25
            await c.drop_collection("async-m")

    import asyncio

    asyncio.run(run())


def test_a_stalled_milvus_costs_one_timeout_then_fails_at_once(
    server: MilvusServer, tmp_path: Path
) -> None:
    """The server is SIGSTOPped (a hung or swapped-out Milvus): the first call gives up at
    the collection's timeout, the next ones fail at once while the back-off lasts; after
    SIGCONT the collection serves again."""
    import signal

    store = IndexStore(tmp_path / "index")
    coll = store.create("stall", FP, MilvusTarget(server.uri, timeout=1.0))
    coll.add(FP, ["a"], np.ones((1, 4), np.float32))
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            coll.count()
        assert time.monotonic() - started < 5
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as caught:
            coll.count()
        assert time.monotonic() - started < 0.1 and caught.value.data["retry_after_ms"] > 0
    finally:
        server.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not coll.probe():
        time.sleep(0.2)
    assert coll.count() == 1 and coll.backend_error is None
    store.close()
