"""The index through the daemon: add/search/get/delete/count/collections over real sockets, with
the real default model and real hnswlib collections on disk."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon import ServerThread, options_for

from edge_agent.client import AsyncClient, Client
from edge_agent.errors import (
    CollectionExists,
    CollectionNotFound,
    DimensionsNotSupported,
    DocumentExists,
    ErrorCode,
    IndexCorrupt,
    InvalidArgument,
    ModelMismatch,
)
from edge_agent.index import IndexStore, ModelFingerprint
from edge_agent.models import DEFAULT_MODEL, ModelStore

DOCS = [
    {
        "id": "pw",
        "text": "To reset your password, open Settings and choose Security.",
        "metadata": {"lang": "en", "topic": "account"},
    },
    {
        "id": "wifi",
        "text": "The router restarts when you hold the power button for ten seconds.",
        "metadata": {"lang": "en", "topic": "network"},
    },
    {
        "id": "cake",
        "text": "Bake the chocolate cake at 180 degrees for forty minutes.",
        "metadata": {"lang": "en", "topic": "cooking"},
    },
    {
        "id": "brot",
        "text": "Das Brot backt bei 220 Grad eine Stunde lang.",
        "metadata": {"lang": "de", "topic": "cooking"},
    },
]


@pytest.fixture(scope="module")
def daemon(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("idx") / "run" / "edge-agent.sock"
    thread = ServerThread(options_for(model_store, path)).start()
    yield thread
    thread.stop()


@pytest.fixture
def client(daemon: ServerThread) -> Iterator[Client]:
    with Client(daemon.socket_path, timeout=60.0) as c:
        yield c


def test_add_then_search_by_text_finds_the_right_document(client: Client) -> None:
    result = client.add("help", DOCS)
    assert result["added"] == 4 and result["truncated"] == [] and result["tokens"] > 20
    hits = client.search("help", "how do I change my password?", k=2)
    assert len(hits) == 2 and hits[0].id == "pw"
    assert hits[0].score > hits[1].score
    assert hits[0].text == DOCS[0]["text"]
    assert hits[0].metadata == {"lang": "en", "topic": "account"}
    # Filters restrict the candidates: the best cooking document for a password question.
    only_cooking = client.search("help", "password", k=5, filter={"topic": "cooking"})
    assert {h.id for h in only_cooking} == {"cake", "brot"}
    german = client.search("help", "baking bread", filter={"lang": {"in": ["de"]}})
    assert [h.id for h in german] == ["brot"]
    assert client.search("help", "password", include_text=False)[0].text is None


def test_search_by_vector_matches_search_by_text(client: Client) -> None:
    client.add("vec", DOCS)
    query = client.embed(["router power button"], kind="query").vectors[0]
    by_vector = client.search("vec", vector=query, k=4)
    by_text = client.search("vec", "router power button", k=4, mode="dense")
    assert [h.id for h in by_vector] == [h.id for h in by_text]
    assert by_vector[0].id == "wifi"
    np.testing.assert_allclose([h.score for h in by_vector], [h.score for h in by_text], atol=1e-5)


def test_get_count_delete(client: Client) -> None:
    client.add("crud", DOCS)
    assert client.count("crud") == 4
    docs = client.get("crud", ["cake", "missing", "pw"], with_vectors=True)
    assert docs[1] is None
    assert docs[0] is not None and docs[0]["text"] == DOCS[2]["text"]
    assert docs[0]["vector"].shape == (384,)
    assert abs(float(np.linalg.norm(docs[0]["vector"])) - 1.0) < 1e-4
    # The stored vector is the document embedding of its text.
    again = client.embed([DOCS[2]["text"]], kind="document").vectors[0]
    assert float(docs[0]["vector"] @ again) > 0.9999
    assert client.delete("crud", ["cake", "nope"]) == 1
    assert client.count("crud") == 3
    assert "cake" not in {h.id for h in client.search("crud", "chocolate cake", k=10)}
    assert client.get("crud", ["cake"]) == [None]


def test_upsert_replaces_and_if_exists_error_refuses(client: Client) -> None:
    client.add("upsert", [DOCS[0]])
    client.add("upsert", [{"id": "pw", "text": "Completely different: tomato soup recipe."}])
    assert client.count("upsert") == 1
    assert client.get("upsert", ["pw"])[0]["text"].startswith("Completely")
    with pytest.raises(DocumentExists) as info:
        client.add("upsert", [DOCS[0]], if_exists="error")
    assert info.value.code == ErrorCode.DOCUMENT_EXISTS
    assert client.get("upsert", ["pw"])[0]["text"].startswith("Completely")  # unchanged
    # store_text=False keeps the vector and metadata, not the text.
    client.add("upsert", [DOCS[1]], store_text=False)
    assert client.get("upsert", ["wifi"])[0]["text"] is None
    assert client.search("upsert", "router")[0].id == "wifi"


def test_collections_create_list_info_drop(client: Client) -> None:
    info = client.create_collection("made")
    assert info["name"] == "made" and info["count"] == 0 and info["dims"] == 384
    assert info["fingerprint"]["model"] == "all-MiniLM-L6-v2"
    with pytest.raises(CollectionExists):
        client.create_collection("made")
    with pytest.raises(DimensionsNotSupported):
        client.create_collection("small", dimensions=100)
    with pytest.raises(InvalidArgument):
        client.create_collection("../escape")
    names = {c["name"]: c for c in client.collections()}
    assert names["made"]["state"] == "ok"
    details = client.collection_info("made")
    assert details["stats"]["fsync"] == "always"
    client.drop_collection("made")
    assert "made" not in {c["name"] for c in client.collections()}
    with pytest.raises(CollectionNotFound):
        client.count("made")
    with pytest.raises(CollectionNotFound):
        client.drop_collection("made")


def test_missing_collection_and_create_false(client: Client) -> None:
    with pytest.raises(CollectionNotFound):
        client.search("never-made", "anything")
    with pytest.raises(CollectionNotFound):
        client.add("never-made", DOCS[:1], create=False)
    assert "never-made" not in {c["name"] for c in client.collections()}
    # The connection is still good after typed errors.
    assert client.health()["status"] == "ok"


def test_add_vectors_and_bad_vectors(client: Client) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((20, 384)).astype(np.float32)
    ids = [f"v{i}" for i in range(20)]
    result = client.add_vectors(
        "raw", ids, vectors, metadata=[{"n": i} for i in range(20)], texts=None
    )
    assert result["added"] == 20
    hit = client.search("raw", vector=vectors[7], k=1)[0]
    assert hit.id == "v7" and hit.score > 0.9999 and hit.metadata == {"n": 7}
    with pytest.raises(InvalidArgument, match="dims"):
        client.add_vectors("raw", ["w"], rng.standard_normal((1, 100)))
    with pytest.raises(InvalidArgument, match="finite"):
        client.add_vectors("raw", ["w"], np.full((1, 384), np.nan, np.float32))
    with pytest.raises(InvalidArgument, match="dims"):
        client.search("raw", vector=np.ones(12, np.float32))
    with pytest.raises(InvalidArgument):
        client.call(
            "add_vectors",
            {"collection": "raw", "ids": ["a", "b"], "vectors": b"\0" * (4 * 384), "dims": 384},
        )
    assert client.count("raw") == 20


def test_bad_arguments_get_typed_errors(client: Client) -> None:
    client.add("args", DOCS[:1])
    for method, args, code in [
        ("search", {"collection": "args"}, ErrorCode.INVALID_ARGUMENT),  # neither text nor vector
        ("search", {"collection": "args", "text": "x", "k": 0}, ErrorCode.INVALID_ARGUMENT),
        ("search", {"collection": "args", "text": "x", "k": 10**9}, ErrorCode.INVALID_ARGUMENT),
        (
            "search",
            {"collection": "args", "text": "x", "filter": {"a": {"near": 1}}},
            ErrorCode.INVALID_ARGUMENT,
        ),
        ("search", {"collection": "args", "text": "  "}, ErrorCode.EMPTY_TEXT),
        ("add", {"collection": "args", "docs": [{"id": "x"}]}, ErrorCode.INVALID_ARGUMENT),
        (
            "add",
            {"collection": "args", "docs": [{"id": "", "text": "t"}]},
            ErrorCode.INVALID_ARGUMENT,
        ),
        (
            "add",
            {
                "collection": "args",
                "docs": [{"id": "x", "text": "t", "metadata": {"a": {"nested": 1}}}],
            },
            ErrorCode.INVALID_ARGUMENT,
        ),
        (
            "add",
            {"collection": "args", "docs": [{"id": "x", "text": "t", "colour": 1}]},
            ErrorCode.INVALID_ARGUMENT,
        ),
        ("get", {"collection": "args", "ids": ["x"] * 1001}, ErrorCode.INVALID_ARGUMENT),
        ("delete", {"collection": "args", "ids": []}, ErrorCode.INVALID_ARGUMENT),
        ("collections", {"action": "explode"}, ErrorCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(InvalidArgument) as info:
            client.call(method, args)
        assert info.value.code == code, (method, args)
    assert client.count("args") == 1  # nothing half-applied


def test_a_collection_of_another_model_refuses_text_but_serves_vectors(
    daemon: ServerThread, client: Client
) -> None:
    # Made "by another model": same dims, another weights file. Its vectors are not comparable
    # with this daemon's embeddings, so text in or out is refused; vectors still work.
    other = ModelFingerprint("other-model", "ab" * 32, 384, "mean")
    root = daemon.options.index_dir
    assert root is not None
    with IndexStore(Path(root)) as store:
        collection = store.create("foreign", other)
        collection.add(other, ["f1"], np.eye(1, 384, dtype=np.float32), ["text"], [None])
    with pytest.raises(ModelMismatch) as info:
        client.search("foreign", "text")
    assert "other-model" in info.value.message
    with pytest.raises(ModelMismatch):
        client.add("foreign", DOCS[:1])
    assert client.search("foreign", vector=np.eye(1, 384, dtype=np.float32)[0])[0].id == "f1"


def test_concurrent_clients_match_sequential_results(daemon: ServerThread) -> None:
    """32 searches at once (their queries embedded together in batches) find what the same
    searches one by one find. A query embedded in a batch differs from the same query alone
    in the last float32 digits (~1e-5 in cosine), so two documents that score the same to
    within that (here "number 12" and "number 16 about rivers") may swap places; every other
    rank must hold the same document, and every score must match."""
    texts = [
        f"document number {i} about {topic}"
        for i, topic in enumerate(["rivers", "mountains", "databases", "violins"] * 8)
    ]
    with Client(daemon.socket_path, timeout=60.0) as c:
        c.add("conc", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
        expected = [[(h.id, h.score) for h in c.search("conc", t, k=4)] for t in texts]

    async def run() -> list[list[tuple[str, float]]]:
        clients = [AsyncClient(daemon.socket_path, timeout=60.0) for _ in texts]
        try:
            results = await asyncio.gather(
                *(cl.search("conc", t, k=3) for cl, t in zip(clients, texts, strict=True))
            )
        finally:
            await asyncio.gather(*(cl.close() for cl in clients))
        return [[(h.id, h.score) for h in hits] for hits in results]

    for want, got in zip(expected, asyncio.run(run()), strict=True):
        assert len(got) == 3
        for rank, (found, score) in enumerate(got):
            wanted, wanted_score = want[rank]
            assert abs(score - wanted_score) < 1e-3, (want, got)
            tied = any(abs(wanted_score - s) < 1e-3 for i, (_, s) in enumerate(want) if i != rank)
            if not tied:
                assert found == wanted, (want, got)


def test_concurrent_single_adds_are_group_committed(daemon: ServerThread) -> None:
    with Client(daemon.socket_path, timeout=60.0) as c:
        before = c.stats()["index"]
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            with Client(daemon.socket_path, timeout=60.0) as c:
                c.add("group", [{"id": f"g{i}", "text": f"note {i} about the weather"}])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with Client(daemon.socket_path, timeout=60.0) as c:
        assert c.count("group") == 24  # every acknowledged add is there
        after = c.stats()["index"]
    requests = after["write_requests"] - before["write_requests"]
    writes = after["writes"] - before["writes"]
    assert requests >= 24
    # Adds that queue while the writer fsyncs share one WAL record.
    assert writes < requests


def test_acknowledged_documents_survive_a_restart(model_store: ModelStore, tmp_path: Path) -> None:
    path = tmp_path / "run" / "agent.sock"
    first = ServerThread(options_for(model_store, path)).start()
    try:
        with Client(path, timeout=60.0) as c:
            c.add("keep", DOCS)
            c.delete("keep", ["wifi"])
    finally:
        first.stop()
    second = ServerThread(options_for(model_store, path)).start()
    try:
        with Client(path, timeout=60.0) as c:
            assert c.count("keep") == 3
            assert c.search("keep", "reset my password", k=1)[0].id == "pw"
            assert c.get("keep", ["wifi"]) == [None]
            health = c.health()
            assert health["index"]["collections"] == 1 and health["status"] == "ok"
    finally:
        second.stop()


def test_a_damaged_collection_is_reported_and_the_rest_serve(
    model_store: ModelStore, tmp_path: Path
) -> None:
    path = tmp_path / "run" / "agent.sock"
    first = ServerThread(options_for(model_store, path)).start()
    try:
        with Client(path, timeout=60.0) as c:
            c.add("good", DOCS)
            c.add("bad", DOCS)
    finally:
        first.stop()
    index_dir = first.options.index_dir
    assert index_dir is not None
    (index_dir / "bad" / "manifest.json").write_text("{ not json")
    second = ServerThread(options_for(model_store, path)).start()
    try:
        with Client(path, timeout=60.0) as c:
            health = c.health()
            assert health["status"] == "degraded"
            assert "bad" in health["index"]["unavailable"]
            with pytest.raises(IndexCorrupt, match="edge-agent index repair bad"):
                c.search("bad", "password")
            assert c.search("good", "password", k=1)[0].id == "pw"
            listed = {x["name"]: x for x in c.collections()}
            assert listed["bad"]["state"] == "unavailable" and listed["good"]["state"] == "ok"
    finally:
        second.stop()


def test_start_up_prefers_the_quant_the_collections_were_made_with(
    model_store: ModelStore, tmp_path: Path
) -> None:
    from edge_agent.daemon.app import _quant_of_collections

    manifest = model_store.get(DEFAULT_MODEL)
    index_dir = tmp_path / "index"
    assert _quant_of_collections(index_dir, model_store, DEFAULT_MODEL) is None  # none yet

    def pinned(quant: str) -> ModelFingerprint:
        return ModelFingerprint(
            manifest.name, manifest.files[quant].sha256, manifest.dims, manifest.pooling
        )

    with IndexStore(index_dir) as store:
        store.create("notes", pinned("Q4_K_M"))
        store.create("mail", pinned("Q4_K_M"))
    quant, why = _quant_of_collections(index_dir, model_store, DEFAULT_MODEL) or ("", "")
    assert quant == "Q4_K_M" and "mail, notes" in why
    with IndexStore(index_dir) as store:
        store.create("other", pinned("F16"))
    # Collections disagree: no preference, selection decides.
    assert _quant_of_collections(index_dir, model_store, DEFAULT_MODEL) is None


def test_k_and_get_limits_at_their_boundaries(client: Client) -> None:
    client.add("limits", DOCS)
    assert len(client.search("limits", "anything", k=10_000)) == 4  # k at the limit
    with pytest.raises(InvalidArgument, match="10000"):
        client.search("limits", "anything", k=10_001)
    ids = [f"id{i}" for i in range(1000)]
    assert client.get("limits", ids) == [None] * 1000  # ids at the limit
    with pytest.raises(InvalidArgument, match="1000"):
        client.get("limits", [*ids, "one-more"])


def test_a_failed_first_add_leaves_no_collection(client: Client) -> None:
    from edge_agent.errors import EmptyText

    with pytest.raises(InvalidArgument):
        client.add("ghost", [{"id": "a", "text": "fine"}, {"id": "a", "text": "repeated id"}])
    with pytest.raises(EmptyText):
        client.add("ghost", [{"id": "b", "text": " \n "}])
    assert "ghost" not in {c["name"] for c in client.collections()}
