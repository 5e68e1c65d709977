"""A collection whose documents live in Milvus (Milvus Lite, Standalone or Distributed).

The same methods and errors as a local ``Collection`` (add, upsert, delete, get, count,
search by vector, keyword and hybrid, metadata filters), so the daemon's IndexService serves
either. The local side is only a manifest in ``<index root>/<name>/`` that records the
backend, the URI, the Milvus collection's name and the model fingerprint; the documents are
in Milvus, which several agents may share.

Why pymilvus: it is the Milvus project's own client, speaks to Milvus Lite (a ``.db`` path,
in-process) and to Milvus servers (``http://host:19530``) alike; it is an optional extra
(``pip install 'edge-agent[milvus]'``), imported only when a Milvus collection is used.

Each Milvus collection has these fields: ``id`` (VARCHAR primary key), ``vector``
(FLOAT_VECTOR, COSINE), ``text`` (VARCHAR with an analyzer; "" when no text is stored),
``has_text`` (BOOL), ``meta`` (JSON) and, where the server has full-text search, ``sparse``
(the output of Milvus' BM25 function over ``text``). The model fingerprint is the collection
property ``edge_agent.fingerprint``: another model gets MODEL_MISMATCH.

Filters (filters.compile_filter) are answered in two steps: a Milvus boolean expression that
selects a superset of the matching documents (only equality, ``in`` and ranges on scalar
values are sent; every string is quoted by ``quote`` below, and a string that cannot be
quoted safely is not sent at all), then the exact filter on each returned document's
metadata. A search asks for more candidates until k match or Milvus has no more, so results
are those of the local backend. Milvus Lite, for one, treats ``true`` and ``1`` as equal in
JSON comparisons; the second step makes that harmless.

Faults: every call has a timeout; a call that fails because the server is unreachable, slow
or restarting raises BACKEND_UNAVAILABLE with ``retry_after_ms``, and for that long further
calls fail at once without touching the network (a circuit breaker, doubling up to
MAX_BACKOFF); the next call after it tries again, with the same pymilvus client, which
reconnects by itself. ``backend_error`` says what is wrong meanwhile (health).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from ..errors import (
    BackendUnavailable,
    CollectionExists,
    CollectionNotFound,
    ConfigError,
    DocumentExists,
    EdgeAgentError,
    InvalidArgument,
    ModelMismatch,
)
from .collection_state import MAX_K, _check_k
from .config import IndexConfig
from .documents import (
    Document,
    Hit,
    normalize_vectors,
    validate_id,
    validate_metadata,
    validate_text,
)
from .filters import AllOf, AnyOf, Condition, Filter, Not, compile_filter
from .fingerprint import ModelFingerprint
from .fusion import DEFAULT_FUSION, DEFAULT_WEIGHT, FUSIONS, RRF_K, fuse
from .manifest import CollectionManifest, validate_collection_name

__all__ = [
    "BACKENDS",
    "INSTALL_HINT",
    "MilvusCollection",
    "MilvusStats",
    "MilvusTarget",
    "expression",
    "quote",
]

log = logging.getLogger("edge_agent.index.milvus")

BACKENDS = ("local", "milvus")
INSTALL_HINT = "pip install 'edge-agent[milvus]'"
FINGERPRINT_PROPERTY = "edge_agent.fingerprint"
MAX_TEXT_BYTES = 65_535  # Milvus' VARCHAR limit
MAX_JSON_BYTES = 65_536  # Milvus' default JSON field limit
MAX_LIMIT = 16_384  # Milvus' topk/limit ceiling
MIN_BACKOFF = 1.0
MAX_BACKOFF = 15.0
_MILVUS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_QUERY_BATCH = 1000  # ids per "id in [...]" query
_T = TypeVar("_T")


@dataclass(frozen=True)
class MilvusTarget:
    """Where a Milvus collection is: the pymilvus URI, an optional file holding the token
    (read at each connection, never stored), the Milvus collection name (None: derived from
    ours, see ``milvus_name``) and each call's timeout in seconds."""

    uri: str
    token_file: str | None = None
    collection: str | None = None
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri.strip():
            raise InvalidArgument("the Milvus uri must be a non-empty string", argument="uri")
        if not (self.uri.endswith(".db") or re.match(r"^(https?|tcp|unix)://", self.uri)):
            raise InvalidArgument(
                f"the Milvus uri {self.uri!r:.200} must be a Milvus Lite file (*.db) or a server"
                " address (http://host:19530, https://...)",
                argument="uri",
            )
        if self.collection is not None and not _MILVUS_NAME.match(self.collection):
            raise InvalidArgument(
                f"Milvus collection name {self.collection!r:.80} must be letters, digits and"
                " '_', not starting with a digit",
                argument="milvus_collection",
            )
        if not (isinstance(self.timeout, (int, float)) and 0 < self.timeout <= 600):
            raise InvalidArgument("the Milvus timeout must be in (0, 600] seconds")


def milvus_name(name: str) -> str:
    """The Milvus collection for our collection ``name``: the name itself when Milvus allows
    it, else its letters and digits with a checksum (Milvus names are [A-Za-z_][A-Za-z0-9_]*),
    so every agent maps one name to one Milvus collection."""
    if _MILVUS_NAME.match(name):
        return name
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return f"ea_{cleaned}_{zlib.crc32(name.encode()):08x}"


# -- filters --------------------------------------------------------------------------------------


def quote(text: str) -> str | None:
    """``text`` as a Milvus expression string literal, or None when it holds a character no
    Milvus parser is known to read back exactly (control characters other than tab, newline
    and carriage return); the caller then leaves that condition to the exact check."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            return None
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _literal(value: Any) -> str | None:
    """A scalar as an expression literal; None for what is not sent (None, bytes, floats that
    are not finite, integers past 64 bits, unquotable strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -(1 << 63) <= value < (1 << 63) else None
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return quote(value)
    return None


def _condition(cond: Condition) -> str | None:
    field = quote(cond.key)
    if field is None or cond.exists is False:
        return None
    ref = f"meta[{field}]"
    parts: list[str] = []
    if cond.values is not None:
        literals: list[str] = []
        for vkey in cond.values:
            lit = _literal(cast("tuple[str, Any]", vkey)[1])
            if lit is None:
                return None
            literals.append(lit)
        if not literals:
            return None  # eq and in that contradict: the exact check finds nothing
        parts.append("(" + " or ".join(f"{ref} == {lit}" for lit in sorted(literals)) + ")")
    for op, bound in cond.bounds:
        lit = _literal(bound)
        if lit is not None:
            parts.append(f"{ref} {_RANGE_OPS[op]} {lit}")
    return " and ".join(parts) if parts else None


_RANGE_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def expression(flt: Filter | None) -> str:
    """A Milvus expression selecting a superset of what ``flt`` matches ("" for all)."""
    return _expression(flt) or "" if flt is not None else ""


def _expression(flt: Filter) -> str | None:
    if isinstance(flt, Condition):
        return _condition(flt)
    if isinstance(flt, AllOf):
        kept = [p for p in (_expression(child) for child in flt.children) if p is not None]
        return " and ".join(f"({p})" for p in kept) if kept else None
    if isinstance(flt, AnyOf):
        members = [_expression(child) for child in flt.children]
        if any(p is None for p in members):
            return None  # one member matches anything as far as Milvus is told
        return " or ".join(f"({p})" for p in members)
    if isinstance(flt, Not):
        return None  # the negation of a superset is not one: the exact check decides
    return None


def _json_metadata(meta: dict[str, Any], where: str) -> None:
    """Milvus keeps metadata as JSON: no bytes, and at most MAX_JSON_BYTES."""
    for key, value in meta.items():
        if isinstance(value, bytes):
            raise InvalidArgument(
                f"{where}[{key[:40]!r}] is bytes; a Milvus collection keeps metadata as JSON"
                " (strings, numbers, booleans, null)",
                argument="metadata",
            )
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 63:
            raise InvalidArgument(
                f"{where}[{key[:40]!r}] is past Milvus' signed 64-bit integers",
                argument="metadata",
            )
    size = len(json.dumps(meta, ensure_ascii=False).encode())
    if size > MAX_JSON_BYTES:
        raise InvalidArgument(
            f"{where} is {size} bytes as JSON; a Milvus collection takes {MAX_JSON_BYTES}",
            limit=MAX_JSON_BYTES,
        )


# -- the collection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MilvusStats:
    name: str
    count: int
    dim: int
    fingerprint: dict[str, Any]
    backend: str
    uri: str
    milvus_collection: str
    full_text: bool
    backend_error: str | None


def _load_pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as exc:
        raise ConfigError(
            f"Milvus collections need the pymilvus client: {INSTALL_HINT}", install=INSTALL_HINT
        ) from exc  # an ImportError: its chain ends
    # pymilvus logs each failed RPC with a traceback at ERROR (several per call while a
    # server is away); the collection logs one line per outage instead (_call).
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    return pymilvus


def _is_connection_error(exc: BaseException) -> bool:
    """Whether a pymilvus error means "the server is not there now" (down, slow, restarting)
    rather than "the request is wrong"."""
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(
        word in text
        for word in (
            "unavailable",
            "fail connecting",
            "deadline",
            "timeout",
            "timed out",
            "connection",
            "not ready",
            "closed channel",
            "cannot invoke rpc",
        )
    )


class MilvusCollection:
    """A collection in Milvus; thread-safe (pymilvus clients are), opened without a network
    call (the daemon starts while Milvus is down), connected on first use."""

    backend = "milvus"

    def __init__(
        self, path: Path, config: IndexConfig, manifest: CollectionManifest, target: MilvusTarget
    ) -> None:
        self.path = path
        self.config = config
        self._manifest = manifest
        self.target = target
        self.milvus_collection = target.collection or milvus_name(manifest.name)
        self._full_text = bool(manifest.extra.get("full_text", False))
        self._client: Any = None
        self._ready = False  # the Milvus collection is checked and loaded
        self._link = threading.Lock()
        self._down_until = 0.0
        self._backoff = MIN_BACKOFF
        self._error: str | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def target_of(manifest: CollectionManifest) -> MilvusTarget | None:
        extra = manifest.extra
        if extra.get("backend", "local") != "milvus":
            return None
        return MilvusTarget(
            uri=str(extra["uri"]),
            token_file=extra.get("token_file"),
            collection=str(extra["milvus_collection"]),
            timeout=float(extra.get("timeout", 10.0)),
        )

    @classmethod
    def create(
        cls,
        path: Path,
        fingerprint: ModelFingerprint,
        config: IndexConfig,
        *,
        name: str,
        target: MilvusTarget,
    ) -> MilvusCollection:
        """Create (or attach to, when it exists with this model's fingerprint) the Milvus
        collection, then record it in ``path``'s manifest. Milvus must be reachable."""
        name = validate_collection_name(name)
        if path.exists():
            raise CollectionExists(f"collection {name!r} already exists", name=name)
        target = replace(target, collection=target.collection or milvus_name(name))
        if target.token_file is not None:
            target = replace(target, token_file=str(Path(target.token_file).absolute()))
        manifest = CollectionManifest(
            name=name,
            fingerprint=fingerprint,
            dim=fingerprint.vector_dims,
            m=config.m,
            ef_construction=config.ef_construction,
            created=time.time(),
            extra={
                "backend": "milvus",
                "uri": target.uri,
                "milvus_collection": target.collection,
                "token_file": target.token_file,
                "timeout": target.timeout,
            },
        )
        self = cls(path, config, manifest, target)
        try:
            self._call(self._create_remote, attach=False)
            self._call(lambda client: None)  # attach: checks the fingerprint of one made before
        except BaseException:
            self.close()
            raise
        manifest = replace(manifest, extra={**manifest.extra, "full_text": self._full_text})
        self._manifest = manifest
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.milvus.tmp"
        tmp.mkdir(exist_ok=True)
        manifest.save(tmp)
        try:
            tmp.rename(path)
        except OSError as exc:
            raise CollectionExists(f"collection {name!r} already exists", name=name) from exc
        return self

    @classmethod
    def open(
        cls, path: Path, config: IndexConfig, manifest: CollectionManifest
    ) -> MilvusCollection:
        target = cls.target_of(manifest)
        if target is None:
            raise InvalidArgument(f"collection {manifest.name!r} is not a Milvus collection")
        return cls(path, config, manifest, target)

    def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # closing a dead connection: nothing left to do
                log.debug("closing the Milvus client: %s", exc)

    def drop_remote(self) -> None:
        """Drop the Milvus collection (every agent sharing it loses it)."""
        self._call(lambda client: client.drop_collection(self.milvus_collection))

    # -- properties --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._manifest.name

    @property
    def fingerprint(self) -> ModelFingerprint:
        return self._manifest.fingerprint

    @property
    def dim(self) -> int:
        return self._manifest.dim

    @property
    def lsn(self) -> int:
        return 0  # Milvus keeps the log; there is no local sequence number

    @property
    def snapshot_error(self) -> str | None:
        return None

    @property
    def has_text(self) -> bool:
        """Whether keyword and hybrid search are possible (the server has BM25)."""
        return self._full_text

    @property
    def backend_error(self) -> str | None:
        """Why the last call failed to reach Milvus, until one succeeds."""
        return self._error

    def retry_due(self) -> bool:
        """Whether a probe would try the network now (the breaker's wait is over)."""
        return self._error is not None and time.monotonic() >= self._down_until

    def probe(self) -> bool:
        """One cheap call, to find out whether Milvus is back; True if it is."""
        try:
            self._call(
                lambda client: client.has_collection(
                    self.milvus_collection, timeout=self.target.timeout
                )
            )
        except EdgeAgentError:
            return False
        return True

    # -- the connection ----------------------------------------------------------------------

    def _connect(self) -> Any:
        pymilvus = _load_pymilvus()
        token = ""
        if self.target.token_file:
            try:
                token = Path(self.target.token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the Milvus token file {self.target.token_file}: {exc}"
                ) from exc
        return pymilvus.MilvusClient(uri=self.target.uri, token=token, timeout=self.target.timeout)

    def _call(self, fn: Callable[[Any], _T], *, attach: bool = True) -> _T:
        """``fn(client)`` with the connection set up (and, with ``attach``, the Milvus
        collection checked and loaded); connection failures become BackendUnavailable and
        open the breaker."""
        now = time.monotonic()
        if now < self._down_until:
            raise self._unavailable(self._error or "unreachable", self._down_until - now)
        try:
            with self._link:
                if self._client is None:
                    self._client = self._connect()
                client = self._client
                if attach and not self._ready:
                    self._attach(client)
            result = fn(client)
        except EdgeAgentError:
            raise
        except Exception as exc:
            # "from None": pymilvus raises its errors "from" themselves, a cause chain that
            # loops; the message keeps what it said.
            if not _is_connection_error(exc):
                raise EdgeAgentError(
                    f"Milvus refused a call on collection {self.name!r}: {_short(exc)}",
                    collection=self.name,
                ) from None
            self._reset()
            wait = self._backoff
            self._backoff = min(MAX_BACKOFF, self._backoff * 2)
            self._down_until = time.monotonic() + wait
            self._error = f"Milvus at {self.target.uri} unreachable: {_short(exc)}"
            log.warning("collection %r: %s; retrying in %.1fs", self.name, self._error, wait)
            raise self._unavailable(self._error, wait) from None
        if self._error is not None:
            log.info("collection %r: Milvus at %s is back", self.name, self.target.uri)
        self._error = None
        self._backoff = MIN_BACKOFF
        return result

    def _reset(self) -> None:
        """Forget the client after a connection failure: the next call connects afresh and
        checks (and loads) the collection again, as a restarted server needs. pymilvus'
        own recovery of a channel that failed several times could stay broken."""
        with self._link:
            client, self._client, self._ready = self._client, None, False
        if client is not None:
            try:
                client.close()
            except Exception as exc:
                log.debug("closing a failed Milvus client: %s", exc)

    def _unavailable(self, why: str, wait: float) -> BackendUnavailable:
        return BackendUnavailable(
            f"collection {self.name!r}: {why}; the daemon retries by itself, try again in"
            f" {wait:.1f}s",
            collection=self.name,
            retry_after_ms=max(1, round(wait * 1000)),
        )

    def _attach(self, client: Any) -> None:
        """Check the Milvus collection exists with our fingerprint, and load it."""
        timeout = self.target.timeout
        if not client.has_collection(self.milvus_collection, timeout=timeout):
            raise CollectionNotFound(
                f"collection {self.name!r}: the Milvus collection {self.milvus_collection!r}"
                f" is gone from {self.target.uri} (dropped elsewhere?)",
                collection=self.name,
            )
        described = client.describe_collection(self.milvus_collection, timeout=timeout)
        self._check_remote(described)
        client.load_collection(self.milvus_collection, timeout=timeout)
        self._ready = True

    def _check_remote(self, described: Mapping[str, Any]) -> None:
        raw = (described.get("properties") or {}).get(FINGERPRINT_PROPERTY)
        try:
            pinned = ModelFingerprint.from_json(json.loads(raw)) if raw else None
        except (ValueError, TypeError, EdgeAgentError):
            pinned = None
        if pinned is None:
            raise ModelMismatch(
                f"the Milvus collection {self.milvus_collection!r} carries no edge-agent model"
                f" fingerprint (property {FINGERPRINT_PROPERTY}): it was not made by"
                " edge-agent; pick another collection name",
                collection=self.name,
            )
        if pinned != self.fingerprint:
            raise ModelMismatch(
                f"the Milvus collection {self.milvus_collection!r} holds vectors of"
                f" {pinned.describe()}; this collection is pinned to"
                f" {self.fingerprint.describe()}"
                f" ({'; '.join(pinned.differences(self.fingerprint))})",
                collection=self.name,
            )
        fields = {f.get("name"): f for f in described.get("fields") or []}
        if not {"id", "vector", "text", "has_text", "meta"} <= fields.keys():
            raise ModelMismatch(
                f"the Milvus collection {self.milvus_collection!r} lacks edge-agent's fields",
                collection=self.name,
            )
        self._full_text = "sparse" in fields and any(
            "BM25" in str(getattr(f.get("type"), "name", f.get("type")))
            for f in described.get("functions") or []
        )

    def _create_remote(self, client: Any) -> None:
        """Make the Milvus collection, or accept an existing one pinned to our model."""
        timeout = self.target.timeout
        if client.has_collection(self.milvus_collection, timeout=timeout):
            self._ready = False
            return None  # _call's next use attaches (and checks) it
        pymilvus = _load_pymilvus()
        try:
            self._make_remote(client, pymilvus, full_text=True)
            self._full_text = True
        except Exception as exc:
            if _is_connection_error(exc):
                raise
            # A server without full-text search (Milvus before 2.5): dense search only.
            log.warning(
                "Milvus at %s refused a BM25 function (%s): collection %r gets dense search only",
                self.target.uri,
                _short(exc),
                self.name,
            )
            if client.has_collection(self.milvus_collection, timeout=timeout):
                client.drop_collection(self.milvus_collection, timeout=timeout)
            self._make_remote(client, pymilvus, full_text=False)
            self._full_text = False
        self._ready = False
        return None

    def _make_remote(self, client: Any, pymilvus: Any, *, full_text: bool) -> None:
        DataType = pymilvus.DataType
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(
            "id", DataType.VARCHAR, is_primary=True, max_length=self.config.max_id_bytes
        )
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field(
            "text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=full_text
        )
        schema.add_field("has_text", DataType.BOOL)
        schema.add_field("meta", DataType.JSON)
        index = client.prepare_index_params()
        index.add_index("vector", index_type="AUTOINDEX", metric_type="COSINE")
        if full_text:
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(
                pymilvus.Function(
                    name="text_bm25",
                    function_type=pymilvus.FunctionType.BM25,
                    input_field_names=["text"],
                    output_field_names=["sparse"],
                )
            )
            index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        client.create_collection(
            self.milvus_collection,
            schema=schema,
            index_params=index,
            consistency_level="Strong",
            properties={
                FINGERPRINT_PROPERTY: json.dumps(self.fingerprint.to_json(), sort_keys=True)
            },
            timeout=self.target.timeout,
        )

    # -- writes ------------------------------------------------------------------------------

    def _check_model(self, fingerprint: ModelFingerprint) -> None:
        if fingerprint != self.fingerprint:
            raise ModelMismatch(
                f"collection {self.name!r} holds vectors of {self.fingerprint.describe()}; got"
                f" {fingerprint.describe()}"
                f" ({'; '.join(fingerprint.differences(self.fingerprint))})",
                collection=self.name,
            )

    def add(
        self,
        fingerprint: ModelFingerprint,
        ids: Sequence[str],
        vectors: np.ndarray,
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> int:
        """Insert new documents (DocumentExists if an id is stored). The check and the insert
        are two calls: two agents adding one id at once may both succeed (the later wins)."""
        return self._put(fingerprint, ids, vectors, texts, metadata, replace=False)

    def upsert(
        self,
        fingerprint: ModelFingerprint,
        ids: Sequence[str],
        vectors: np.ndarray,
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> int:
        return self._put(fingerprint, ids, vectors, texts, metadata, replace=True)

    def _rows(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        texts: Sequence[str | None] | None,
        metadata: Sequence[Mapping[str, Any] | None] | None,
    ) -> list[dict[str, Any]]:
        config = self.config
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids:
            raise InvalidArgument("ids must be a non-empty list of strings")
        if len(ids) > config.max_batch:
            raise InvalidArgument(
                f"{len(ids)} documents in one write; the limit is {config.max_batch}",
                limit=config.max_batch,
            )
        checked = [validate_id(doc_id, config, f"ids[{i}]") for i, doc_id in enumerate(ids)]
        if len(set(checked)) != len(checked):
            raise InvalidArgument("ids repeat within one write")
        for label, values in (("texts", texts), ("metadata", metadata)):
            if values is not None and (
                isinstance(values, (str, bytes, Mapping))
                or not isinstance(values, Sequence)
                or len(values) != len(checked)
            ):
                raise InvalidArgument(f"{label} must be a list with one entry per id")
        rows = normalize_vectors(vectors, self.dim, len(checked))
        out = []
        for i, doc_id in enumerate(checked):
            text = validate_text(texts[i] if texts is not None else None, config, f"texts[{i}]")
            if text is not None and len(text.encode("utf-8")) > MAX_TEXT_BYTES:
                raise InvalidArgument(
                    f"texts[{i}] is {len(text.encode('utf-8'))} bytes; a Milvus collection"
                    f" stores at most {MAX_TEXT_BYTES}",
                    limit=MAX_TEXT_BYTES,
                )
            meta = validate_metadata(
                metadata[i] if metadata is not None else None, config, f"metadata[{i}]"
            )
            _json_metadata(meta, f"metadata[{i}]")
            out.append(
                {
                    "id": doc_id,
                    "vector": rows[i].tolist(),
                    "text": text or "",
                    "has_text": text is not None,
                    "meta": meta,
                }
            )
        return out

    def _put(
        self,
        fingerprint: ModelFingerprint,
        ids: Sequence[str],
        vectors: np.ndarray,
        texts: Sequence[str | None] | None,
        metadata: Sequence[Mapping[str, Any] | None] | None,
        *,
        replace: bool,
    ) -> int:
        self._check_model(fingerprint)
        rows = self._rows(ids, vectors, texts, metadata)
        timeout = self.target.timeout

        def write(client: Any) -> None:
            if not replace:
                present = self._present(client, [row["id"] for row in rows])
                if present:
                    existing = next(row["id"] for row in rows if row["id"] in present)
                    raise DocumentExists(
                        f"document {existing!r} is already in {self.name!r} (upsert replaces)",
                        id=existing,
                    )
            client.upsert(self.milvus_collection, rows, timeout=timeout)

        self._call(write)
        return self.lsn

    def _present(self, client: Any, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), _QUERY_BATCH):
            chunk = ids[start : start + _QUERY_BATCH]
            got = client.get(
                self.milvus_collection,
                ids=list(chunk),
                output_fields=["id"],
                timeout=self.target.timeout,
            )
            found.update(str(row["id"]) for row in got)
        return found

    def delete(self, ids: Sequence[str]) -> int:
        """Delete by id; how many were stored. Unknown ids are ignored."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidArgument("ids must be a list of strings")
        if len(ids) > self.config.max_batch:
            raise InvalidArgument(
                f"{len(ids)} ids in one delete; the limit is {self.config.max_batch}",
                limit=self.config.max_batch,
            )
        checked = list(
            dict.fromkeys(validate_id(d, self.config, f"ids[{i}]") for i, d in enumerate(ids))
        )
        if not checked:
            return 0

        def remove(client: Any) -> int:
            present = self._present(client, checked)
            if present:
                client.delete(
                    self.milvus_collection, ids=sorted(present), timeout=self.target.timeout
                )
            return len(present)

        return self._call(remove)

    def flush(self) -> None:
        """Seal what Milvus holds in memory into segments (not needed for durability)."""
        self._call(lambda client: client.flush(self.milvus_collection, timeout=self.target.timeout))

    # -- reads -------------------------------------------------------------------------------

    def count(self) -> int:
        rows = self._call(
            lambda client: client.query(
                self.milvus_collection,
                filter="",
                output_fields=["count(*)"],
                timeout=self.target.timeout,
            )
        )
        return int(rows[0]["count(*)"])

    def _fields(self, with_text: bool, with_vector: bool = False) -> list[str]:
        fields = ["id", "meta", "has_text"]
        if with_text:
            fields.append("text")
        if with_vector:
            fields.append("vector")
        return fields

    def get_many(self, ids: Sequence[str], *, with_vector: bool = False) -> list[Document | None]:
        """One Document (or None) per id, in order."""
        checked = [validate_id(d, self.config, f"ids[{i}]") for i, d in enumerate(ids)]

        def fetch(client: Any) -> dict[str, Any]:
            found: dict[str, Any] = {}
            unique = list(dict.fromkeys(checked))
            for start in range(0, len(unique), _QUERY_BATCH):
                got = client.get(
                    self.milvus_collection,
                    ids=unique[start : start + _QUERY_BATCH],
                    output_fields=self._fields(True, with_vector),
                    timeout=self.target.timeout,
                )
                found.update({str(row["id"]): row for row in got})
            return found

        found = self._call(fetch) if checked else {}
        return [self._document(found[d], with_vector) if d in found else None for d in checked]

    def get(self, doc_id: str, *, with_vector: bool = False) -> Document | None:
        return self.get_many([doc_id], with_vector=with_vector)[0]

    def _document(self, row: Mapping[str, Any], with_vector: bool) -> Document:
        vector = None
        if with_vector:
            vector = np.asarray(row["vector"], dtype=np.float32)
        text = row.get("text") if row.get("has_text") else None
        return Document(str(row["id"]), text, dict(row.get("meta") or {}), vector)

    def ids(self) -> list[str]:
        """Every id, in no particular order (one pass of a query iterator)."""

        def scan(client: Any) -> list[str]:
            out: list[str] = []
            iterator = client.query_iterator(
                self.milvus_collection,
                batch_size=_QUERY_BATCH,
                filter="",
                output_fields=["id"],
                timeout=self.target.timeout,
            )
            try:
                while batch := iterator.next():
                    out.extend(str(row["id"]) for row in batch)
            finally:
                iterator.close()
            return out

        return self._call(scan)

    def iter_documents(self, batch: int = 500) -> Iterator[list[Document]]:
        """Every document with its vector, in batches of sorted ids."""
        ids = sorted(self.ids())
        for start in range(0, len(ids), batch):
            docs = self.get_many(ids[start : start + batch], with_vector=True)
            yield [d for d in docs if d is not None]

    def stats(self) -> MilvusStats:
        return MilvusStats(
            name=self.name,
            count=self.count(),
            dim=self.dim,
            fingerprint=self.fingerprint.to_json(),
            backend="milvus",
            uri=self.target.uri,
            milvus_collection=self.milvus_collection,
            full_text=self._full_text,
            backend_error=self._error,
        )

    # -- search ------------------------------------------------------------------------------

    def search(
        self,
        fingerprint: ModelFingerprint,
        vector: np.ndarray,
        k: int = 10,
        *,
        where: Mapping[str, Any] | None = None,
        ef: int | None = None,
        with_text: bool = False,
        wait: bool = True,
    ) -> list[Hit] | None:
        """Top-k by cosine similarity (``ef`` is the HNSW search width, when the index has
        one). ``wait=False`` returns None: every call is a network round trip."""
        if not wait:
            return None
        self._check_model(fingerprint)
        _check_k(k)
        _check_ef(ef)
        query = normalize_vectors(vector, self.dim, 1, where="vector")[0]
        flt = compile_filter(where)
        params: dict[str, Any] = {"metric_type": "COSINE"}
        if ef is not None:
            params["params"] = {"ef": max(ef, k)}

        def run(client: Any, limit: int, expr: str) -> list[dict[str, Any]]:
            found = client.search(
                self.milvus_collection,
                data=[query.tolist()],
                anns_field="vector",
                limit=limit,
                filter=expr,
                search_params=params,
                output_fields=self._fields(with_text),
                timeout=self.target.timeout,
            )
            return list(found[0])

        return [
            Hit(
                str(row["id"]),
                float(row["distance"]),
                dict(row["entity"].get("meta") or {}),
                _text(row["entity"], with_text),
            )
            for row in self._filtered(run, k, flt)
        ]

    def _filtered(
        self,
        run: Callable[[Any, int, str], list[dict[str, Any]]],
        k: int,
        flt: Filter | None,
    ) -> list[dict[str, Any]]:
        """``run(client, limit, expression)``'s rows that pass ``flt`` exactly, best first:
        asks for more until k pass or Milvus returns fewer than asked (no more match)."""
        expr = expression(flt)
        limit = k

        def attempt(client: Any) -> list[dict[str, Any]]:
            nonlocal limit
            while True:
                rows = run(client, limit, expr)
                passed = [
                    row
                    for row in rows
                    if flt is None or flt.matches(row["entity"].get("meta") or {})
                ]
                if len(passed) >= k or len(rows) < limit or limit >= MAX_LIMIT:
                    return passed[:k]
                limit = min(MAX_LIMIT, limit * 4)

        return self._call(attempt)

    def _check_full_text(self) -> None:
        if not self._full_text:
            raise InvalidArgument(
                f"collection {self.name!r} is in a Milvus server without full-text (BM25)"
                ' search (Milvus 2.5 or newer has it): use mode "dense"',
                argument="mode",
                reason="backend_unsupported",
            )

    def search_keyword(
        self,
        text: str,
        k: int = 10,
        *,
        where: Mapping[str, Any] | None = None,
        with_text: bool = False,
    ) -> list[Hit]:
        """Top-k by Milvus' BM25 over the stored texts; score = BM25."""
        _check_k(k)
        self._check_full_text()
        flt = compile_filter(where)

        def run(client: Any, limit: int, expr: str) -> list[dict[str, Any]]:
            found = client.search(
                self.milvus_collection,
                data=[text],
                anns_field="sparse",
                limit=limit,
                filter=expr,
                search_params={"metric_type": "BM25"},
                output_fields=self._fields(with_text),
                timeout=self.target.timeout,
            )
            return list(found[0])

        hits = []
        for row in self._filtered(run, k, flt):
            score = abs(float(row["distance"]))  # Milvus Lite reports BM25 negated
            hits.append(
                Hit(
                    str(row["id"]),
                    score,
                    dict(row["entity"].get("meta") or {}),
                    _text(row["entity"], with_text),
                    keyword_score=score,
                )
            )
        hits.sort(key=lambda hit: -hit.score)
        return hits

    @staticmethod
    def hybrid_pool(k: int) -> int:
        return min(MAX_K, max(50, 4 * k))

    def search_hybrid(
        self,
        fingerprint: ModelFingerprint,
        vector: np.ndarray,
        text: str,
        k: int = 10,
        *,
        where: Mapping[str, Any] | None = None,
        ef: int | None = None,
        with_text: bool = False,
        fusion: str = DEFAULT_FUSION,
        weight: float | None = None,
        candidates: int | None = None,
        keyword_ranking: list[tuple[int, float]] | None = None,
        dense_ranking: list[tuple[int, float]] | None = None,
        wait: bool = True,
    ) -> list[Hit] | None:
        """Dense and BM25 rankings fused. ``rrf``: Milvus' own hybrid search with its
        RRFRanker(60) (one round trip; the hits carry no component scores). ``weighted``: the
        two rankings are fetched and fused here by fusion.fuse, because Milvus'
        WeightedRanker scales BM25 differently (arctan) and the weight must mean the same on
        every backend; the hits carry both component scores. ``keyword_ranking`` and
        ``dense_ranking`` (a local collection's precomputed sides) are ignored: Milvus ranks
        both sides itself. ``wait=False`` returns None: every call is a network round trip."""
        if not wait:
            return None
        self._check_model(fingerprint)
        _check_k(k)
        _check_ef(ef)
        self._check_full_text()
        if fusion not in FUSIONS:
            raise InvalidArgument(
                f"fusion must be one of {FUSIONS}, got {fusion!r:.40}", argument="fusion"
            )
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1
        ):
            raise InvalidArgument(
                f"weight must be in [0, 1], got {weight!r:.40}", argument="weight"
            )
        pool = candidates if candidates is not None else self.hybrid_pool(k)
        if isinstance(pool, bool) or not isinstance(pool, int) or not k <= pool <= MAX_K:
            raise InvalidArgument(
                f"candidates must be an integer in [k, {MAX_K}], got {pool!r:.40}",
                argument="candidates",
            )
        query = normalize_vectors(vector, self.dim, 1, where="vector")[0]
        flt = compile_filter(where)
        if fusion == "rrf":
            return self._hybrid_rrf(query, text, k, pool, flt, ef, with_text)
        dense = self.search(fingerprint, query, pool, where=where, ef=ef, with_text=with_text) or []
        keyword = self.search_keyword(text, pool, where=where, with_text=with_text)
        by_id = {hit.id: hit for hit in dense}
        by_id.update({hit.id: hit for hit in keyword if hit.id not in by_id})
        labels = {doc_id: i for i, doc_id in enumerate(by_id)}
        ids = list(by_id)
        missing = [hit.id for hit in keyword if hit.id not in {d.id for d in dense}]
        cosines: dict[int, float] = {}
        if missing:
            docs = self.get_many(missing, with_vector=True)
            for doc in docs:
                if doc is not None and doc.vector is not None:
                    cosines[labels[doc.id]] = float(doc.vector @ query)
        fused = fuse(
            [(labels[hit.id], hit.score) for hit in dense],
            [(labels[hit.id], hit.score) for hit in keyword],
            k,
            method="weighted",
            weight=DEFAULT_WEIGHT if weight is None else float(weight),
            cosines=cosines,
        )
        out = []
        for item in fused:
            base = by_id[ids[item.label]]
            out.append(
                Hit(
                    base.id,
                    item.score,
                    base.metadata,
                    base.text,
                    dense_score=item.dense,
                    keyword_score=item.keyword,
                )
            )
        return out

    def _hybrid_rrf(
        self,
        query: np.ndarray,
        text: str,
        k: int,
        pool: int,
        flt: Filter | None,
        ef: int | None,
        with_text: bool,
    ) -> list[Hit]:
        pymilvus = _load_pymilvus()
        dense_params: dict[str, Any] = {"metric_type": "COSINE"}
        if ef is not None:
            dense_params["params"] = {"ef": max(ef, pool)}

        def run(client: Any, limit: int, expr: str) -> list[dict[str, Any]]:
            each = max(pool, limit)
            requests = [
                pymilvus.AnnSearchRequest(
                    data=[query.tolist()],
                    anns_field="vector",
                    param=dense_params,
                    limit=each,
                    expr=expr or None,
                ),
                pymilvus.AnnSearchRequest(
                    data=[text],
                    anns_field="sparse",
                    param={"metric_type": "BM25"},
                    limit=each,
                    expr=expr or None,
                ),
            ]
            found = client.hybrid_search(
                self.milvus_collection,
                requests,
                pymilvus.RRFRanker(RRF_K),
                limit=limit,
                output_fields=self._fields(with_text),
                timeout=self.target.timeout,
            )
            return list(found[0])

        return [
            Hit(
                str(row["id"]),
                float(row["distance"]),
                dict(row["entity"].get("meta") or {}),
                _text(row["entity"], with_text),
            )
            for row in self._filtered(run, k, flt)
        ]


def _text(entity: Mapping[str, Any], with_text: bool) -> str | None:
    if not with_text or not entity.get("has_text"):
        return None
    text = entity.get("text")
    return None if text is None else str(text)


def _check_ef(ef: int | None) -> None:
    if ef is not None and (not isinstance(ef, int) or isinstance(ef, bool) or not 1 <= ef <= 65536):
        raise InvalidArgument(f"ef must be an integer in [1, 65536], got {ef!r}")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]
