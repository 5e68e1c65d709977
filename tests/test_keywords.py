"""The keyword (BM25) index on real SQLite files: ranking, languages, hostile queries,
replacement and deletion, applied_lsn atomicity and crashes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.errors import IndexFull, InvalidArgument
from edge_agent.index.keywords import (
    FILENAME,
    MAX_QUERY_TERMS,
    KeywordIndex,
    analyze,
    match_expression,
    query_terms,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def kw(tmp_path: Path):
    index = KeywordIndex(tmp_path / FILENAME)
    yield index
    index.close()


def labels(hits: list[tuple[int, float]]) -> list[int]:
    return [label for label, _ in hits]


# -- ranking ---------------------------------------------------------------------------------------


def test_ranking_sanity(kw: KeywordIndex) -> None:
    kw.upsert(
        [
            (1, "The quick brown fox jumps over the lazy dog"),
            (2, "A fox, a fox, a fox: foxes everywhere"),
            (3, "Dogs and cats living together"),
            (4, "Stock markets fell sharply on Monday"),
            (5, None),
        ],
        lsn=1,
    )
    hits = kw.search("fox", 10)
    assert labels(hits) == [2, 1]  # more occurrences in a shorter text first
    assert all(score > 0 for _, score in hits)
    assert hits[0][1] > hits[1][1]
    assert labels(kw.search("fox", 1)) == [2]
    # Porter stemming: "jumping" finds "jumps", "markets" finds "market".
    assert labels(kw.search("jumping", 10)) == [1]
    assert labels(kw.search("market", 10)) == [4]
    # The query's words are OR-ed: a document with either word matches.
    assert set(labels(kw.search("cats stock", 10))) == {3, 4}
    assert kw.search("zebra", 10) == []
    assert kw.count() == 4  # the None text is not indexed


def test_more_query_words_matched_ranks_higher(kw: KeywordIndex) -> None:
    kw.upsert(
        [
            (10, "vector search with hnsw graphs"),
            (11, "vector arithmetic in linear algebra"),
            (12, "full text search engines"),
        ]
    )
    assert labels(kw.search("vector search", 10))[0] == 10


# -- languages -------------------------------------------------------------------------------------


def test_chinese_bigrams(kw: KeywordIndex) -> None:
    kw.upsert(
        [
            (1, "向量检索是语义搜索的核心"),
            (2, "我们的系统使用向量检索技术。"),
            (3, "向日葵很漂亮"),  # shares only 向
            (4, "检查数量"),  # shares 检 and 量, but no two adjacent characters
            (5, "索引与量子计算"),  # shares 索 and 量
            (6, "The weather is nice today"),
        ]
    )
    assert set(labels(kw.search("向量检索", 10))) == {1, 2}
    assert set(labels(kw.search("我想了解向量检索", 10))) >= {1, 2}
    assert labels(kw.search("向量检索", 10))[:2] in ([1, 2], [2, 1])
    assert labels(kw.search("向日葵", 10)) == [3]
    assert kw.search("向", 10) == []  # a single character is not a word of these texts
    assert analyze("向量检索").split() == ["向量", "量检", "检索"]


def test_chinese_word_matches_whole_and_sentence_matches_in_part(kw: KeywordIndex) -> None:
    kw.upsert([(1, "向量数据库"), (2, "基于向量检索的问答"), (3, "全文检索")])
    # A word (up to MAX_CJK_PHRASE characters) must be there as it is...
    assert labels(kw.search("向量检索", 10)) == [2]
    # ...a typed sentence ranks the documents sharing most of it first.
    hits = labels(kw.search("向量检索和全文检索", 10))
    assert set(hits[:2]) == {2, 3} and hits[2] == 1  # 1 shares one pair of characters


def test_japanese_and_korean(kw: KeywordIndex) -> None:
    kw.upsert(
        [
            (1, "東京タワーに行きました"),
            (2, "京都の寺を見る"),
            (3, "東京都庁"),
            (4, "한국어 검색 엔진을 만들었다"),
            (5, "ジョン・スミス"),
        ]
    )
    assert labels(kw.search("東京タワー", 10))[0] == 1
    assert 2 not in labels(kw.search("東京タワー", 10))
    assert labels(kw.search("タワー", 10)) == [1]
    assert labels(kw.search("ﾀﾜｰ", 10)) == [1]  # half-width katakana
    assert labels(kw.search("京都", 10)) == [2, 3] or set(labels(kw.search("京都", 10))) == {2, 3}
    assert labels(kw.search("검색", 10)) == [4]
    assert labels(kw.search("스미스", 10)) == []
    assert labels(kw.search("スミス", 10)) == [5]  # ・ separates words


@pytest.mark.parametrize(
    ("document", "query"),
    [
        ("Herr Muller kommt", "Müller"),
        ("Herr MÜLLER kommt", "muller"),
        ("un CAFE noir", "café"),
        ("un café noir", "CAFE"),
        ("l'élève est là", "ELEVE"),
        ("e\u0301cole primaire", "école"),  # decomposed accent in the document
        ("die Straße", "STRASSE"),
        ("ΣΟΦΊΑ", "σοφια"),
        ("Ｆｕｌｌｗｉｄｔｈ text", "fullwidth"),
        ("İstanbul", "istanbul"),
        ("हिन्दी भाषा", "हिन्दी"),
    ],
)
def test_accents_and_case(kw: KeywordIndex, document: str, query: str) -> None:
    kw.upsert([(1, document), (2, "something unrelated")])
    assert labels(kw.search(query, 10)) == [1]


def test_marks_stay_inside_words(kw: KeywordIndex) -> None:
    kw.upsert([(1, "हिन्दी भाषा")])
    assert kw.search("ह", 10) == []  # not cut into letters at each vowel sign


# -- hostile queries -------------------------------------------------------------------------------

HOSTILE = [
    '"',
    '""',
    '"unterminated',
    "*",
    "fox*",
    "NEAR(fox dog)",
    "NEAR",
    "fox AND",
    "AND",
    "OR OR OR",
    "NOT fox",
    "-fox",
    "^fox",
    "body:fox",
    "tag:x",
    "{body tag}: fox",
    "(fox",
    "fox)",
    "((((",
    "a\x00b",
    "\ud800",
    "😀 🙃",
    "+",
    ":",
    "rowid=1; DROP TABLE kw; --",
]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_are_words(kw: KeywordIndex, query: str) -> None:
    kw.upsert([(1, "the fox and the dog"), (2, "rock AND roll, NEAR or far, NOT now")])
    hits = kw.search(query, 10)
    assert all(label in (1, 2) and score > 0 for label, score in hits)


def test_syntax_words_are_plain_words(kw: KeywordIndex) -> None:
    kw.upsert([(1, "the fox and the dog"), (2, "rock AND roll, NEAR or far, NOT now")])
    assert labels(kw.search("NEAR", 10)) == [2]
    assert labels(kw.search("NOT", 10)) == [2]
    assert set(labels(kw.search("AND", 10))) == {1, 2}
    assert labels(kw.search("-fox", 10)) == [1]
    assert labels(kw.search('"fox"', 10)) == [1]


def test_tag_column_is_not_searchable(kw: KeywordIndex) -> None:
    kw.upsert([(i, f"document number {i}") for i in range(20)])
    assert kw.search("x", 10) == []
    assert kw.search("tag x", 10) == []


@pytest.mark.parametrize("query", ["", " ", "!!!", "?.,;:", "'\"()[]{}*^-+", "\t\n", "…—–"])
def test_punctuation_only_finds_nothing(kw: KeywordIndex, query: str) -> None:
    kw.upsert([(1, "anything at all")])
    assert kw.search(query, 10) == []
    assert match_expression(query_terms(query)) is None


def test_huge_query_is_bounded(kw: KeywordIndex) -> None:
    kw.upsert([(i, f"word{i} filler text") for i in range(100)])
    query = " ".join(f"word{i}" for i in range(200_000))[: 1 << 20]  # 1 MiB
    assert len(query_terms(query)) == MAX_QUERY_TERMS
    start = time.monotonic()
    hits = kw.search(query, 10)
    assert time.monotonic() - start < 5
    assert len(hits) == 10 and all(label < MAX_QUERY_TERMS for label in labels(hits))
    assert kw.search("(" * (1 << 20), 10) == []
    assert kw.search('"' * (1 << 20), 10) == []


def test_invalid_arguments(kw: KeywordIndex) -> None:
    with pytest.raises(InvalidArgument) as info:
        kw.search(b"fox", 10)  # type: ignore[arg-type]
    assert info.value.data["argument"] == "query"
    for k in (0, -1, True, 1.5):
        with pytest.raises(InvalidArgument):
            kw.search("fox", k)  # type: ignore[arg-type]
    for bad in (-1, 2**63, True, "1", 1.0):
        with pytest.raises(ValueError):
            kw.upsert([(bad, "text")])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        kw.upsert([(1, "text")], lsn=-1)
    with pytest.raises(TypeError):
        kw.upsert([(1, b"bytes")])  # type: ignore[list-item]
    assert kw.count() == 0


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(query=st.text(max_size=200))
def test_any_query_never_raises(kw: KeywordIndex, query: str) -> None:
    if kw.count() == 0:
        kw.upsert([(1, "the quick brown fox"), (2, "向量检索 东京タワー"), (3, "café Müller")])
    for label, score in kw.search(query, 5):
        assert label in (1, 2, 3) and score > 0
    kw.search(query, 5, allowed=lambda label: label != 2)


WORD = st.text(
    alphabet=st.sampled_from("abcdefxyzéüßøÅ向量检索東京タワー한국어ΣσάДжहि"),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(words=st.lists(WORD, min_size=1, max_size=6), noise=st.text(max_size=40))
def test_any_document_is_found_by_its_words(kw: KeywordIndex, words: list[str], noise: str) -> None:
    text = " ".join(words) + " " + noise
    kw.upsert([(7, text)])
    for word in words:
        if query_terms(word):
            assert 7 in labels(kw.search(word, 10)), (word, text)


# -- writes ----------------------------------------------------------------------------------------


def test_upsert_replaces(kw: KeywordIndex) -> None:
    kw.upsert([(1, "apple pie"), (2, "apple tart")], lsn=1)
    kw.upsert([(1, "banana bread")], lsn=2)
    assert labels(kw.search("apple", 10)) == [2]
    assert labels(kw.search("banana", 10)) == [1]
    assert kw.count() == 2
    kw.upsert([(2, None)], lsn=3)  # no text: removed
    kw.upsert([(1, "")], lsn=4)
    assert kw.count() == 0
    assert kw.search("apple banana", 10) == []
    assert kw.applied_lsn == 4


def test_delete(kw: KeywordIndex) -> None:
    kw.upsert([(i, f"common word{i}") for i in range(10)], lsn=1)
    kw.delete([3, 4, 999], lsn=2)  # 999 was never there
    assert kw.count() == 8
    assert kw.labels() == {0, 1, 2, 5, 6, 7, 8, 9}
    assert set(labels(kw.search("common", 100))) == {0, 1, 2, 5, 6, 7, 8, 9}
    assert kw.search("word3", 10) == []
    kw.delete([3], lsn=3)  # replaying a delete is harmless
    assert kw.applied_lsn == 3
    kw.apply(upserts=[(3, "back again")], deletes=[0, 1], lsn=4)
    assert kw.labels() == {2, 3, 5, 6, 7, 8, 9}


def test_filtered_search_reads_until_k(kw: KeywordIndex) -> None:
    kw.upsert([(i, f"shared term {'extra ' * (i % 5)}") for i in range(2000)], lsn=1)
    for modulus, k in ((997, 10), (7, 10), (1, 10), (3, 1000)):
        hits = kw.search("shared", k, allowed=lambda label, m=modulus: label % m == 0)
        expected = min(k, len([i for i in range(2000) if i % modulus == 0]))
        assert len(hits) == expected
        assert all(label % modulus == 0 for label in labels(hits))
        scores = [score for _, score in hits]
        assert scores == sorted(scores, reverse=True)
    assert kw.search("shared", 10, allowed=lambda label: False) == []
    # The filter sees labels best first: the k it passes are the k best of those it accepts.
    every = kw.search("shared", 2000)
    odd = [hit for hit in every if hit[0] % 2][:10]
    assert kw.search("shared", 10, allowed=lambda label: label % 2 == 1) == odd


def test_common_words_only_score_documents_with_rare_ones(tmp_path: Path) -> None:
    texts = [f"the cat number {i} sat on the mat" for i in range(300)]
    texts += ["the quokka", "a quokka and the cat", "the dog"]
    rows = list(enumerate(texts)) + [(400 + j, f"the dog {j}") for j in range(20)]
    fast = KeywordIndex(tmp_path / "fast.sqlite", common_min_df=10)
    exact = KeywordIndex(tmp_path / "exact.sqlite", common_fraction=1.0, common_min_df=2**62)
    for index in (fast, exact):
        index.upsert(rows)
    try:
        # "quokka" is rare, "the" and "cat" common: only quokka documents, scored with all words.
        hits = fast.search("the cat quokka", 10)
        assert set(labels(hits)) == {300, 301}
        full = dict(exact.search("the cat quokka", 400))
        for label, score in hits:
            assert score == pytest.approx(full[label], rel=1e-9)
        assert labels(hits) == labels(exact.search("the cat quokka", 2))
        # Only common words: the rarest (within a factor 2) take the place of the rare ones.
        dogs = {302, *range(400, 420)}
        assert set(labels(fast.search("the dog", 1000))) == dogs
        assert set(labels(fast.search("the cat dog", 1000))) == dogs
        assert len(fast.search("the", 1000)) == 323
        assert len(exact.search("the dog", 1000)) == 323
        # Too few documents with a rare word: the next rarest joins while that stays cheap.
        fast.upsert([(600 + j, f"a lion {j}") for j in range(15)] + [(700, "the zebra")])
        assert set(labels(fast.search("the zebra lion", 100))) == {700, *range(600, 615)}
        # Counts stay right as documents come and go.
        fast.delete([300, 301])
        assert fast.search("quokka", 10) == []
        fast.upsert([(500, "quokka")])
        assert labels(fast.search("the quokka", 10))[0] == 500
    finally:
        fast.close()
        exact.close()


# -- durability ------------------------------------------------------------------------------------


def test_applied_lsn_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    with KeywordIndex(path) as kw:
        assert kw.applied_lsn == 0 and kw.reset_reason is None
        kw.upsert([(1, "alpha"), (2, "beta")], lsn=5)
        kw.delete([2], lsn=6)
        kw.set_applied_lsn(9)
        kw.sync()
    with KeywordIndex(path) as kw:
        assert kw.applied_lsn == 9
        assert kw.labels() == {1}
        assert kw.reset_reason is None
        assert kw.check() == []
        kw.clear(lsn=12)
        assert kw.count() == 0 and kw.applied_lsn == 12
    with KeywordIndex(path) as kw:
        assert kw.applied_lsn == 12 and kw.count() == 0
        kw.upsert([(3, "gamma")], lsn=13)
        assert labels(kw.search("gamma", 1)) == [3]


def test_failed_write_changes_nothing(kw: KeywordIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    kw.upsert([(1, "alpha")], lsn=1)

    def boom(db: sqlite3.Connection, lsn: int) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(kw, "_store_lsn", boom)
    with pytest.raises(OSError):
        kw.apply(upserts=[(2, "beta")], deletes=[1], lsn=2)
    monkeypatch.undo()
    assert kw.applied_lsn == 1
    assert kw.labels() == {1}
    assert labels(kw.search("alpha beta", 10)) == [1]
    kw.upsert([(2, "beta")], lsn=2)  # and it still works
    assert kw.labels() == {1, 2}


CHILD_MID_TRANSACTION = """
import os, sys
sys.path.insert(0, {repo!r})
from edge_agent.index.keywords import KeywordIndex

kw = KeywordIndex({path!r})
kw.upsert([(1, "committed alpha"), (2, "committed beta")], lsn=1)
real = KeywordIndex._store_lsn

def die(self, db, lsn):
    real(self, db, lsn)  # rows and lsn written, not committed
    os._exit(9)

KeywordIndex._store_lsn = die
kw.apply(upserts=[(3, "uncommitted gamma")], deletes=[1], lsn=2)
"""


def test_crash_mid_transaction_keeps_committed_state(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    script = CHILD_MID_TRANSACTION.format(repo=str(REPO), path=str(path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == 9, result.stderr.decode()
    with KeywordIndex(path) as kw:
        assert kw.reset_reason is None
        assert kw.applied_lsn == 1
        assert kw.labels() == {1, 2}
        assert kw.search("uncommitted gamma", 10) == []
        assert kw.check() == []


CHILD_LOOP = """
import sys
sys.path.insert(0, {repo!r})
from edge_agent.index.keywords import KeywordIndex

kw = KeywordIndex({path!r})
lsn = kw.applied_lsn
while True:
    lsn += 1
    # Record n adds label n and rewrites label 0: after any crash, count == applied_lsn + 1.
    kw.apply(upserts=[(lsn, f"doc {{lsn}} " + "filler " * 50), (0, f"latest {{lsn}}")], lsn=lsn)
    if lsn == 20:
        print("ready", flush=True)
"""


def test_killed_writer_leaves_a_consistent_file(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    script = CHILD_LOOP.format(repo=str(REPO), path=str(path))
    for round_ in range(3):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None
            if round_ == 0:
                assert child.stdout.readline().strip() == b"ready"
            time.sleep(0.05 + 0.1 * round_)
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=30)
        with KeywordIndex(path) as kw:
            lsn = kw.applied_lsn
            assert lsn >= 20
            assert kw.count() == lsn + 1
            assert kw.labels() == set(range(lsn + 1))
            assert labels(kw.search(f"latest {lsn}", 1)) == [0]
            assert kw.check() == []


def test_disk_full_is_a_typed_error_and_changes_nothing(kw: KeywordIndex) -> None:
    kw.upsert([(1, "alpha")], lsn=1)
    pages = kw._db.execute("PRAGMA page_count").fetchone()[0]
    kw._db.execute(f"PRAGMA max_page_count = {pages + 2}")  # SQLite's "disk is full"
    with pytest.raises(IndexFull):
        kw.upsert([(i, f"word{i} " * 50) for i in range(2, 500)], lsn=2)
    assert kw.applied_lsn == 1 and kw.labels() == {1}
    kw._db.execute("PRAGMA max_page_count = 1073741823")
    kw.upsert([(2, "beta")], lsn=2)
    assert kw.labels() == {1, 2}


def test_unopenable_path_is_not_deleted_or_hidden(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        KeywordIndex(tmp_path / "missing-dir" / FILENAME)


def test_reconcile_trusts_snapshot_labels_and_rewrites_the_rest(kw: KeywordIndex) -> None:
    kw.upsert([(1, "alpha"), (2, "beta"), (5, "stale five"), (6, "stale six")], lsn=10)
    # The collection recovered from a snapshot taken at lsn 8 (labels 0-3 given out), then
    # replayed its WAL, which gave labels 4 and 5 to other documents than before the crash.
    live = {1: "alpha", 3: "gamma", 4: "delta", 5: "epsilon", 7: None}
    assert kw.reconcile(live, lsn=12, base_lsn=8, base_next_label=4) == (3, 2)
    assert kw.labels() == {1, 3, 4, 5}
    assert kw.applied_lsn == 12
    assert kw.search("stale", 10) == [] and kw.search("beta", 10) == []
    assert labels(kw.search("epsilon", 10)) == [5]
    assert labels(kw.search("gamma delta", 10)) in ([3, 4], [4, 3])
    assert kw.reconcile(live, lsn=12, base_lsn=8, base_next_label=4) == (2, 0)  # idempotent


def test_reconcile_rewrites_everything_when_behind_the_snapshot(kw: KeywordIndex) -> None:
    kw.upsert([(1, "wrong text"), (9, "gone")], lsn=3)
    # Lost commits: applied_lsn 3 is older than the snapshot (lsn 10), nothing is trusted.
    assert kw.reconcile({1: "right text", 2: "other"}, lsn=20, base_lsn=10, base_next_label=5) == (
        2,
        2,
    )
    assert kw.search("wrong", 10) == [] and kw.search("gone", 10) == []
    assert labels(kw.search("right", 10)) == [1]
    assert kw.applied_lsn == 20 and kw.labels() == {1, 2}
    # No snapshot (base_lsn 0): the same.
    assert kw.reconcile({3: "third"}, lsn=21) == (1, 2)
    assert kw.labels() == {3}


def test_owner_mismatch_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    with KeywordIndex(path, owner="space-1") as kw:
        kw.upsert([(1, "alpha")], lsn=4)
    with KeywordIndex(path, owner="space-1") as kw:
        assert kw.reset_reason is None and kw.applied_lsn == 4
    with KeywordIndex(path) as kw:  # no owner given: not checked
        assert kw.reset_reason is None and kw.applied_lsn == 4
    with KeywordIndex(path, owner="space-2") as kw:  # e.g. after a reindex
        assert kw.reset_reason is not None and "owner" in kw.reset_reason
        assert kw.applied_lsn == 0 and kw.count() == 0
    with KeywordIndex(path, owner="space-2") as kw:
        assert kw.reset_reason is None


def test_unreadable_file_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    path.write_bytes(b"this is not a database, just junk " * 100)
    with KeywordIndex(path) as kw:
        assert kw.reset_reason is not None and "unreadable" in kw.reset_reason
        assert kw.applied_lsn == 0 and kw.count() == 0
        kw.upsert([(1, "fresh")], lsn=1)
    with KeywordIndex(path) as kw:
        assert kw.reset_reason is None and kw.applied_lsn == 1


def test_other_analyzer_version_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    with KeywordIndex(path) as kw:
        kw.upsert([(1, "alpha")], lsn=3)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 'old/0' WHERE key = 'analyzer'")
    with KeywordIndex(path) as kw:
        assert kw.reset_reason is not None and "another version" in kw.reset_reason
        assert kw.applied_lsn == 0 and kw.count() == 0  # the collection rebuilds it
    with KeywordIndex(path, stem=False) as kw:  # another tokenizer: the same
        assert kw.reset_reason is not None and kw.applied_lsn == 0


def test_uses_wal_and_files_stay_in_place(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    with KeywordIndex(path) as kw:
        kw.upsert([(1, "alpha")], lsn=1)
        assert kw.disk_bytes() > 0
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {p.name for p in tmp_path.iterdir()} <= {FILENAME, FILENAME + "-wal", FILENAME + "-shm"}


def test_closed_index_refuses(tmp_path: Path) -> None:
    kw = KeywordIndex(tmp_path / FILENAME)
    kw.close()
    kw.close()  # twice is fine
    with pytest.raises(ValueError):
        kw.search("fox", 1)
    with pytest.raises(ValueError):
        kw.upsert([(1, "fox")])


def test_concurrent_searches_and_writes(kw: KeywordIndex) -> None:
    kw.upsert([(i, f"seed {i}") for i in range(100)], lsn=1)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                hits = kw.search("seed", 5)
                assert len(hits) == 5
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for lsn in range(2, 60):
        kw.upsert([(1000 + lsn, f"seed extra {lsn}")], lsn=lsn)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors
    assert kw.applied_lsn == 59 and kw.count() == 158


def test_rare_only_scores_the_rarest_words_within_a_document_budget(tmp_path: Path) -> None:
    """What hybrid search asks for: candidates matched and ranked by the query's rarest words,
    taken rarest first while the documents holding them stay within k x the per-hit budget,
    so the cost of a query is bounded by k and not by how common its other words are."""
    with KeywordIndex(tmp_path / "k.sqlite", candidate_docs_per_hit=1) as kw:
        kw.upsert(
            [
                (1, "the cat sat on the mat"),
                (2, "the dog sat on the log"),
                (3, "the cat and the dog"),
                (4, "the the the the zebra"),
                (5, "a bird on a wire"),
                (6, "the cat naps"),
            ]
        )
        full = kw.search("the zebra cat", 10)
        assert {label for label, _ in full} == {1, 2, 3, 4, 6}
        # Budget 1 x 2 documents: "zebra" (1 document) fits, "cat" (3 more) does not.
        assert [label for label, _ in kw.search("the zebra cat", 2, rare_only=True)] == [4]
        # Budget 4: "zebra" and "cat" (4 documents in all), never "the" (5 more).
        rare = kw.search("the zebra cat", 4, rare_only=True)
        assert {label for label, _ in rare} == {1, 3, 4, 6}
        # Without "the", 4 is no longer helped by its four "the"s: zebra alone ranks it.
        assert rare[0][0] == 4
        # The rarest word is always taken, even past the budget.
        # (budget 2 < the 3 documents with "cat"), and only it: no document without "cat".
        only_cat = kw.search("the cat", 2, rare_only=True)
        assert len(only_cat) == 2 and {label for label, _ in only_cat} <= {1, 3, 6}
        # A collection within the budget is plain BM25.
        assert kw.search("the zebra cat", 10, rare_only=True) == full
