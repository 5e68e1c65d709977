"""Keyword (BM25) search for one collection, on SQLite FTS5.

Why SQLite FTS5: it is in the standard library (``sqlite3``; CPython's SQLite builds include
FTS5 on every platform we ship for, and ``KeywordIndex`` says so clearly when one does not),
it is among the best-kept and most tested pieces of software there is, it is transactional
and crash-safe, it has BM25 built in (``bm25()``), and its inverted index lives on disk, so
the daemon's memory does not grow with the corpus. No new dependency.

What is stored: one row per document that has text, keyed by the collection's integer label
(``rowid`` = label; the collection maps ids <-> labels), holding the *analysed* text (below),
and a ``meta`` table with the schema and analyser versions and ``applied_lsn``: the last
collection WAL record applied here, committed in the same SQLite transaction as the rows it
changed. So after any crash the file holds exactly the records up to ``applied_lsn``. The
collection's recovery collapses its WAL and gives the replayed documents new labels, so
rather than replaying records into this file it calls ``reconcile()`` with its recovered
documents: rows of labels its snapshot had given out are kept (a label's text never
changes), the others are rewritten, and everything is rewritten when ``applied_lsn`` is
older than the snapshot. The keyword file is derived data: it is opened with
``journal_mode=WAL`` and ``synchronous=NORMAL`` (a commit is atomic and survives a process
crash but may be lost on power loss, which only sets ``applied_lsn`` back); the collection's
own WAL is the durability source. ``sync()`` makes everything committed so far durable (call
it before a collection snapshot commits). An unreadable file, or one written by another
analyser version or for another ``owner`` (label space), is started afresh with
``applied_lsn`` 0 (``reset_reason`` says why) and then rebuilt by ``reconcile()``.

Analysis (the same for documents and queries), text in any language:

* NFKC (full-width Latin and half-width katakana become ordinary), then, for non-ASCII text,
  Unicode case folding (``ß`` -> ``ss``, final sigma) and removal of the combining
  diacritics U+0300-U+036F (``café`` = ``cafe``, ``Müller`` = ``muller``, Greek accents);
  FTS5's ``unicode61 remove_diacritics 2`` folds ASCII case and the remaining Latin
  diacritics. Combining marks of other scripts (Devanagari, Thai, ...) stay inside their
  words (``categories 'L* N* Co M*'``; the default would cut Hindi words at every vowel sign).
* Runs of CJK characters (Han, Hiragana, Katakana, Hangul), written without spaces, become
  overlapping character bigrams (a run of one stays one character), like Lucene's
  CJKAnalyzer: ``向量检索`` -> ``向量 量检 检索``, so it matches documents containing it and
  not documents that share only one character with it.
* Porter stemming for English (``running`` = ``run``): on TREC QA open-corpus retrieval
  it raises MRR@10 from 0.737 to 0.746 (recall@10 0.785 -> 0.788) on the train split and
  from 0.528 to 0.592 (recall@10 0.727 -> 0.790) on dev (bench/keyword_bench.py --quality).
  It leaves words in other scripts alone (it only rewrites ASCII suffixes).

Common words: scoring every document that holds a word as common as "the" costs ~3 us each
in bm25() (0.15-0.3 s a query at 100k documents). Like Lucene's CommonTermsQuery, a query word
found in more than max(COMMON_MIN_DF, COMMON_FRACTION x documents) documents only adds to
the scores of documents that hold one of the query's rarer words (exactly as it would in
plain BM25); when every word is that common, the rarest ones (within a factor 2) take the
rare words' place. In a collection of at most 1,000 documents every query is plain BM25.

Queries are never FTS5 syntax: the query is analysed as above, cut into its words (runs of
letters, digits and marks), and every distinct word (at most ``MAX_QUERY_TERMS``, from the
first ``MAX_QUERY_CHARS`` characters) becomes a quoted FTS5 string, OR-ed with the others.
So quotes, ``*``, ``NEAR``, ``-``, ``AND``, ``OR``, ``NOT``, ``^``, ``:`` and parentheses are
plain words or separators, and a query with no word finds nothing.

Thread safety: writes are serialised on one connection; searches run on a small pool of
reader connections, concurrently with each other and with a write (WAL mode: readers see the
last committed state).

``sqlite3`` is imported by the functions that use it, not here: a daemon that only embeds
never loads it (~1 MB of RSS; docs/benchmarks.md, "Serving RSS against llama-server").
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IndexCorrupt, IndexFull, InvalidArgument

if TYPE_CHECKING:
    import sqlite3

__all__ = [
    "ANALYZER_VERSION",
    "FILENAME",
    "MAX_QUERY_CHARS",
    "MAX_QUERY_TERMS",
    "KeywordIndex",
    "analyze",
    "fts5_available",
    "match_expression",
    "query_terms",
]

log = logging.getLogger(__name__)

FILENAME = "keywords.sqlite"
SCHEMA_VERSION = 1
# Bump when analyze() or the tokenizer changes: a file written by another version is rebuilt.
ANALYZER_VERSION = "nfkc-fold-cjk2/1"
MAX_QUERY_TERMS = 64  # distinct words of a query that are searched; the rest are ignored
MAX_QUERY_CHARS = 65536  # characters of a query that are read; the rest are ignored
# A query word is common when more documents than max(COMMON_MIN_DF, COMMON_FRACTION * N)
# contain it; common words only score documents that contain a rarer query word.
COMMON_FRACTION = 0.01
COMMON_MIN_DF = 1000
# A fusion's keyword candidates (search(rare_only=True)): the rarest words are scored while the
# documents holding them add up to at most this many per candidate wanted (k).
CANDIDATE_DOCS_PER_HIT = 20
_MAX_LABEL = 2**63 - 1
_IDLE_READERS = 4
_FETCH = 256

_TOKENIZER_BASE = "unicode61 remove_diacritics 2 categories 'L* N* Co M*'"


def _tokenizer(stem: bool) -> str:
    return f"porter {_TOKENIZER_BASE}" if stem else _TOKENIZER_BASE


# -- analysis ------------------------------------------------------------------------------------

# Han (CJK unified ideographs and extensions, compatibility ideographs, 々〆〇), Hiragana,
# Katakana (not the ・ middle dot, a word separator), Hangul syllables and jamo.
_CJK_RE = re.compile(
    "["
    "\u1100-\u11ff"  # Hangul jamo
    "\u3005-\u3007"  # 々 〆 〇
    "\u3041-\u3096\u309d-\u309f"  # Hiragana
    "\u30a1-\u30fa\u30fc-\u30ff"  # Katakana
    "\u3130-\u318f"  # Hangul compatibility jamo
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\ua960-\ua97f"  # Hangul jamo extended-A
    "\uac00-\ud7af"  # Hangul syllables
    "\ud7b0-\ud7ff"  # Hangul jamo extended-B
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0003134f"  # CJK extensions B-G, compatibility supplement
    "]+"
)
_COMBINING_RE = re.compile("[\u0300-\u036f]+")


def _bigrams(match: re.Match[str]) -> str:
    run = match.group()
    if len(run) <= 2:
        return f" {run} "
    return " " + " ".join(run[i : i + 2] for i in range(len(run) - 1)) + " "


def _fold(text: str) -> str:
    """NFKC, case folding and combining diacritics removed (non-ASCII text only)."""
    if text.isascii():
        return text  # unicode61 folds ASCII case itself; nothing else to do
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates: SQLite refuses them
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _COMBINING_RE.sub("", unicodedata.normalize("NFD", text))
    return unicodedata.normalize("NFC", text)


def analyze(text: str) -> str:
    """The text as it is handed to the FTS5 tokenizer (documents and queries alike)."""
    if text.isascii():
        return text
    return _CJK_RE.sub(_bigrams, _fold(text))


@functools.cache
def _word_re() -> re.Pattern[str]:
    """A word: a run of letters and digits (``[^\\W_]``), combining marks and private-use
    characters, i.e. of what the tokenizer's ``categories 'L* N* Co M*'`` keeps. Built once
    (~50 ms): ``re`` has no Unicode category classes."""
    marks: list[str] = []
    start = None
    for cp in range(0x20001):
        is_mark = cp < 0x20000 and unicodedata.category(chr(cp))[0] == "M"
        if is_mark and start is None:
            start = cp
        elif not is_mark and start is not None:
            marks.append(f"{re.escape(chr(start))}-{re.escape(chr(cp - 1))}")
            start = None
    marks.append("\U000e0100-\U000e01ef")  # variation selectors supplement
    private = "\ue000-\uf8ff\U000f0000-\U000ffffd\U00100000-\U0010fffd"
    return re.compile(f"(?:[^\\W_]|[{''.join(marks)}{private}])+")


# A CJK run of the query up to this many characters (a word: most are 2-4) must appear as
# it is (its bigrams form one phrase): "向量检索" finds the documents containing it, not those
# sharing one character pair with it. A longer run (a typed sentence) is searched by its
# bigrams, OR-ed, so documents sharing most of it rank first.
MAX_CJK_PHRASE = 4


def query_terms(query: str) -> list[str]:
    """The distinct words of a query, in order, at most MAX_QUERY_TERMS; a short CJK run is
    one term made of its bigrams (an FTS5 phrase once quoted)."""
    text = _fold(query[:MAX_QUERY_CHARS])
    if text.isascii():
        text = text.lower()
    terms: dict[str, None] = {}

    def words(part: str) -> None:
        for match in _word_re().finditer(part):
            terms[match.group()] = None
            if len(terms) >= MAX_QUERY_TERMS:
                return

    position = 0
    for run in _CJK_RE.finditer(text):
        words(text[position : run.start()])
        position = run.end()
        if len(terms) >= MAX_QUERY_TERMS:
            break
        grams = _bigrams(run).split()
        if len(run.group()) <= MAX_CJK_PHRASE:
            terms[" ".join(grams)] = None
        else:
            for gram in grams:
                terms[gram] = None
                if len(terms) >= MAX_QUERY_TERMS:
                    break
    if len(terms) < MAX_QUERY_TERMS:
        words(text[position:])
    return list(terms)[:MAX_QUERY_TERMS]


def _or(terms: Sequence[str]) -> str:
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)


def match_expression(rare: Sequence[str], common: Sequence[str] = ()) -> str | None:
    """The FTS5 MATCH expression: every word a quoted string (never FTS5 syntax), OR-ed,
    searched in the ``body`` column; None when there is no word.

    With ``common`` words: only documents with a rare word match, and the common words add
    to their scores (``tag`` holds one token in every row, weighted 0 by bm25(), so that
    ``(common OR tag:x)`` is true for every document while scoring the common words)."""
    if not rare:
        rare, common = common, ()
    if not rare:
        return None
    if not common:
        return f"body : ({_or(rare)})"
    return f"body : ({_or(rare)}) AND (body : ({_or(common)}) OR tag : x)"


def fts5_available() -> bool:
    import sqlite3  # lazily: see the module docstring

    try:
        with contextlib.closing(sqlite3.connect(":memory:")) as db:
            db.execute(f'CREATE VIRTUAL TABLE t USING fts5(x, tokenize="{_tokenizer(True)}")')
        return True
    except sqlite3.Error:
        return False


# -- the index -----------------------------------------------------------------------------------


def _check_label(label: object) -> int:
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label <= _MAX_LABEL:
        raise ValueError(f"labels must be integers in [0, 2**63), got {label!r:.40}")
    return label


def _check_lsn(lsn: object) -> int:
    if not isinstance(lsn, int) or isinstance(lsn, bool) or not 0 <= lsn <= _MAX_LABEL:
        raise ValueError(f"lsn must be an integer in [0, 2**63), got {lsn!r:.40}")
    return lsn


def _is_corruption(exc: sqlite3.Error) -> bool:
    import sqlite3  # lazily: see the module docstring

    text = str(exc).lower()
    return type(exc) is sqlite3.DatabaseError or "malformed" in text or "not a database" in text


@contextlib.contextmanager
def _typed_errors() -> Iterator[None]:
    """SQLite's disk-full and corruption errors as the index's own typed errors."""
    import sqlite3  # lazily: see the module docstring

    try:
        yield
    except sqlite3.Error as exc:
        if "full" in str(exc).lower():
            raise IndexFull("no space left for the keyword index", part="keywords") from exc
        if _is_corruption(exc):
            raise IndexCorrupt(f"the keyword index is unreadable ({exc})", part="keywords") from exc
        raise


class KeywordIndex:
    """BM25 keyword search over one collection's document texts, keyed by integer label."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        owner: str | None = None,
        stem: bool = True,
        common_fraction: float = COMMON_FRACTION,
        common_min_df: int = COMMON_MIN_DF,
        candidate_docs_per_hit: int = CANDIDATE_DOCS_PER_HIT,
    ) -> None:
        """Open or create the file. ``owner`` names the label space (e.g. an id the collection
        renews when it is created or reindexed): a file written for another owner, by
        another analyser version, or unreadable, is started afresh with applied_lsn 0."""
        import sqlite3  # lazily: see the module docstring

        self.path = Path(path)
        self.owner = owner
        self.stem = stem
        self.common_fraction = common_fraction
        self.common_min_df = common_min_df
        self.candidate_docs_per_hit = candidate_docs_per_hit
        # Document frequencies of query words, to tell rare from common; slightly stale
        # counts only move that line, never a score. Reset after many changes.
        self._df_lock = threading.Lock()
        self._dfs: dict[str, int] = {}
        self._df_docs = -1  # documents when the counts were started; -1: not yet
        self._df_since = 0  # self._changes then
        self._changes = 0  # rows written by this object
        self.reset_reason: str | None = None  # why the file was started afresh, if it was
        self._write_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        try:
            self._db = self._open_writer()
        except sqlite3.DatabaseError as exc:  # not a database, malformed, ...: derived data
            if not _is_corruption(exc):
                raise
            log.warning("keyword index %s is unreadable (%s): starting it afresh", path, exc)
            self._remove_files()
            self.reset_reason = f"unreadable ({exc})"
            self._db = self._open_writer()
        self._applied_lsn = int(self._meta("applied_lsn"))

    # -- opening -------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        import sqlite3  # lazily: see the module docstring

        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 10000")
        return db

    def _open_writer(self) -> sqlite3.Connection:
        db = self._connect()
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("keyword index %s: journal_mode is %s, not wal", self.path, mode)
            db.execute("PRAGMA synchronous = NORMAL")
            self._ensure_schema(db)
        except BaseException:
            db.close()
            raise
        return db

    def _ensure_schema(self, db: sqlite3.Connection) -> None:
        import sqlite3  # lazily: see the module docstring

        expected = {
            "schema": str(SCHEMA_VERSION),
            "analyzer": ANALYZER_VERSION,
            "tokenizer": _tokenizer(self.stem),
        }
        if self.owner is not None:
            expected["owner"] = self.owner
        has_meta = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        has_kw = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'kw'"
        ).fetchone()
        if has_meta and has_kw:
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if all(str(stored.get(k)) == v for k, v in expected.items()) and (
                "applied_lsn" in stored
            ):
                return
            if self.owner is not None and stored.get("owner") != self.owner:
                self.reset_reason = f"written for another owner ({stored.get('owner')!r:.80})"
            else:
                self.reset_reason = (
                    f"written by another version ({stored.get('analyzer')},"
                    f" {stored.get('tokenizer')})"
                )
            log.warning("keyword index %s: %s; starting it afresh", self.path, self.reset_reason)
        try:
            self._probe_fts5(db)
        except sqlite3.OperationalError as exc:
            if "fts5" in str(exc).lower():
                raise RuntimeError(
                    "this Python's SQLite has no FTS5 full-text search; keyword search needs it"
                ) from exc
            raise
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DROP TABLE IF EXISTS meta")
            db.execute("DROP TABLE IF EXISTS kw")
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID")
            rows = {"owner": "", **expected, "applied_lsn": 0}
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(rows.items()))
            self._create_fts(db)
            db.execute("COMMIT")
        except BaseException:
            self._rollback(db)
            raise

    def _probe_fts5(self, db: sqlite3.Connection) -> None:
        """Fail early, outside any transaction, if FTS5 or its options are missing."""
        db.execute(
            f'CREATE VIRTUAL TABLE temp.probe USING fts5(x, tokenize="{_tokenizer(self.stem)}")'
        )
        db.execute("DROP TABLE temp.probe")

    def _create_fts(self, db: sqlite3.Connection) -> None:
        db.execute(
            f'CREATE VIRTUAL TABLE kw USING fts5(body, tag, tokenize="{_tokenizer(self.stem)}")'
        )

    def _remove_files(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        import sqlite3  # lazily: see the module docstring

        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # -- writes --------------------------------------------------------------------------------

    @property
    def applied_lsn(self) -> int:
        """The last collection WAL record applied here (0: none; rebuild or replay all)."""
        return self._applied_lsn

    def apply(
        self,
        *,
        upserts: Iterable[tuple[int, str | None]] = (),
        deletes: Iterable[int] = (),
        lsn: int | None = None,
    ) -> None:
        """One atomic change: delete ``deletes``, insert or replace ``upserts``, and record
        ``lsn`` as applied (when given), all in one SQLite transaction. A None or empty
        text only removes the label. Deleting an absent label is not an error (so replaying
        a record twice is harmless)."""
        rows = [(_check_label(label), text) for label, text in upserts]
        gone = [(_check_label(label),) for label in deletes]
        if lsn is not None:
            lsn = _check_lsn(lsn)
        for _, text in rows:
            if text is not None and not isinstance(text, str):
                raise TypeError(f"texts must be str or None, got {type(text).__name__}")
        inserts = [(label, analyze(text)) for label, text in rows if text]
        gone.extend((label,) for label, text in rows if not text)
        with self._write_lock, _typed_errors():
            db = self._writer()
            db.execute("BEGIN IMMEDIATE")
            try:
                if gone:
                    db.executemany("DELETE FROM kw WHERE rowid = ?", gone)
                if inserts:
                    db.executemany(
                        "INSERT OR REPLACE INTO kw (rowid, body, tag) VALUES (?, ?, 'x')", inserts
                    )
                if lsn is not None:
                    self._store_lsn(db, lsn)
                db.execute("COMMIT")
            except BaseException:
                self._rollback(db)
                raise
            if lsn is not None:
                self._applied_lsn = lsn
            self._changes += len(gone) + len(inserts)

    def upsert(self, rows: Sequence[tuple[int, str | None]], lsn: int | None = None) -> None:
        """Insert or replace (label, text) rows; see apply()."""
        self.apply(upserts=rows, lsn=lsn)

    def delete(self, labels: Iterable[int], lsn: int | None = None) -> None:
        self.apply(deletes=labels, lsn=lsn)

    def set_applied_lsn(self, lsn: int) -> None:
        self.apply(lsn=lsn)

    def clear(self, lsn: int = 0) -> None:
        """Remove every row and set ``applied_lsn``, atomically (e.g. before a rebuild)."""
        lsn = _check_lsn(lsn)
        with self._write_lock, _typed_errors():
            db = self._writer()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DROP TABLE kw")
                self._create_fts(db)
                self._store_lsn(db, lsn)
                db.execute("COMMIT")
            except BaseException:
                self._rollback(db)
                raise
            self._applied_lsn = lsn
            with self._df_lock:
                self._df_docs = -1

    def reconcile(
        self,
        texts: Mapping[int, str | None],
        *,
        lsn: int,
        base_lsn: int = 0,
        base_next_label: int = 0,
    ) -> tuple[int, int]:
        """Make the index hold exactly ``texts`` (label -> text of every live document of
        the collection, as it stands at ``lsn``), in one transaction; (rows written, rows
        deleted). For a collection that has just recovered from its newest usable snapshot
        (taken at ``base_lsn``, whose next free label was ``base_next_label``) and its WAL.

        A label's text never changes (a replaced document gets a new label), so a row whose
        label the snapshot had already given out is right as it is, provided this file has
        everything up to ``base_lsn`` (``applied_lsn >= base_lsn``; call sync() before each
        snapshot commits to keep it so). Labels from ``base_next_label`` on were given out
        again by the replay, maybe to other documents: those rows are rewritten. Otherwise
        (no snapshot, a reset file, lost commits) every row is rewritten."""
        lsn = _check_lsn(lsn)
        trusted = base_next_label if 0 < base_lsn <= self._applied_lsn else 0
        live = {_check_label(label): text for label, text in texts.items() if text}
        for text in live.values():
            if not isinstance(text, str):
                raise TypeError(f"texts must be str or None, got {type(text).__name__}")
        with self._write_lock, _typed_errors():
            db = self._writer()
            db.execute("BEGIN IMMEDIATE")
            try:
                if trusted:
                    have = {row[0] for row in db.execute("SELECT id FROM kw_content")}
                    gone = [(label,) for label in have if label not in live]
                    todo = [
                        (label, text)
                        for label, text in live.items()
                        if label >= trusted or label not in have
                    ]
                    deleted = len(gone)
                    db.executemany("DELETE FROM kw WHERE rowid = ?", gone)
                else:
                    deleted = db.execute("SELECT count(*) FROM kw_content").fetchone()[0]
                    db.execute("DROP TABLE kw")
                    self._create_fts(db)
                    todo = list(live.items())
                for start in range(0, len(todo), 4096):
                    db.executemany(
                        "INSERT OR REPLACE INTO kw (rowid, body, tag) VALUES (?, ?, 'x')",
                        [(label, analyze(text)) for label, text in todo[start : start + 4096]],
                    )
                self._store_lsn(db, lsn)
                db.execute("COMMIT")
            except BaseException:
                self._rollback(db)
                raise
            self._applied_lsn = lsn
            self._changes += deleted + len(todo)
            with self._df_lock:
                self._df_docs = -1
        return len(todo), deleted

    def _store_lsn(self, db: sqlite3.Connection, lsn: int) -> None:
        db.execute("UPDATE meta SET value = ? WHERE key = 'applied_lsn'", (lsn,))

    def sync(self) -> None:
        """Make every committed change durable (synchronous=NORMAL defers the WAL fsync)."""
        with self._write_lock, _typed_errors():
            db = self._writer()
            db.execute("PRAGMA synchronous = FULL")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    # A write makes the commit sync the WAL, and with it every earlier commit.
                    db.execute("UPDATE meta SET value = value WHERE key = 'applied_lsn'")
                    db.execute("COMMIT")
                except BaseException:
                    self._rollback(db)
                    raise
            finally:
                db.execute("PRAGMA synchronous = NORMAL")

    def optimize(self) -> None:
        """Merge the index into one b-tree segment: faster queries after a bulk load."""
        with self._write_lock, _typed_errors():
            self._writer().execute("INSERT INTO kw (kw) VALUES ('optimize')")

    def _writer(self) -> sqlite3.Connection:
        if self._closed:
            raise ValueError("keyword index is closed")
        return self._db

    # -- reads ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._pool_lock:
            if self._closed:
                raise ValueError("keyword index is closed")
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = self._connect()
            db.execute("PRAGMA query_only = 1")
        try:
            yield db
        finally:
            self._rollback(db)
            with self._pool_lock:
                keep = not self._closed and len(self._idle) < _IDLE_READERS
                if keep:
                    self._idle.append(db)
            if not keep:
                db.close()

    def search(
        self,
        query: str,
        k: int,
        allowed: Callable[[int], bool] | None = None,
        *,
        rare_only: bool = False,
    ) -> list[tuple[int, float]]:
        """Up to k (label, score) pairs, best first; score = -bm25 > 0, higher is better.

        ``allowed``: only labels it accepts; ranked rows are read until k pass or none are
        left, so a selective filter still returns min(k, matching documents).
        ``rare_only``: candidates for a fusion rather than a BM25 ranking: only the query's
        rarest words are matched and scored, taken rarest first while the documents they are
        in add up to at most ``candidate_docs_per_hit`` x k (always the rarest word). bm25()
        costs about 1.3 us per matched document, so this bounds a query's cost by k, not by
        the collection: 1.2 ms p50 against 14 ms for plain BM25 at 100k documents
        (docs/benchmarks.md). What hybrid search uses for its keyword candidates."""
        if not isinstance(query, str):
            raise InvalidArgument(
                f"query must be a string, got {type(query).__name__}", argument="query"
            )
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InvalidArgument(f"k must be a positive integer, got {k!r:.40}", argument="k")
        terms = query_terms(query)
        if not terms:
            return []
        # bm25 weights: body 1, tag 0 (see match_expression).
        sql = "SELECT rowid, bm25(kw, 1, 0) FROM kw WHERE kw MATCH ? ORDER BY bm25(kw, 1, 0)"
        hits: list[tuple[int, float]] = []
        with self._reader() as db, _typed_errors():
            common: list[str] = []
            if rare_only:
                rare, _ = self._split(db, terms, budget=self.candidate_docs_per_hit * k)
            else:
                rare, common = self._split(db, terms)
            expression = match_expression(rare, common)
            if allowed is None:
                rows = db.execute(sql + " LIMIT ?", (expression, k)).fetchall()
                return [(label, -score) for label, score in rows if score < 0]
            cursor = db.execute(sql, (expression,))
            while len(hits) < k:
                batch = cursor.fetchmany(_FETCH)
                if not batch:
                    break
                for label, score in batch:
                    if score < 0 and allowed(label):
                        hits.append((label, -score))
                        if len(hits) == k:
                            break
            cursor.close()
        return hits

    def _split(
        self, db: sqlite3.Connection, terms: list[str], budget: int | None = None
    ) -> tuple[list[str], list[str]]:
        """(rare, common) words: see "Common words" above. With T = max(common_min_df,
        common_fraction x documents): words in at most T documents are rare; with none, the
        rarest word and those within a factor 2 of it; then, while the rare words are in
        fewer than T documents in all, the next rarest word joins them if the total stays
        within 4 T (more candidates at a bounded cost). With a ``budget`` instead: the
        rarest word, then the next rarest while the words' documents add up to at most
        ``budget``."""
        with self._df_lock:
            stale = self._changes - self._df_since > max(1000, self._df_docs // 20)
            if self._df_docs < 0 or stale or len(self._dfs) > 100_000:
                self._dfs.clear()
                self._df_docs = -1
            docs = self._df_docs
            known = {t: self._dfs[t] for t in terms if t in self._dfs}
        if docs < 0:
            since = self._changes
            docs = int(db.execute("SELECT count(*) FROM kw_content").fetchone()[0])
            with self._df_lock:
                if self._df_docs < 0:
                    self._df_docs, self._df_since = docs, since
        threshold = max(self.common_min_df, self.common_fraction * docs)
        if docs <= (threshold if budget is None else budget):
            return terms, []
        for term in terms:
            if term not in known:
                row = db.execute(
                    "SELECT count(*) FROM kw WHERE kw MATCH ?", (match_expression([term]),)
                ).fetchone()
                known[term] = int(row[0])
        with self._df_lock:
            self._dfs.update(known)
        by_df = sorted(terms, key=known.__getitem__)
        if budget is not None:
            taken, total = 1, known[by_df[0]]
            while taken < len(by_df) and total + known[by_df[taken]] <= budget:
                total += known[by_df[taken]]
                taken += 1
            rare = set(by_df[:taken])
            return [t for t in terms if t in rare], [t for t in terms if t not in rare]
        line = max(threshold, 2 * known[by_df[0]])
        taken = sum(1 for t in by_df if known[t] <= line)
        total = sum(known[t] for t in by_df[:taken])
        while taken < len(by_df) and total < threshold:
            total += known[by_df[taken]]
            if total > 4 * threshold:
                break
            taken += 1
        if taken == len(by_df):
            return terms, []
        rare = set(by_df[:taken])
        return [t for t in terms if t in rare], [t for t in terms if t not in rare]

    def count(self) -> int:
        """Documents indexed (those with a non-empty text)."""
        with self._reader() as db:
            return int(db.execute("SELECT count(*) FROM kw_content").fetchone()[0])

    def labels(self) -> set[int]:
        """Every indexed label (for checks and tests)."""
        with self._reader() as db:
            return {row[0] for row in db.execute("SELECT id FROM kw_content")}

    def check(self) -> list[str]:
        """Problems found by SQLite's and FTS5's integrity checks (empty: none)."""
        import sqlite3  # lazily: see the module docstring

        problems: list[str] = []
        with self._write_lock:
            db = self._writer()
            try:
                rows = db.execute("PRAGMA quick_check").fetchall()
                problems += [str(r[0]) for r in rows if str(r[0]).lower() != "ok"]
                db.execute("INSERT INTO kw (kw, rank) VALUES ('integrity-check', 1)")
            except sqlite3.DatabaseError as exc:
                problems.append(str(exc))
        return problems

    def disk_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        with self._write_lock, self._pool_lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
        for db in idle:
            db.close()
        self._db.close()

    def __enter__(self) -> KeywordIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
