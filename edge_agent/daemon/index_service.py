"""The index half of the service: collections behind RPC methods, one writer thread.

Part of the service layer (the only layer that crosses between asyncio and threads):

- every write (add, add_vectors, delete, create, drop) goes through ONE writer thread fed by a
  queue, so hnswlib never sees two inserts at once and the WAL has one appender. Writes that
  queue up while the previous one fsyncs are merged into one WAL record (group commit): with
  ``fsync="always"`` many small concurrent adds cost one fsync, not one each;
- reads (search, get, count) run on a small pool; each Collection's readers-writer lock keeps
  them off the graph while a write changes it;
- texts are embedded through ``Service.embed_vectors``, the same batcher clients use, so
  documents and queries from every connection share model batches.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import (
    CollectionNotFound,
    ConfigError,
    DimensionsNotSupported,
    EdgeAgentError,
    IndexCorrupt,
    InvalidArgument,
    ModelMismatch,
)
from ..index import IndexStore, ModelFingerprint
from ..index.documents import (
    Hit,
    check_vector_rows,
    validate_id,
    validate_metadata,
    validate_text,
)
from ..index.fsutil import DISK_FULL_ERRNOS, describe_error, index_full, is_disk_full
from ..index.manifest import CollectionManifest, validate_new_collection_name
from ..index.milvus_collection import MilvusCollection, MilvusTarget
from ..index.store import AnyCollection
from ..logs import kv
from ..protocol import (
    AddArgs,
    AddVectorsArgs,
    CollectionsArgs,
    CountArgs,
    DeleteArgs,
    EmbedArgs,
    GetArgs,
    SearchArgs,
    ShuttingDown,
    encode_vectors,
)
from .service import Reservoir, Service

__all__ = ["IndexService"]

log = logging.getLogger("edge_agent.index_service")


@dataclass
class _Put:
    collection: AnyCollection
    fingerprint: ModelFingerprint
    ids: list[str]
    vectors: np.ndarray
    texts: list[str | None] | None
    metadata: list[dict[str, Any] | None] | None
    replace: bool
    future: Future[int] = field(default_factory=Future)


@dataclass
class _Call:
    run: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)
    # Whether success proves the disk takes writes again (health): creating a collection
    # does, opening an existing one or renaming one away does not.
    writes_disk: bool = True


class _Writer:
    """One thread applies every write, in order; consecutive compatible puts become one."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self._queue: deque[_Put | _Call] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self.writes = 0  # index calls made
        self.jobs = 0  # requests served by them
        self.batch_docs = Reservoir(512)
        self._thread = threading.Thread(target=self._loop, name="edge-agent-index-writer")
        self._thread.daemon = True  # close() joins it; this only matters if close never runs
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, job: _Put | _Call) -> Future[Any]:
        with self._ready:
            if self._stopping:
                raise ShuttingDown("the daemon is shutting down")
            self._queue.append(job)
            self._ready.notify()
        return job.future

    def stop(self) -> None:
        """Finish everything queued, then end the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join()

    def _next_group(self) -> list[_Put | _Call] | None:
        with self._ready:
            while not self._queue:
                if self._stopping:
                    return None
                self._ready.wait()
            first = self._queue.popleft()
            group: list[_Put | _Call] = [first]
            if isinstance(first, _Put):
                ids = set(first.ids)
                total = len(first.ids)
                while self._queue:
                    nxt = self._queue[0]
                    if not (
                        isinstance(nxt, _Put)
                        and nxt.collection is first.collection
                        and nxt.replace == first.replace
                        and nxt.fingerprint == first.fingerprint
                        and total + len(nxt.ids) <= self.max_batch
                        and ids.isdisjoint(nxt.ids)
                    ):
                        break
                    self._queue.popleft()
                    group.append(nxt)
                    ids.update(nxt.ids)
                    total += len(nxt.ids)
            return group

    def _loop(self) -> None:
        while (group := self._next_group()) is not None:
            head = group[0]
            if isinstance(head, _Call):
                self._run(head.future, head.run)
            elif len(group) == 1:
                self._put([head])
            else:
                self._put(group)  # type: ignore[arg-type]

    def _run(self, future: Future[Any], run: Callable[[], Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        self.writes += 1
        self.jobs += 1
        try:
            future.set_result(run())
        except BaseException as exc:  # handed to the waiting request, never lost
            future.set_exception(exc)

    def _put(self, group: list[_Put]) -> None:
        live = [job for job in group if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        first = live[0]
        texts: list[str | None] | None = None
        metadata: list[dict[str, Any] | None] | None = None
        if any(job.texts is not None for job in live):
            texts = [t for job in live for t in (job.texts or [None] * len(job.ids))]
        if any(job.metadata is not None for job in live):
            metadata = [m for job in live for m in (job.metadata or [None] * len(job.ids))]
        ids = [doc_id for job in live for doc_id in job.ids]
        vectors = live[0].vectors if len(live) == 1 else np.concatenate([j.vectors for j in live])
        write = first.collection.upsert if first.replace else first.collection.add
        self.writes += 1
        self.jobs += len(live)
        self.batch_docs.add(len(ids))
        try:
            lsn = write(first.fingerprint, ids, vectors, texts, metadata)
        except EdgeAgentError as exc:
            if len(live) == 1:
                first.future.set_exception(exc)
                return
            # Writes are all-or-none, so nothing of the merged batch is stored: apply each
            # request alone, so only the one at fault sees the error.
            for job in live:
                self.writes += 1
                try:
                    (job.collection.upsert if job.replace else job.collection.add)(
                        job.fingerprint, job.ids, job.vectors, job.texts, job.metadata
                    )
                except BaseException as each:
                    job.future.set_exception(each)
                else:
                    job.future.set_result(job.collection.lsn)
            return
        except BaseException as exc:
            for job in live:
                job.future.set_exception(exc)
            return
        for job in live:
            job.future.set_result(lsn)


def _wire_hit(hit: Hit, explain: bool) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "id": hit.id,
        "score": hit.score,
        "metadata": hit.metadata,
        "text": hit.text,
    }
    if explain:
        wire["dense_score"] = hit.dense_score
        wire["keyword_score"] = hit.keyword_score
    return wire


class IndexService:
    """Registers add/add_vectors/search/get/delete/count/collections on a Service."""

    def __init__(self, store: IndexStore, service: Service, *, read_threads: int = 2) -> None:
        self.store = store
        self.service = service
        embedder = service.embedder
        manifest = embedder.manifest
        self._model = (manifest.name, manifest.files[embedder.quant].sha256)
        self._dims = manifest.dims
        self._pooling = manifest.pooling
        self._supported_dims = set(manifest.matryoshka_dims) | {manifest.dims}
        self._writer = _Writer(store.config.max_batch)
        self._readers = ThreadPoolExecutor(
            max_workers=read_threads, thread_name_prefix="edge-agent-index-read"
        )
        # Milvus collections: calls are network round trips that may stall until their
        # timeout, so they get threads of their own (a writer per collection, a shared pool
        # for reads): a slow Milvus never holds up the local collections.
        self._remote_writers: dict[str, _Writer] = {}
        self._remote = ThreadPoolExecutor(max_workers=8, thread_name_prefix="edge-agent-milvus")
        self._ids_cache: dict[str, tuple[float, list[str]]] = {}
        self._prober: asyncio.Future[None] | None = None
        if store.config.backend == "milvus" and not store.config.milvus_uri:
            raise ConfigError("index.backend = milvus needs index.milvus_uri")
        self._failed: dict[str, str] = {}  # collections that could not be opened, and why
        # Why the last write to disk failed (disk full, I/O error), until one succeeds: the
        # daemon's health is "degraded" meanwhile.
        self._write_error: str | None = None
        self._searching = 0  # searches running on the reader threads
        self._closed = False
        # Spellings of the index root that may appear in error messages, longest first.
        root = store.root
        self._roots = sorted(
            {str(root), str(root.absolute()), str(root.resolve())}, key=len, reverse=True
        )

    def methods(self) -> list[tuple[str, type[Any], Callable[[Any], Any]]]:
        """The wire methods this serves, (name, argument class, handler): the composition
        root (daemon/app.py) registers them with the Service."""
        return [
            (name, args_type, self._guard(name, handler))
            for name, args_type, handler in (
                ("add", AddArgs, self._add),
                ("add_vectors", AddVectorsArgs, self._add_vectors),
                ("search", SearchArgs, self._search),
                ("get", GetArgs, self._get),
                ("delete", DeleteArgs, self._delete),
                ("count", CountArgs, self._count),
                ("collections", CollectionsArgs, self._collections),
            )
        ]

    def health(self) -> dict[str, Any]:
        """The ``index`` section of ``health``."""
        return self._health()

    def stats(self) -> dict[str, Any]:
        """The ``index`` section of ``stats``."""
        return self._stats()

    # -- lifecycle --------------------------------------------------------------------------------

    def fingerprint(self, dimensions: int | None = None) -> ModelFingerprint:
        """What vectors embedded now are: this model file, with ``dimensions`` if given."""
        if dimensions == self._dims:
            dimensions = None
        return ModelFingerprint(
            self._model[0], self._model[1], self._dims, self._pooling, dimensions
        )

    def open_all(self) -> None:
        """Open (and recover) every collection now, so start-up finds damage, not a request.

        A collection that cannot be opened is reported by health and refuses calls with the
        repair command; the others serve.
        """
        for name in self.store.names():
            started = time.perf_counter()
            try:
                collection = self.store.open(name)
            except EdgeAgentError as exc:
                self._failed[name] = exc.message
                log.error(
                    "%s",
                    kv(event="collection_unavailable", collection=name, error=exc.message),
                )
                continue
            log.info(
                "%s",
                kv(
                    event="collection_opened",
                    collection=name,
                    # A Milvus collection opens without a network call (its server may be
                    # away at start: calls then get BACKEND_UNAVAILABLE, and it recovers).
                    count=None if isinstance(collection, MilvusCollection) else collection.count(),
                    ms=(time.perf_counter() - started) * 1000,
                ),
            )

    async def start(self) -> None:
        await asyncio.to_thread(self.open_all)
        self._prober = asyncio.ensure_future(self._probe_loop())

    async def _probe_loop(self, interval: float = 1.0) -> None:
        """Tries each Milvus collection whose server was unreachable, once its back-off is
        over, so health turns ok again without waiting for a request."""
        while not self._closed:
            await asyncio.sleep(interval)
            for name in self.store.open_names():
                collection = self.store.opened(name)
                if isinstance(collection, MilvusCollection) and collection.retry_due():
                    with contextlib.suppress(Exception):
                        await self._read_on(collection, collection.probe)

    def close(self) -> None:
        """Apply every queued write, then close the collections (snapshot on close).

        Never raises: the daemon is stopping either way, and every acknowledged write is in
        a WAL already. A snapshot that cannot be written (disk full) is one log line from the
        collection; anything worse is logged here."""
        if self._closed:
            return
        self._closed = True
        if self._prober is not None:
            self._prober.cancel()
        self._writer.stop()
        for writer in list(self._remote_writers.values()):
            writer.stop()
        self._readers.shutdown(wait=True)
        self._remote.shutdown(wait=True)
        try:
            self.store.close()
        except Exception as exc:
            log.error(
                "%s",
                kv(event="index_close_failed", error=describe_error(exc)),
                exc_info=not isinstance(exc, (EdgeAgentError, OSError)),
            )

    # -- helpers ----------------------------------------------------------------------------------

    async def _read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, lambda: fn(*args, **kwargs))

    async def _read_on(
        self, collection: AnyCollection | None, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """``fn`` on the threads that serve ``collection``'s backend (None: Milvus')."""
        if collection is not None and not isinstance(collection, MilvusCollection):
            return await self._read(fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._remote, lambda: fn(*args, **kwargs))

    def _writer_of(self, collection: AnyCollection | None) -> _Writer:
        if not isinstance(collection, MilvusCollection):
            return self._writer
        writer = self._remote_writers.get(collection.name)
        if writer is None:
            writer = self._remote_writers[collection.name] = _Writer(self.store.config.max_batch)
        return writer

    async def _write(self, job: _Put | _Call, on: AnyCollection | None = None) -> Any:
        if self._closed:
            raise ShuttingDown("the daemon is shutting down")
        writer = self._writer_of(job.collection if isinstance(job, _Put) else on)
        try:
            result = await asyncio.wrap_future(writer.submit(job))
        except Exception as exc:
            # A full disk, or an I/O error writing (the WAL's untyped error); not e.g. a
            # CollectionExists whose cause is the OSError of a lost rename race.
            if is_disk_full(exc) or (
                type(exc) is EdgeAgentError and isinstance(exc.__cause__, OSError)
            ):
                self._write_error = self._scrub(describe_error(exc))
            raise
        if isinstance(job, _Put) or job.writes_disk:
            self._write_error = None
        return result

    # -- what clients may see ---------------------------------------------------------------------

    def _guard(
        self, method: str, handler: Callable[[Any], Awaitable[dict[str, Any]]]
    ) -> Callable[[Any], Awaitable[dict[str, Any]]]:
        """``handler`` with its errors made fit for any client, remote ones included: a full
        disk met anywhere is INDEX_FULL, and no message or data names a server path (the
        daemon's log keeps the full message)."""

        async def guarded(args: Any) -> dict[str, Any]:
            try:
                return await handler(args)
            except EdgeAgentError as exc:
                self._redact(exc, method)
                raise
            except OSError as exc:
                if exc.errno not in DISK_FULL_ERRNOS:
                    raise  # a bug or a broken disk: INTERNAL, with the traceback in the log
                log.error("%s", kv(event="index_disk_full", method=method, error=str(exc)))
                self._write_error = describe_error(exc)
                raise index_full(exc, f"complete {method}") from exc

        return guarded

    def _scrub(self, text: str) -> str:
        """``text`` with the index root cut off paths under it ("notes/wal-...log", which is
        also what `edge-agent index check` takes) and named, not spelled, elsewhere."""
        for root in self._roots:
            text = text.replace(root + os.sep, "").replace(root, "the index directory")
        return text

    def _scrub_data(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._scrub(value)
        if isinstance(value, dict):
            return {key: self._scrub_data(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._scrub_data(item) for item in value]
        return value

    def _redact(self, exc: EdgeAgentError, method: str) -> None:
        """Rewrite ``exc`` in place (it may be shared by merged writes: this is idempotent)."""
        message, data = self._scrub(exc.message), self._scrub_data(exc.data)
        if message == exc.message and data == exc.data:
            return
        log.info(
            "%s",
            kv(event="index_error", method=method, code=exc.code.name, detail=exc.message),
        )
        exc.message, exc.data, exc.args = message, data, (message,)

    def _open(self, name: str) -> AnyCollection:
        if name in self._failed:
            raise IndexCorrupt(
                f"collection {name!r} could not be opened: {self._failed[name]}; run"
                f" `edge-agent index check {name}` and `edge-agent index repair {name}`",
                collection=name,
            )
        return self.store.open(name)

    async def _collection(self, name: str, *, create_for: int | None = None) -> AnyCollection:
        """The open collection; with ``create_for`` (vector dims), create it when missing."""
        if name not in self._failed:
            collection = self.store.opened(name)
            if collection is not None:  # the usual case: no thread hop to find it
                return collection
        try:
            return await self._read(self._open, name)
        except CollectionNotFound:
            if create_for is None:
                raise
        validate_new_collection_name(name)
        fingerprint = self.fingerprint()
        if create_for != fingerprint.vector_dims:
            raise InvalidArgument(
                f"vectors have {create_for} dims; a new collection holds this daemon's model's"
                f" {fingerprint.vector_dims}-d vectors (create it with collections first for a"
                " Matryoshka size)",
                argument="vectors",
            )
        return await self._write(_Call(self._creator(name, fingerprint)))

    def _default_milvus(self) -> MilvusTarget | None:
        """Where new collections go when the request does not say (index.backend)."""
        config = self.store.config
        if config.backend != "milvus" or config.milvus_uri is None:
            return None
        uri, token_file = config.milvus_uri, config.milvus_token_file
        return MilvusTarget(uri, token_file, None, config.milvus_timeout)

    def _creator(self, name: str, fingerprint: ModelFingerprint) -> Callable[[], AnyCollection]:
        """The writer's job that opens ``name`` or creates it in the default backend."""
        return lambda: self.store.get_or_create(name, fingerprint, self._default_milvus())

    def _check_model(self, collection: AnyCollection) -> ModelFingerprint:
        """The fingerprint to embed this collection's texts with, or ModelMismatch."""
        pinned = collection.fingerprint
        ours = self.fingerprint(pinned.dimensions)
        if ours != pinned:
            raise ModelMismatch(
                f"collection {collection.name!r} holds vectors of {pinned.describe()}; this"
                f" daemon embeds with {ours.describe()} ({'; '.join(ours.differences(pinned))})."
                " Serve that model file (--quant) or re-embed the collection",
                collection=collection.name,
            )
        return ours

    @staticmethod
    def _info(collection: AnyCollection) -> dict[str, Any]:
        """Blocks (a Milvus collection counts over the network): call it on a thread."""
        info = {
            "name": collection.name,
            "count": collection.count(),
            "dims": collection.dim,
            "fingerprint": collection.fingerprint.to_json(),
            "backend": "local",
        }
        if isinstance(collection, MilvusCollection):
            info.update(
                backend="milvus",
                uri=collection.target.uri,
                milvus_collection=collection.milvus_collection,
                full_text=collection.has_text,
            )
        return info

    # -- methods ----------------------------------------------------------------------------------

    def _validate_docs(
        self,
        ids: list[str],
        texts: list[str | None] | None,
        metadata: list[dict[str, Any] | None] | None,
    ) -> None:
        """The index's own checks, before any embedding or collection creation: bad input
        costs no model time and leaves nothing behind."""
        config = self.store.config
        if len(ids) > config.max_batch:
            raise InvalidArgument(
                f"{len(ids)} documents in one write; the limit is {config.max_batch}",
                limit=config.max_batch,
            )
        for index, doc_id in enumerate(ids):
            validate_id(doc_id, config, f"ids[{index}]")
        if len(set(ids)) != len(ids):
            raise InvalidArgument("ids repeat within one write")
        for index, text in enumerate(texts or ()):
            validate_text(text, config, f"texts[{index}]")
        for index, meta in enumerate(metadata or ()):
            validate_metadata(meta, config, f"metadata[{index}]")

    async def _add(self, args: AddArgs) -> dict[str, Any]:
        self._validate_docs(
            [doc.id for doc in args.docs],
            [doc.text for doc in args.docs] if args.store_text else None,
            [doc.metadata for doc in args.docs],
        )
        try:
            collection: AnyCollection | None = await self._read(self._open, args.collection)
        except CollectionNotFound:
            if not args.create:
                raise
            validate_new_collection_name(args.collection)  # before any model time is spent
            collection = None  # made after the texts embed, so bad input leaves nothing behind
        fingerprint = self.fingerprint() if collection is None else self._check_model(collection)
        texts = [doc.text for doc in args.docs]
        vectors, embedded = await self.service.embed_vectors(
            EmbedArgs(
                texts,
                kind="document",
                dimensions=fingerprint.dimensions,
                long_text=args.long_text,
            )
        )
        if collection is None:
            collection = await self._write(_Call(self._creator(args.collection, fingerprint)))
            fingerprint = self._check_model(collection)  # another request may have made it
        lsn = await self._write(
            _Put(
                collection,
                fingerprint,
                [doc.id for doc in args.docs],
                vectors,
                list[str | None](texts) if args.store_text else None,
                [doc.metadata for doc in args.docs],
                replace=args.if_exists == "replace",
            )
        )
        return {
            "collection": collection.name,
            "added": len(args.docs),
            "lsn": lsn,
            "truncated": [i for i, t in enumerate(embedded.truncated) if t],
            "tokens": int(sum(embedded.token_counts)),
        }

    async def _add_vectors(self, args: AddVectorsArgs) -> dict[str, Any]:
        self._validate_docs(args.ids, args.texts, args.metadata)
        # A row that cannot be normalised (all zero) is refused here, naming it: before a
        # collection is created for it, and alone, not after merging with others' writes.
        check_vector_rows(args.vectors)
        collection = await self._collection(
            args.collection, create_for=args.vectors.shape[1] if args.create else None
        )
        if args.vectors.shape[1] != collection.dim:
            raise InvalidArgument(
                f"vectors have {args.vectors.shape[1]} dims; collection {collection.name!r}"
                f" holds {collection.dim}-d vectors",
                argument="vectors",
            )
        lsn = await self._write(
            _Put(
                collection,
                collection.fingerprint,  # the caller vouches the vectors come from its model
                args.ids,
                args.vectors,
                args.texts,
                args.metadata,
                replace=args.if_exists == "replace",
            )
        )
        return {"collection": collection.name, "added": len(args.ids), "lsn": lsn}

    async def _search(self, args: SearchArgs) -> dict[str, Any]:
        collection = await self._collection(args.collection)
        started = time.perf_counter()
        mode = args.mode
        if mode is None:  # the default: words and meaning where the collection has words
            mode = "hybrid" if args.text is not None and collection.has_text else "dense"
        fingerprint = collection.fingerprint
        query: np.ndarray | None = args.vector
        embed_ms = 0.0
        keyword_side: asyncio.Future[list[tuple[int, float]]] | None = None
        local = not isinstance(collection, MilvusCollection)
        if local and mode == "hybrid" and query is None and 1 <= args.k <= 10_000:
            # The words need no embedding: rank them on a reader thread while the engine
            # embeds the query, so hybrid costs about max(embed, keyword), not their sum.
            assert args.text is not None and not isinstance(collection, MilvusCollection)
            keyword_side = asyncio.ensure_future(
                self._read(
                    functools.partial(
                        collection.keyword_candidates,
                        args.text,
                        collection.hybrid_pool(args.k),
                        where=args.filter,
                    )
                )
            )
        if mode != "keyword" and query is None:
            try:
                fingerprint = self._check_model(collection)
                assert args.text is not None  # SearchArgs guarantees text or vector
                vectors, _ = await self.service.embed_vectors(
                    EmbedArgs(
                        [args.text],
                        kind="query",
                        instruction=args.instruction,
                        dimensions=fingerprint.dimensions,
                    )
                )
            except BaseException:
                if keyword_side is not None:
                    keyword_side.cancel()
                    with contextlib.suppress(BaseException):
                        await keyword_side
                raise
            query = vectors[0]
            embed_ms = (time.perf_counter() - started) * 1000
        if query is not None and query.shape[0] != collection.dim:
            raise InvalidArgument(
                f"the query vector has {query.shape[0]} dims; collection {collection.name!r}"
                f" holds {collection.dim}-d vectors",
                argument="vector",
            )
        searched = time.perf_counter()
        if mode == "keyword":
            assert args.text is not None
            hits = await self._read_on(
                collection,
                functools.partial(
                    collection.search_keyword,
                    args.text,
                    args.k,
                    where=args.filter,
                    with_text=args.include_text,
                )
            )
        elif mode == "hybrid":
            assert args.text is not None and query is not None
            hybrid = functools.partial(
                collection.search_hybrid,
                fingerprint,
                query,
                args.text,
                args.k,
                where=args.filter,
                ef=args.ef,
                with_text=args.include_text,
                fusion=args.fusion,
                weight=args.weight,
                keyword_ranking=None if keyword_side is None else await keyword_side,
            )
            # As for dense below: with the words ranked already, the fusion is about a
            # millisecond, so it runs on the loop when it is alone and the index is free.
            fused = (
                hybrid(wait=False)
                if local and keyword_side is not None and not self._searching
                else None
            )
            if fused is None:
                self._searching += 1
                try:
                    fused = await self._read_on(collection, hybrid)
                finally:
                    self._searching -= 1
            hits = fused
        else:
            assert query is not None
            search = functools.partial(
                collection.search,
                fingerprint,
                query,
                args.k,
                where=args.filter,
                ef=args.ef,
                with_text=args.include_text,
            )
            # Alone: search on the loop if the index is free right now (a graph search is
            # under a millisecond), saving two thread hand-offs. Concurrent searches, or one
            # that would wait for a write, go to the reader threads.
            found = None if self._searching else search(wait=False)
            if found is None:
                self._searching += 1
                try:
                    found = await self._read_on(collection, search)
                finally:
                    self._searching -= 1
            hits = found
        return {
            "collection": collection.name,
            "mode": mode,
            "hits": [_wire_hit(hit, args.explain) for hit in hits],
            "timing_ms": {
                "embed": round(embed_ms, 3),
                "search": round((time.perf_counter() - searched) * 1000, 3),
            },
        }

    async def _get(self, args: GetArgs) -> dict[str, Any]:
        collection = await self._collection(args.collection)

        def fetch() -> list[Any]:
            if isinstance(collection, MilvusCollection):
                return collection.get_many(args.ids, with_vector=args.with_vectors)
            return [collection.get(doc_id, with_vector=args.with_vectors) for doc_id in args.ids]

        docs = await self._read_on(collection, fetch)
        result: dict[str, Any] = {
            "collection": collection.name,
            "documents": [
                None if d is None else {"id": d.id, "text": d.text, "metadata": d.metadata}
                for d in docs
            ],
        }
        if args.with_vectors:
            found = [d.vector for d in docs if d is not None]
            matrix = np.stack(found) if found else np.empty((0, collection.dim), np.float32)
            result.update(encode_vectors(matrix))
        return result

    async def _delete(self, args: DeleteArgs) -> dict[str, Any]:
        collection = await self._collection(args.collection)
        deleted = await self._write(_Call(lambda: collection.delete(args.ids)), on=collection)
        return {"collection": collection.name, "deleted": deleted}

    async def _count(self, args: CountArgs) -> dict[str, Any]:
        collection = await self._collection(args.collection)
        count = await self._read_on(collection, collection.count)
        return {"collection": collection.name, "count": count}

    async def _collections(self, args: CollectionsArgs) -> dict[str, Any]:
        if args.action == "list":
            return {"collections": await self._read(self._list)}
        assert args.name is not None  # CollectionsArgs requires a name for other actions
        name = args.name
        if args.action == "create":
            dims = args.dimensions
            if dims is not None and dims not in self._supported_dims:
                raise DimensionsNotSupported(
                    f"model {self._model[0]!r} cannot give {dims} dimensions (supported:"
                    f" {sorted(self._supported_dims)})",
                    allowed=sorted(self._supported_dims),
                )
            validate_new_collection_name(name)
            fingerprint = self.fingerprint(dims)
            milvus = self._target_of(args)
            created: AnyCollection
            if milvus is None:
                created = await self._write(_Call(lambda: self.store.create(name, fingerprint)))
            else:
                # Milvus' round trips stay off the local writer (a slow server would hold up
                # every local write); the store's lock still makes the name's creation atomic.
                created = await self._read_on(
                    None, lambda: self.store.create(name, fingerprint, milvus)
                )
            log.info(
                "%s",
                kv(event="collection_created", collection=name, backend=args.backend or "default"),
            )
            return dict(await self._read_on(created, self._info, created))
        if args.action == "drop":
            if isinstance(self.store.opened(name), MilvusCollection) or self._is_milvus(name):
                await self._read_on(None, lambda: self.store.drop(name))
                stale = self._remote_writers.pop(name, None)
                if stale is not None:
                    await asyncio.to_thread(stale.stop)
            else:
                await self._write(_Call(lambda: self.store.drop(name), writes_disk=False))
            self._failed.pop(name, None)
            log.info("%s", kv(event="collection_dropped", collection=name))
            return {"dropped": name}
        collection = await self._collection(name)
        if args.action == "ids":
            return dict(await self._read_on(collection, self._ids_page, collection, args))
        stats = await self._read_on(collection, collection.stats)
        info = await self._read_on(collection, self._info, collection)
        return {**info, "stats": self._scrub_data(dataclasses.asdict(stats))}

    def _is_milvus(self, name: str) -> bool:
        try:
            manifest = CollectionManifest.load(self.store.path_of(name))
        except EdgeAgentError:
            return False
        return MilvusCollection.target_of(manifest) is not None

    def _target_of(self, args: CollectionsArgs) -> MilvusTarget | None:
        """Where ``collections create`` puts the collection: the request's backend, else the
        daemon's default (index.backend); a request's milvus without uri takes the
        daemon's index.milvus_uri (and its token file)."""
        config = self.store.config
        if (args.backend or config.backend) != "milvus":
            return None
        uri = args.uri or config.milvus_uri
        if uri is None:
            raise InvalidArgument(
                "backend milvus needs uri (or the daemon's index.milvus_uri setting)",
                argument="uri",
            )
        token_file = args.token_file
        if token_file is None and uri == config.milvus_uri:
            token_file = config.milvus_token_file
        return MilvusTarget(uri, token_file, None, config.milvus_timeout)

    def _ids_page(self, collection: AnyCollection, args: CollectionsArgs) -> dict[str, Any]:
        """One page of the collection's ids in sorted order, after ``args.after``: what
        `collections copy` and `export` walk. The sorted list is kept for a minute between
        pages (listing a Milvus collection's ids per page would be quadratic)."""
        cached = self._ids_cache.get(collection.name)
        now = time.monotonic()
        if args.after is None or cached is None or now - cached[0] > 60:
            cached = (now, sorted(collection.ids()))
            self._ids_cache[collection.name] = cached
        ids = cached[1]
        start = 0 if args.after is None else bisect.bisect_right(ids, args.after)
        page = ids[start : start + args.limit]
        more = start + args.limit < len(ids)
        return {
            "collection": collection.name,
            "ids": page,
            "next": page[-1] if more and page else None,
            "total": len(ids),
        }

    def _list(self) -> list[dict[str, Any]]:
        listed = []
        for name in self.store.names():
            if name in self._failed:
                error = self._scrub(self._failed[name])
                listed.append({"name": name, "state": "unavailable", "error": error})
                continue
            try:
                listed.append({**self._info(self.store.open(name)), "state": "ok"})
            except EdgeAgentError as exc:
                error = self._scrub(exc.message)
                listed.append({"name": name, "state": "unavailable", "error": error})
        return listed

    # -- health and stats -------------------------------------------------------------------------

    def _health(self) -> dict[str, Any]:
        """Degraded while a collection cannot be opened, the last write to disk failed, or a
        collection's snapshots fail (the WAL then grows without bound); ok again once writes
        and snapshots succeed. ``reason`` says why in one line."""
        snapshot_errors = {}
        for name in sorted(self.store.open_names()):
            collection = self.store.opened(name)
            error = collection.snapshot_error if collection is not None else None
            if error is not None:
                snapshot_errors[name] = self._scrub(error)
        reasons = [f"collection {name!r} cannot be opened" for name in sorted(self._failed)]
        backend_errors = {}
        for name in sorted(self.store.open_names()):
            collection = self.store.opened(name)
            if isinstance(collection, MilvusCollection) and collection.backend_error:
                backend_errors[name] = collection.backend_error
        reasons += [f"collection {name!r}: {e}" for name, e in backend_errors.items()]
        if self._write_error is not None:
            reasons.append(f"writes fail: {self._write_error}")
        reasons += [f"snapshots of {name!r} fail: {e}" for name, e in snapshot_errors.items()]
        health: dict[str, Any] = {
            "status": "degraded" if reasons else "ok",
            "collections": len(self.store.names()),
            "unavailable": {name: self._scrub(e) for name, e in self._failed.items()},
            "write_error": self._write_error,
            "snapshot_errors": snapshot_errors,
            "backend_errors": backend_errors,
            "write_queue": self._writer.depth,
        }
        if reasons:
            health["reason"] = "; ".join(reasons)
        return health

    def _stats(self) -> dict[str, Any]:
        return {
            "write_queue": self._writer.depth,
            "writes": self._writer.writes,
            "write_requests": self._writer.jobs,
            "docs_per_write": self._writer.batch_docs.percentiles(),
        }
