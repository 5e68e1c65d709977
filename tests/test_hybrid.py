"""Keyword and hybrid search on a collection (issue #14): a real index on disk, its keyword
file kept with the same durability promise as the vectors, filters in every mode, hostile
queries; then through the real daemon with the real default model."""

from __future__ import annotations

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

from edge_agent import Client
from edge_agent.errors import ErrorCode, InvalidArgument
from edge_agent.index import Collection, IndexConfig, ModelFingerprint
from edge_agent.index.fusion import DEFAULT_FUSION, FUSIONS, RRF_K, fuse
from edge_agent.models import ModelStore
from edge_agent.protocol import DEFAULT_FUSION as WIRE_DEFAULT_FUSION
from edge_agent.protocol import FUSIONS as WIRE_FUSIONS

DIM = 16
FP = ModelFingerprint("tiny", "a" * 64, DIM, "mean")

DOCS = {
    "zh-1": ("向量检索是语义搜索的核心技术", {"lang": "zh", "year": 2024}),
    "zh-2": ("我们今天讨论数据库的索引结构", {"lang": "zh", "year": 2021}),
    "zh-3": ("向量和矩阵是线性代数的基础", {"lang": "zh", "year": 2019}),
    "ja-1": ("東京の天気は晴れです", {"lang": "ja", "year": 2023}),
    "fr-1": ("Le café de la gare ouvre à six heures", {"lang": "fr", "year": 2020}),
    "de-1": ("Herr Müller repariert den Kühlschrank", {"lang": "de", "year": 2022}),
    "en-1": ("Error E1234: the write-ahead log segment is corrupt", {"lang": "en", "year": 2025}),
    "en-2": ("How to reset a forgotten password on the router", {"lang": "en", "year": 2018}),
    "en-3": ("Snapshots bound recovery time after a crash", {"lang": "en"}),
}


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.standard_normal((n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture
def coll(tmp_path: Path) -> Iterator[Collection]:
    rng = np.random.default_rng(7)
    collection = Collection.create(tmp_path / "c", FP, IndexConfig())
    ids = list(DOCS)
    collection.add(
        FP, ids, unit(rng, len(ids)), [DOCS[i][0] for i in ids], [DOCS[i][1] for i in ids]
    )
    try:
        yield collection
    finally:
        collection.close()


def ids_of(hits: list) -> list[str]:  # type: ignore[type-arg]
    return [hit.id for hit in hits]


# -- keyword search on a collection -------------------------------------------------------------


def test_chinese_query_finds_only_documents_containing_it(coll: Collection) -> None:
    assert ids_of(coll.search_keyword("向量检索", 10)) == ["zh-1"]
    # "向量" alone is in two documents; a character they merely share is not enough.
    assert set(ids_of(coll.search_keyword("向量", 10))) == {"zh-1", "zh-3"}
    assert ids_of(coll.search_keyword("天気", 10)) == ["ja-1"]


def test_case_and_accents_fold(coll: Collection) -> None:
    assert ids_of(coll.search_keyword("CAFE", 10)) == ["fr-1"]
    assert ids_of(coll.search_keyword("muller kuhlschrank", 10)) == ["de-1"]
    assert ids_of(coll.search_keyword("e1234", 10)) == ["en-1"]


def test_keyword_hits_carry_bm25_and_text(coll: Collection) -> None:
    [hit] = coll.search_keyword("password router", 10, with_text=True)
    assert hit.id == "en-2" and hit.score > 0 and hit.keyword_score == hit.score
    assert hit.text == DOCS["en-2"][0]


def test_filters_apply_to_every_mode(coll: Collection) -> None:
    query = unit(np.random.default_rng(1), 1)[0]
    recent = {"year": {"gte": 2022, "lt": 2025}}
    allowed = {i for i, (_, meta) in DOCS.items() if 2022 <= meta.get("year", 0) < 2025}
    dense = coll.search(FP, query, 10, where=recent)
    assert dense is not None and set(ids_of(dense)) == allowed
    assert set(ids_of(coll.search_hybrid(FP, query, "向量 Müller", 10, where=recent))) == allowed
    assert ids_of(coll.search_keyword("向量", 10, where=recent)) == ["zh-1"]
    assert ids_of(coll.search_keyword("向量", 10, where={"year": {"lt": 2020}})) == ["zh-3"]
    groups = {"or": [{"lang": "fr"}, {"not": {"year": {"exists": True}}}]}
    assert set(ids_of(coll.search_keyword("café snapshots crash", 10, where=groups))) == {
        "fr-1",
        "en-3",
    }
    assert ids_of(coll.search_keyword("向量", 10, where={"lang": {"ne": "zh"}})) == []


def test_hybrid_fuses_and_reports_components(coll: Collection) -> None:
    rng = np.random.default_rng(3)
    query = unit(rng, 1)[0]
    hits = coll.search_hybrid(FP, query, "password router", 3, fusion="rrf")
    assert hits[0].id == "en-2"  # the only keyword match ranks first in the fusion
    assert hits[0].keyword_score is not None and hits[0].dense_score is not None
    # First in the keyword list (1 / 61), and somewhere in the dense one (<= 1 / 61 more).
    assert 1 / (RRF_K + 1) < hits[0].score <= 2 / (RRF_K + 1)
    others = [h for h in hits[1:] if h.keyword_score is None]
    assert all(h.dense_score is not None for h in others)
    weighted = coll.search_hybrid(FP, query, "password router", 3, fusion="weighted", weight=0.0)
    assert weighted[0].id == "en-2" and weighted[0].score == pytest.approx(1.0)


def test_fusion_rules() -> None:
    dense = [(1, 0.9), (2, 0.8), (3, 0.1)]
    keyword = [(3, 12.0), (4, 6.0)]
    rrf = fuse(dense, keyword, 4, method="rrf")
    assert rrf[0].label == 3  # in both lists
    assert rrf[0].score == pytest.approx(1 / (RRF_K + 3) + 1 / (RRF_K + 1))
    weighted = fuse(dense, keyword, 4, method="weighted", weight=0.5, cosines={4: 0.2})
    assert [f.label for f in weighted] == [3, 1, 2, 4]
    assert weighted[0].score == pytest.approx(0.5 * 0.1 + 0.5 * 1.0)
    assert weighted[-1].dense == pytest.approx(0.2) and weighted[-1].keyword == 6.0
    assert FUSIONS == WIRE_FUSIONS and DEFAULT_FUSION == WIRE_DEFAULT_FUSION


def test_collection_without_text_refuses_keyword_modes(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    with Collection.create(tmp_path / "bare", FP, IndexConfig()) as bare:
        bare.add(FP, ["a", "b"], unit(rng, 2))
        assert not bare.has_text
        with pytest.raises(InvalidArgument) as info:
            bare.search_keyword("anything", 5)
        assert info.value.data["reason"] == "no_text"
        with pytest.raises(InvalidArgument):
            bare.search_hybrid(FP, unit(rng, 1)[0], "anything", 5)
        assert bare.search(FP, unit(rng, 1)[0], 5) is not None


@pytest.mark.parametrize(
    "query",
    [
        "!!! ??? ...",
        '"unbalanced quote',
        "NEAR(a b) AND OR NOT * - ^ : ( )",
        "password*",
        "-password",
        "x" * (1 << 20),
        "向" * 100_000,
        "\u0000\ud7ff\ufffd",
    ],
    ids=["punctuation", "quote", "operators", "star", "minus", "1MiB", "cjk-100k", "odd"],
)
def test_hostile_queries_are_plain_words(coll: Collection, query: str) -> None:
    hits = coll.search_keyword(query, 5)
    assert isinstance(hits, list)
    if query in ("password*", "-password"):
        assert ids_of(hits) == ["en-2"]


@pytest.mark.parametrize(
    "where",
    [
        {"year": {"gt": [1, 2]}},
        {"year": {"between": 1}},
        {"year": {"exists": "yes"}},
        {"or": []},
        {"or": "x"},
        {"not": [1]},
        {"tag": {"in": list(range(10_000))}},
        {"tag": {"nin": "abc"}},
        {"": 1},
        {"tag": {"eq": {"nested": 1}}},
    ],
)
def test_invalid_filters_are_typed_errors_naming_the_key(
    coll: Collection, where: dict[str, object]
) -> None:
    query = unit(np.random.default_rng(2), 1)[0]
    for search in (
        lambda: coll.search(FP, query, 5, where=where),
        lambda: coll.search_keyword("cafe", 5, where=where),
        lambda: coll.search_hybrid(FP, query, "cafe", 5, where=where),
    ):
        with pytest.raises(InvalidArgument) as info:
            search()
        assert info.value.code == ErrorCode.INVALID_ARGUMENT


# -- durability of the keyword side ----------------------------------------------------------------


def test_upsert_delete_and_reopen_keep_keywords_consistent(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    path = tmp_path / "c"
    with Collection.create(path, FP, IndexConfig()) as c:
        c.add(FP, ["a", "b"], unit(rng, 2), ["alpha apples", "beta bananas"])
        c.upsert(FP, ["a"], unit(rng, 1), ["alpha cherries"])
        c.delete(["b"])
        assert ids_of(c.search_keyword("apples", 5)) == []
        assert ids_of(c.search_keyword("cherries", 5)) == ["a"]
        assert ids_of(c.search_keyword("bananas", 5)) == []
    with Collection.open(path) as c:
        assert ids_of(c.search_keyword("cherries", 5)) == ["a"]
        assert ids_of(c.search_keyword("bananas apples", 5)) == []
        c.compact()
        assert ids_of(c.search_keyword("cherries", 5)) == ["a"]


def test_a_lost_keyword_file_is_rebuilt_at_open(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    path = tmp_path / "c"
    with Collection.create(path, FP, IndexConfig()) as c:
        c.add(FP, ["a", "b"], unit(rng, 2), ["alpha apples", "beta bananas"])
    for name in os.listdir(path):
        if name.startswith("keywords.sqlite"):
            (path / name).unlink()
    with Collection.open(path) as c:
        assert ids_of(c.search_keyword("bananas", 5)) == ["b"]


_WRITER = """
import sys
import numpy as np
from edge_agent.index import Collection, IndexConfig, ModelFingerprint
fp = ModelFingerprint("tiny", "a" * 64, 16, "mean")
path, start = sys.argv[1], int(sys.argv[2])
config = IndexConfig(snapshot_wal_records=37)  # snapshots happen mid-stream too
try:
    coll = Collection.open(path, config)
except Exception:
    coll = Collection.create(path, fp, config)
rng = np.random.default_rng(start)
i = start
while True:
    vec = rng.standard_normal((2, 16)).astype(np.float32)
    ids = [f"doc{i}", f"doc{i + 1}"]
    texts = [f"common words uniq{i}x", f"common words uniq{i + 1}x"]
    if i % 7 == 0:
        coll.delete([f"doc{i - 4}"])
        print(f"del doc{i - 4}", flush=True)
    coll.upsert(fp, ids, vec, texts)
    print(f"ack {i} {i + 1}", flush=True)
    i += 2
"""


def test_acknowledged_documents_are_keyword_searchable_after_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "crashy"
    acked: set[int] = set()
    deleted: set[int] = set()
    maybe_deleted: set[int] = set()  # a delete that returned but was not printed yet
    start = 0

    def record(line: str) -> None:
        words = line.split()
        if words and words[0] == "ack":
            acked.update(int(w) for w in words[1:])
            deleted.difference_update(int(w) for w in words[1:])
        elif words and words[0] == "del":
            deleted.add(int(words[1][3:]))

    for round_index in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for lines, line in enumerate(proc.stdout, 1):
            record(line)
            if lines >= 40 + 25 * round_index or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for line in proc.stdout:  # what it printed before it died
            record(line)
        proc.stdout.close()
        following = max(acked) + 1  # the writer's next i (acks come in pairs i, i + 1)
        if following % 7 == 0:
            maybe_deleted.add(following - 4)
        start = following
    with Collection.open(path) as coll:
        for number in sorted(acked - deleted - maybe_deleted):
            hits = coll.search_keyword(f"uniq{number}x", 3)
            assert ids_of(hits)[:1] == [f"doc{number}"], number
        for number in sorted(deleted):
            assert coll.search_keyword(f"uniq{number}x", 3) == [], number
        # Keyword search and the vectors agree on every document either way.
        for number in sorted(maybe_deleted):
            found = ids_of(coll.search_keyword(f"uniq{number}x", 3))
            assert found == ([f"doc{number}"] if coll.get(f"doc{number}") else []), number


# -- through the daemon --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    sock = tmp_path_factory.mktemp("hybrid") / "h.sock"
    thread = ServerThread(options_for(model_store, sock)).start()
    try:
        yield sock
    finally:
        thread.stop()


NOTES = [
    ("n1", "The router admin password can be reset with the button on the back", {"year": 2021}),
    ("n2", "Error code E4021 means the disk quota is exceeded", {"year": 2023}),
    ("n3", "Cats sleep for most of the day and hunt at dusk", {"year": 2019}),
    ("n4", "向量检索让语义搜索更准确", {"year": 2024}),
    ("n5", "Bake the bread at 220 degrees for forty minutes", {"year": 2022}),
]


def test_search_modes_over_the_socket(daemon: Path) -> None:
    with Client(daemon, timeout=60) as client:
        client.add("notes", [{"id": i, "text": t, "metadata": m} for i, t, m in NOTES])
        # A rare code a small embedding model cannot place: the keyword side finds it.
        assert [h.id for h in client.search("notes", "E4021", mode="keyword")] == ["n2"]
        hybrid = client.search("notes", "what does E4021 mean", mode="hybrid", explain=True)
        assert hybrid[0].id == "n2"
        assert hybrid[0].keyword_score is not None and hybrid[0].dense_score is not None
        assert client.search("notes", "向量检索", mode="keyword", k=5)[0].id == "n4"
        dense = client.search("notes", "forgot my wifi box login", mode="dense", k=1)
        assert dense[0].id == "n1" and dense[0].keyword_score is None
        # The default for a text query on a collection with texts is hybrid.
        default = client.call("search", {"collection": "notes", "text": "E4021"})
        assert default["mode"] == "hybrid" and default["hits"][0]["id"] == "n2"
        ranged = client.search("notes", "bread cats", mode="keyword", filter={"year": {"gt": 2020}})
        assert [h.id for h in ranged] == ["n5"]
        weighted = client.search("notes", "E4021", mode="hybrid", fusion="weighted", weight=0.2)
        assert weighted[0].id == "n2"


def test_hostile_search_arguments_over_the_socket(daemon: Path) -> None:
    with Client(daemon, timeout=60) as client:
        client.add("notes2", [("a", "plain text about routers")])
        for args, code in (
            ({"text": "x", "mode": "fuzzy"}, ErrorCode.INVALID_ARGUMENT),
            ({"text": "x", "mode": "hybrid", "fusion": "max"}, ErrorCode.INVALID_ARGUMENT),
            ({"text": "x", "mode": "hybrid", "weight": 2}, ErrorCode.INVALID_ARGUMENT),
            ({"mode": "keyword"}, ErrorCode.INVALID_ARGUMENT),
            ({"text": "x", "filter": {"k": {"in": list(range(10_000))}}},
             ErrorCode.INVALID_ARGUMENT),
            ({"text": "x", "filter": {"k": {"gte": [1]}}}, ErrorCode.INVALID_ARGUMENT),
        ):  # fmt: skip
            with pytest.raises(InvalidArgument) as info:
                client.call("search", {"collection": "notes2", **args})
            assert info.value.code == code
        for text in ('"*" NEAR(', "!!!", "x" * (1 << 19)):
            assert isinstance(client.search("notes2", text, mode="keyword"), list)
        assert client.health()["status"] == "ok"
        client.add_vectors("bare", ["v"], np.ones((1, 384), np.float32))
        with pytest.raises(InvalidArgument) as info:
            client.search("bare", "routers", mode="keyword")
        assert info.value.data.get("reason") == "no_text"
        # Without a mode, a collection without texts is searched by meaning.
        assert [h.id for h in client.search("bare", "routers")] == ["v"]
