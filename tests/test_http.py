"""The HTTP API with the clients users point at it: the official ``openai`` package,
langchain-openai's ``OpenAIEmbeddings`` and raw ``httpx``, against a real daemon (real model,
real collections on disk) on a loopback port. Vectors are compared with the MessagePack
socket's: the two transports must give the same numbers for the same text."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from daemon import ServerThread, options_for
from httpd import TOKEN, raw_request, start_http_daemon
from langchain_openai import OpenAIEmbeddings
from prometheus_client.parser import text_string_to_metric_families
from tinyqwen3 import write_tiny_qwen3_gguf

from edge_agent.client import Client
from edge_agent.errors import InsecureListen
from edge_agent.index import IndexStore, ModelFingerprint
from edge_agent.models import DEFAULT_MODEL, ModelStore

TEXTS = [
    "To reset your password, open Settings and choose Security.",
    "The router restarts when you hold the power button for ten seconds.",
    "Bake the chocolate cake at 180 degrees for forty minutes.",
]
DOCS = [
    {"id": "pw", "text": TEXTS[0], "metadata": {"lang": "en", "topic": "account"}},
    {"id": "wifi", "text": TEXTS[1], "metadata": {"lang": "en", "topic": "network"}},
    {"id": "cake", "text": TEXTS[2], "metadata": {"lang": "en", "topic": "cooking"}},
    {"id": "brot", "text": "Das Brot backt bei 220 Grad eine Stunde lang.",
     "metadata": {"lang": "de", "topic": "cooking"}},
]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@pytest.fixture(scope="module")
def served(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, str]]:
    thread, base = start_http_daemon(
        model_store, tmp_path_factory.mktemp("http"), metrics_listen="127.0.0.1:0"
    )
    yield thread, base
    thread.stop()


@pytest.fixture(scope="module")
def base(served: tuple[ServerThread, str]) -> str:
    return served[1]


@pytest.fixture(scope="module")
def socket_vectors(served: tuple[ServerThread, str]) -> np.ndarray:
    with Client(served[0].socket_path, timeout=60.0) as client:
        return client.embed(TEXTS).vectors


@pytest.fixture
def http(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=60.0) as client:
        yield client


@pytest.fixture
def oai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60.0)


def _error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code", "number"}
    assert error["code"] == code, error
    return error


# -- OpenAI's embeddings, with the official client ---------------------------------------------


def test_openai_client_base64_by_default_equals_the_socket(
    oai: openai.OpenAI, socket_vectors: np.ndarray
) -> None:
    raw = oai.embeddings.with_raw_response.create(model=DEFAULT_MODEL, input=TEXTS)
    # The client asks for base64 unless told otherwise, and decodes it itself.
    assert json.loads(raw.http_request.content)["encoding_format"] == "base64"
    result = raw.parse()
    assert result.object == "list" and result.model == DEFAULT_MODEL
    assert [d.index for d in result.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert vectors.shape == (3, 384)
    assert _cosines(vectors, socket_vectors).min() >= 0.99999
    assert result.usage.prompt_tokens == result.usage.total_tokens > 3 * 5


def test_openai_client_float(oai: openai.OpenAI, socket_vectors: np.ndarray) -> None:
    result = oai.embeddings.create(model=DEFAULT_MODEL, input=TEXTS[1], encoding_format="float")
    assert len(result.data) == 1
    vector = np.array([result.data[0].embedding], dtype=np.float32)
    assert _cosines(vector, socket_vectors[1:2])[0] >= 0.99999


def test_base64_is_little_endian_float32(http: httpx.Client, socket_vectors: np.ndarray) -> None:
    body = {"model": DEFAULT_MODEL, "input": TEXTS, "encoding_format": "base64"}
    data = http.post("/v1/embeddings", json=body).json()["data"]
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data])
    assert decoded.shape == (3, 384)
    assert _cosines(decoded, socket_vectors).min() >= 0.99999


def test_openai_dimensions_full_size_works_other_sizes_are_bad_requests(
    oai: openai.OpenAI,
) -> None:
    full = oai.embeddings.create(model=DEFAULT_MODEL, input="hi", dimensions=384)
    assert len(full.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model=DEFAULT_MODEL, input="hi", dimensions=128)
    assert info.value.status_code == 400
    assert info.value.code == "DIMENSIONS_NOT_SUPPORTED"
    assert "384" in info.value.message


def test_openai_unknown_model_is_not_found(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.embeddings.create(model="text-embedding-3-small", input="hi")
    assert info.value.code == "MODEL_NOT_FOUND"
    assert DEFAULT_MODEL in info.value.message  # says what is served


def test_openai_token_ids_are_refused_with_what_to_set(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model=DEFAULT_MODEL, input=[[9906, 1917], [15339]])
    assert "check_embedding_ctx_length=False" in info.value.message


def test_openai_models_list(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == [DEFAULT_MODEL]
    assert oai.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")


def test_extensions_kind_and_long_text(http: httpx.Client) -> None:
    long = " ".join(["word"] * 2000)
    body = {"model": DEFAULT_MODEL, "input": [long], "long_text": "error"}
    error = _error(http.post("/v1/embeddings", json=body), 400, "TEXT_TOO_LONG")
    assert error["param"] == "input"
    chunked = http.post("/v1/embeddings", json={**body, "long_text": "chunk", "kind": "query"})
    assert chunked.status_code == 200
    assert chunked.json()["usage"]["prompt_tokens"] > 1000
    error = _error(
        http.post("/v1/embeddings", json={**body, "kind": "summary"}), 400, "INVALID_ARGUMENT"
    )
    assert "kind" in error["message"]


# -- LangChain ------------------------------------------------------------------------------------


def test_langchain_openai_embeddings(base: str, socket_vectors: np.ndarray) -> None:
    embeddings = OpenAIEmbeddings(
        model=DEFAULT_MODEL,
        base_url=f"{base}/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    documents = np.array(embeddings.embed_documents(TEXTS), dtype=np.float32)
    assert _cosines(documents, socket_vectors).min() >= 0.99999
    query = np.array([embeddings.embed_query(TEXTS[2])], dtype=np.float32)
    assert _cosines(query, socket_vectors[2:3])[0] >= 0.99999


def test_langchain_default_token_ids_get_the_clear_400(http: httpx.Client) -> None:
    """LangChain's default (check_embedding_ctx_length=True) tokenizes with tiktoken, which
    downloads its encoding from the internet on first use; tests talk only to loopback, so this
    posts exactly what it then sends: a list of token-id lists."""
    body = {"model": DEFAULT_MODEL, "input": [[2675, 374, 264, 1296], [9906]]}
    error = _error(http.post("/v1/embeddings", json=body), 400, "INVALID_ARGUMENT")
    assert "check_embedding_ctx_length=False" in error["message"]
    assert error["param"] == "input"
    single = {"model": DEFAULT_MODEL, "input": [2675, 374]}
    assert "check_embedding_ctx_length" in http.post("/v1/embeddings", json=single).text


# -- request errors, all in one shape ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"input": "hi"}, "INVALID_ARGUMENT", "model"),
        ({"model": DEFAULT_MODEL}, "INVALID_ARGUMENT", "input"),
        ({"model": DEFAULT_MODEL, "input": []}, "INVALID_ARGUMENT", "input"),
        ({"model": DEFAULT_MODEL, "input": ["ok", 3]}, "INVALID_ARGUMENT", "input"),
        ({"model": DEFAULT_MODEL, "input": ["ok", ""]}, "EMPTY_TEXT", "input"),
        ({"model": DEFAULT_MODEL, "input": "x", "encoding_format": "hex"}, "INVALID_ARGUMENT",
         "encoding_format"),
        ({"model": DEFAULT_MODEL, "input": "x", "dimensions": "big"}, "INVALID_ARGUMENT",
         "dimensions"),
        ({"model": DEFAULT_MODEL, "input": "x", "temperature": 1}, "INVALID_ARGUMENT",
         "temperature"),
    ],
)
def test_bad_embedding_requests(http: httpx.Client, body: dict, code: str, param: str) -> None:
    error = _error(http.post("/v1/embeddings", json=body), 400, code)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_user_is_accepted_and_ignored(http: httpx.Client) -> None:
    body = {"model": DEFAULT_MODEL, "input": "x", "user": "someone"}
    assert http.post("/v1/embeddings", json=body).status_code == 200


def test_malformed_bodies(http: httpx.Client) -> None:
    json_type = {"content-type": "application/json"}
    _error(http.post("/v1/embeddings", content=b"{nope", headers=json_type), 400, "BAD_REQUEST")
    _error(http.post("/v1/embeddings", content=b"\xff\xfe", headers=json_type), 400, "BAD_REQUEST")
    _error(http.post("/v1/embeddings", content=b"[1, 2]", headers=json_type), 400,
           "INVALID_ARGUMENT")
    form = http.post("/v1/embeddings", data={"input": "hi", "model": DEFAULT_MODEL})
    assert "application/json" in _error(form, 415, "BAD_REQUEST")["message"]
    _error(http.post("/v1/embeddings", content=b"{}"), 415, "BAD_REQUEST")  # no content type
    _error(http.get("/v1/embeddings"), 405, "BAD_REQUEST")
    _error(http.get("/v2/anything"), 404, "UNKNOWN_METHOD")


# -- models, health, metrics, OpenAPI ------------------------------------------------------------


def test_hello_over_the_socket_names_the_http_listener(
    served: tuple[ServerThread, str], model_store: ModelStore, tmp_path: Path
) -> None:
    thread, base = served
    with Client(thread.socket_path, timeout=30.0) as client:
        advertised = client.hello()["http"]
    assert advertised == base and httpx.get(f"{advertised}/health").status_code == 200
    # Without the listener there is no address to give.
    plain = ServerThread(options_for(model_store, tmp_path / "run" / "edge-agent.sock")).start()
    try:
        with Client(plain.socket_path, timeout=30.0) as client:
            assert "http" not in client.hello()
    finally:
        plain.stop()


def test_health_and_metrics(http: httpx.Client) -> None:
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["model"] == DEFAULT_MODEL
    http.post("/v1/embeddings", json={"model": DEFAULT_MODEL, "input": "count me"})
    metrics = http.get("/metrics")
    assert metrics.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    assert "edge_agent_healthy" in families
    assert families["edge_agent_healthy"].samples[0].value == 1


def test_openapi_describes_every_route(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    paths = set(document["paths"])
    assert {"/v1/embeddings", "/v1/models", "/health", "/metrics", "/v1/collections",
            "/v1/collections/{name}", "/v1/collections/{name}/documents",
            "/v1/collections/{name}/search", "/v1/collections/{name}/vectors", "/"} <= paths
    schema = document["components"]["schemas"]["EmbeddingsRequest"]
    assert set(schema["properties"]) == {
        "input", "model", "encoding_format", "dimensions", "user", "kind", "instruction",
        "long_text",
    }


# -- the REST API over collections ---------------------------------------------------------------


def test_collections_lifecycle(http: httpx.Client) -> None:
    created = http.post("/v1/collections", json={"name": "life"})
    assert created.status_code == 201 and created.json()["name"] == "life"
    assert created.json()["dims"] == 384
    _error(http.post("/v1/collections", json={"name": "life"}), 409, "COLLECTION_EXISTS")
    names = [c["name"] for c in http.get("/v1/collections").json()["collections"]]
    assert "life" in names
    added = http.post("/v1/collections/life/documents", json={"documents": DOCS})
    assert added.status_code == 200 and added.json()["added"] == 4
    info = http.get("/v1/collections/life").json()
    assert info["count"] == 4 and "stats" in info
    exists = http.post(
        "/v1/collections/life/documents", json={"documents": DOCS[:1], "if_exists": "error"}
    )
    _error(exists, 409, "DOCUMENT_EXISTS")
    dropped = http.delete("/v1/collections/life")
    assert dropped.status_code == 200 and dropped.json() == {"dropped": "life"}
    _error(http.get("/v1/collections/life"), 404, "COLLECTION_NOT_FOUND")
    _error(http.post("/v1/collections/life/search", json={"text": "x"}), 404,
           "COLLECTION_NOT_FOUND")


def test_documents_get_and_delete(http: httpx.Client, socket_vectors: np.ndarray) -> None:
    http.post("/v1/collections/crud/documents", json={"documents": DOCS})
    got = http.get(
        "/v1/collections/crud/documents",
        params=[("id", "cake"), ("id", "missing"), ("id", "pw"), ("with_vectors", "true")],
    ).json()["documents"]
    assert got[1] is None
    assert got[0]["text"] == TEXTS[2] and got[0]["metadata"]["topic"] == "cooking"
    stored = np.array([got[0]["vector"], got[2]["vector"]], dtype=np.float32)
    assert _cosines(stored, socket_vectors[[2, 0]]).min() >= 0.99999
    deleted = http.delete("/v1/collections/crud/documents", params=[("id", "cake"), ("id", "x")])
    assert deleted.json()["deleted"] == 1
    many = http.post("/v1/collections/crud/documents/delete", json={"ids": ["pw", "wifi"]})
    assert many.json()["deleted"] == 2
    assert http.get("/v1/collections/crud").json()["count"] == 1
    _error(http.get("/v1/collections/crud/documents"), 400, "INVALID_ARGUMENT")


def test_search_equals_the_socket(served: tuple[ServerThread, str], http: httpx.Client) -> None:
    http.post("/v1/collections/find/documents", json={"documents": DOCS})
    with Client(served[0].socket_path, timeout=60.0) as client:
        for mode in ("dense", "keyword", "hybrid"):
            body = {"text": "chocolate cake baking", "k": 3, "mode": mode, "explain": True}
            result = http.post("/v1/collections/find/search", json=body).json()
            assert result["mode"] == mode
            wire = client.search("find", "chocolate cake baking", k=3, mode=mode, explain=True)
            assert [h["id"] for h in result["hits"]] == [h.id for h in wire]
            np.testing.assert_allclose(
                [h["score"] for h in result["hits"]], [h.score for h in wire], rtol=1e-5
            )
            assert {"dense_score", "keyword_score"} <= set(result["hits"][0])
        query = client.embed(["router power button"], kind="query").vectors[0]
    by_vector = http.post(
        "/v1/collections/find/search", json={"vector": query.tolist(), "k": 2}
    ).json()
    assert by_vector["hits"][0]["id"] == "wifi"
    cooking = http.post(
        "/v1/collections/find/search",
        json={"text": "password", "k": 5, "filter": {"topic": "cooking"}},
    ).json()
    assert {h["id"] for h in cooking["hits"]} == {"cake", "brot"}
    bad_filter = {"text": "x", "filter": {"lang": {"in": "en"}}}
    _error(http.post("/v1/collections/find/search", json=bad_filter), 400, "INVALID_ARGUMENT")
    _error(http.post("/v1/collections/find/search", json={"vector": [0.1] * 7}), 400,
           "INVALID_ARGUMENT")
    _error(http.post("/v1/collections/find/search", json={"text": "x", "mode": "magic"}), 400,
           "INVALID_ARGUMENT")
    _error(http.post("/v1/collections/find/search", json={"collection": "other", "text": "x"}),
           400, "INVALID_ARGUMENT")


def test_add_vectors_as_floats_and_base64_then_search_over_the_socket(
    served: tuple[ServerThread, str], http: httpx.Client, socket_vectors: np.ndarray
) -> None:
    """Vectors computed elsewhere (here: by /v1/embeddings) go in through
    ``POST .../vectors`` as the socket's add_vectors; the socket then finds them."""
    body = {"model": DEFAULT_MODEL, "input": TEXTS[:2], "encoding_format": "base64"}
    encoded = [d["embedding"] for d in http.post("/v1/embeddings", json=body).json()["data"]]
    added = http.post("/v1/collections/vec/vectors", json={
        "ids": ["pw", "wifi", "cake"],
        "vectors": [*encoded, socket_vectors[2].tolist()],
        "texts": TEXTS,
        "metadata": [d["metadata"] for d in DOCS[:3]],
    })
    assert added.status_code == 200, added.text
    assert added.json()["added"] == 3 and added.json()["collection"] == "vec"
    with Client(served[0].socket_path, timeout=60.0) as client:
        query = client.embed(["router power button"], kind="query").vectors[0]
        assert client.search("vec", vector=query, k=1)[0].id == "wifi"
        keyword = client.search("vec", "chocolate", k=1, mode="keyword")
        assert keyword[0].id == "cake"
        got = client.get("vec", ["pw"], with_vectors=True)[0]
        assert got is not None and got["metadata"] == DOCS[0]["metadata"]
        assert _cosines(np.asarray([got["vector"]]), socket_vectors[:1])[0] >= 0.99999
    _error(http.post("/v1/collections/vec/vectors",
                     json={"ids": ["pw"], "vectors": encoded[:1], "if_exists": "error"}),
           409, "DOCUMENT_EXISTS")
    row = socket_vectors[0].tolist()
    nan_b64 = base64.b64encode(np.full(384, np.nan, dtype="<f4").tobytes()).decode()
    bad = [
        {"ids": ["a", "b"], "vectors": [row]},  # one vector for two ids
        {"ids": ["a", "b"], "vectors": [row, row[:100]]},  # ragged
        {"ids": ["a"], "vectors": [[0.1] * 7]},  # not the collection's size
        {"ids": ["a"], "vectors": [[1e39, *row[1:]]]},  # beyond float32
        {"ids": ["a"], "vectors": [nan_b64]},  # NaN as float32 bytes
        {"ids": ["a"], "vectors": ["not base64!"]},
        {"ids": ["a"], "vectors": ["AAAA="]},  # not whole float32 values
        {"ids": ["a"], "vectors": [[True] * 384]},
        {"ids": ["a"], "vectors": [[0.0] * 384]},  # cannot be normalised
        {"ids": ["a"], "vectors": row},  # one flat vector, not a list of them
        {"ids": ["a"], "vectors": []},
        {"ids": ["a"]},
        {"ids": ["a"], "vectors": [row], "texts": ["one", "two"]},
        {"ids": ["a"], "vectors": [row], "metadata": ["not a map"]},
        {"ids": ["a"], "vectors": [row], "dims": 384},  # the size comes from the vectors
        {"ids": ["a"], "vectors": [row], "collection": "other"},
        {"ids": ["a"], "vectors": [row], "if_exists": "merge"},
        {"ids": [], "vectors": []},
    ]
    for request in bad:
        _error(http.post("/v1/collections/vec/vectors", json=request), 400, "INVALID_ARGUMENT")
    nan = http.post("/v1/collections/vec/vectors", content=b'{"ids": ["a"], "vectors": [[NaN]]}',
                    headers={"Content-Type": "application/json"})
    assert nan.status_code == 400  # NaN is not JSON: refused before it reaches the index
    assert http.get("/v1/collections/vec").json()["count"] == 3  # nothing half written
    assert http.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "raw_name", ["..", "%2E%2E", ".hidden", "a%5C..%5Cb", "%00", "x" * 200, "%2E%2E%2Fetc"]
)
def test_collection_names_cannot_escape_the_index(
    served: tuple[ServerThread, str], raw_name: str
) -> None:
    base = served[1]
    for method, path, body in (
        ("POST", "/documents", {"documents": DOCS[:1]}),
        ("POST", "/search", {"text": "x"}),
        ("GET", "", None),
        ("DELETE", "", None),
    ):
        status, reply = raw_request(
            base, method, f"/v1/collections/{raw_name}{path}",
            None if body is None else json.dumps(body).encode(),
        )
        assert status in (400, 404), (raw_name, method, path, reply)
        assert reply["error"]["code"] in (
            "INVALID_ARGUMENT", "COLLECTION_NOT_FOUND", "UNKNOWN_METHOD"
        ), reply
    index_dir = served[0].options.index_dir
    assert index_dir is not None
    outside = {p.name for p in Path(index_dir).parent.iterdir()}
    assert outside <= {"index", "agent_id", "agent-id"}, outside


# -- auth, overload, protected mode --------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, str]]:
    """A tokened listener whose queue holds one request, so overload is easy to reach."""
    thread, base = start_http_daemon(
        model_store, tmp_path_factory.mktemp("guarded"), auth_token=TOKEN, max_queue=1
    )
    yield thread, base
    thread.stop()


def test_token_is_required_and_checked(guarded: tuple[ServerThread, str]) -> None:
    base = guarded[1]
    body = {"model": DEFAULT_MODEL, "input": "hi"}
    with httpx.Client(base_url=base, timeout=30.0) as http:
        missing = http.post("/v1/embeddings", json=body)
        _error(missing, 401, "AUTH_REQUIRED")
        assert missing.headers["www-authenticate"].startswith("Bearer")
        for path in ("/v1/models", "/health", "/v1/collections", "/openapi.json"):
            _error(http.get(path), 401, "AUTH_REQUIRED")
        wrong = http.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"})
        _error(wrong, 401, "AUTH_FAILED")
        basic = http.get("/health", headers={"Authorization": f"Basic {TOKEN}"})
        _error(basic, 401, "AUTH_FAILED")
        # The search page holds no data: it loads, and asks for the token itself.
        assert http.get("/").status_code == 200
        good = http.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0)
    assert [m.id for m in ok.models.list()] == [DEFAULT_MODEL]


def test_overload_is_429_with_retry_after(guarded: tuple[ServerThread, str]) -> None:
    base = guarded[1]
    batch = [f"{TEXTS[i % 3]} number {i}" for i in range(64)]
    oai = openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0, timeout=60.0)

    def one(_: int) -> str:
        try:
            oai.embeddings.create(model=DEFAULT_MODEL, input=batch)
            return "ok"
        except openai.RateLimitError as exc:
            assert exc.code == "OVERLOADED"
            assert exc.response.headers["retry-after"] == "1"
            return "limited"

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, range(12)))
    assert "limited" in outcomes and "ok" in outcomes
    # Served again once the queue drains.
    assert one(0) == "ok"


def test_non_loopback_http_without_token_refuses_to_start(
    model_store: ModelStore, tmp_path: Path
) -> None:
    thread = ServerThread(
        options_for(model_store, tmp_path / "run" / "s.sock", http_listen="0.0.0.0:0")
    )
    with pytest.raises(InsecureListen, match=r"refusing to serve HTTP on 0\.0\.0\.0"):
        thread.start()


# -- Matryoshka dimensions, on a model that declares them ----------------------------------------


def test_dimensions_shorten_where_the_model_declares_them(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The tiny Qwen3-architecture model (tests/tinyqwen3.py) declares Matryoshka size 32."""
    source = write_tiny_qwen3_gguf(tmp_path_factory.mktemp("tq-src") / "tiny.gguf",
                                   context_length=128)
    store = ModelStore(tmp_path_factory.mktemp("tq-store"))
    manifest = store.import_gguf(source, name="tiny-qwen3")
    tmp = tmp_path_factory.mktemp("tq-run")
    thread, base = start_http_daemon(
        store, tmp, model="tiny-qwen3", quant=next(iter(manifest.files))
    )
    try:
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        full = oai.embeddings.create(model="tiny-qwen3", input=["a b c"])
        short = oai.embeddings.create(model="tiny-qwen3", input=["a b c"], dimensions=32)
        vector = np.array(short.data[0].embedding)
        assert vector.shape == (32,) and abs(np.linalg.norm(vector) - 1.0) < 1e-5
        head = np.array(full.data[0].embedding[:32])
        assert np.allclose(vector, head / np.linalg.norm(head), atol=1e-5)
        with pytest.raises(openai.BadRequestError):
            oai.embeddings.create(model="tiny-qwen3", input=["a"], dimensions=16)
        models = oai.models.list().data[0]
        assert models.model_extra is not None
        assert models.model_extra["supported_dimensions"] == [32, len(full.data[0].embedding)]
    finally:
        thread.stop()


# -- configuration and shutdown -------------------------------------------------------------------


def test_http_setting_from_flag_environment_and_file(tmp_path: Path) -> None:
    from edge_agent.config import ConfigError, load_config

    env = {"EDGE_AGENT_HOME": str(tmp_path / "home")}
    assert load_config({}, env).serve_options().http_listen is None  # off by default
    from_env = load_config({}, {**env, "EDGE_AGENT_HTTP": "127.0.0.1:8080"})
    assert from_env.serve_options().http_listen == "127.0.0.1:8080"
    config_file = tmp_path / "config.toml"
    config_file.write_text('http = ":9000"\n', encoding="utf-8")
    assert load_config({}, env, config_file).serve_options().http_listen == ":9000"
    from_flag = load_config({"http": "[::1]:8081"}, {**env, "EDGE_AGENT_HTTP": "127.0.0.1:1"})
    assert from_flag.serve_options().http_listen == "[::1]:8081"
    with pytest.raises(ConfigError, match="http"):
        load_config({"http": "no-port-here"}, env)


def test_health_is_503_while_degraded(model_store: ModelStore, tmp_path: Path) -> None:
    """A collection on disk that cannot be opened (its manifest is damaged) degrades the
    daemon: ``GET /health`` answers 503 with the JSON body saying why, the same report the
    socket's ``health`` gives; the daemon still embeds over HTTP."""
    index_dir = tmp_path / "run-data" / "index"  # where options_for puts this daemon's index
    with IndexStore(index_dir) as store:
        store.create("broken", ModelFingerprint("m", "e" * 64, 384, "mean"))
    (index_dir / "broken" / "manifest.json").write_text("{ not json")
    thread, base = start_http_daemon(model_store, tmp_path)
    try:
        health = httpx.get(f"{base}/health", timeout=30.0)
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "degraded"
        assert "broken" in body["reason"] and "broken" in body["index"]["unavailable"]
        assert str(index_dir) not in health.text
        with Client(thread.socket_path, timeout=30.0) as client:
            assert client.health()["status"] == "degraded"
        embedded = httpx.post(f"{base}/v1/embeddings", timeout=60.0,
                              json={"model": DEFAULT_MODEL, "input": TEXTS[0]})
        assert embedded.status_code == 200 and len(embedded.json()["data"]) == 1
    finally:
        thread.stop()


def test_requests_in_flight_finish_on_stop(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """SIGTERM's path (the stop event): HTTP requests already received get their vectors;
    the listener then stops."""
    thread, base = start_http_daemon(model_store, tmp_path)
    batch = [f"{TEXTS[i % 3]} again, number {i}" for i in range(64)]
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            def post(_: int) -> int:
                with httpx.Client(base_url=base, timeout=60.0) as http:
                    body = {"model": DEFAULT_MODEL, "input": batch, "encoding_format": "base64"}
                    response = http.post("/v1/embeddings", json=body)
                    assert len(response.json()["data"]) == 64
                    return response.status_code

            pending = [pool.submit(post, i) for i in range(4)]
            # Wait until the daemon holds the requests (queued or in the engine).
            with Client(thread.socket_path, timeout=30.0) as client:
                for _ in range(200):
                    if client.stats()["embed"]["requests"] >= 2:
                        break
                    time.sleep(0.01)
            stopper = pool.submit(thread.stop)
            assert [f.result(timeout=60) for f in pending] == [200] * 4
            stopper.result(timeout=60)
    finally:
        thread.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health", timeout=5.0)
