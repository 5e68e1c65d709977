"""The service: the RPC methods, independent of any transport, and the embed batcher.

This is the only layer that crosses between asyncio and threads/processes. The event loop
never blocks on the model: embed requests are queued, coalesced into one engine call per window
(requests with the same options share a call), and that call runs in the engine's child process
(or on the in-process Embedder's model thread) while the loop waits on a future. Transports
(the Unix socket, TCP) call ``Service.submit(method, params)`` and only move bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._version import __version__
from ..embedding.embedder import Embedder, Embeddings
from ..embedding.worker import ProcessEmbedder
from ..embedding.workload import DeadlinePolicy, WorkModel
from ..errors import (
    DimensionsNotSupported,
    EdgeAgentError,
    EngineError,
    EngineUnresponsive,
    InvalidArgument,
    TextTooLong,
)
from ..logs import kv
from ..options import ServiceConfig
from ..protocol import (
    KINDS,
    LONG_TEXT_MODES,
    PROTOCOL_VERSION,
    EmbedArgs,
    HelloArgs,
    NoArgs,
    Overloaded,
    ShuttingDown,
    UnknownMethod,
    encode_embed_result,
    named_args,
)

__all__ = ["Reservoir", "Service", "server_version"]

log = logging.getLogger("edge_agent.service")

# After the query lane failed to open or broke, queries wait for the engine this long before
# another lane is tried (a box short of memory does not retry on every query).
_LANE_PAUSE_S = 60.0
# Engine time of one slice of document work while queries can use a lane: large enough for
# batches to run at full speed (a 265-token document takes ~150 ms alone, 75 ms per text in a
# batch of 16, 70 ms in a batch of 64, here; 1 s slices measured 0.89-0.9x the throughput of
# whole 64-document requests), small enough that the first query of a bulk add, which waits
# for the lane to start, waits about this long at most.
_LANE_SLICE_S = 2.0

Handler = Callable[[Any], Any]  # -> coroutine, future or value


def server_version() -> str:
    # pyproject.toml reads the version from _version.py, so the installed distribution and a
    # source tree agree; importlib.metadata (~1.4 MB of RSS with email/zipfile/csv) is not
    # needed to ask.
    return __version__


class Reservoir:
    """A uniform sample of at most ``size`` values (Vitter's algorithm R): bounded memory
    however long the daemon runs, unbiased percentiles."""

    def __init__(self, size: int = 1024, seed: int = 0) -> None:
        self.size = size
        self.count = 0
        self.values: list[float] = []
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.count += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            slot = self._rng.randrange(self.count)
            if slot < self.size:
                self.values[slot] = value

    def percentiles(self) -> dict[str, float]:
        ordered = sorted(self.values)
        out = {}
        for name, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
            if not ordered:
                out[name] = 0.0
                continue
            rank = max(1, math.ceil(fraction * len(ordered)))  # nearest-rank percentile
            out[name] = round(ordered[min(rank, len(ordered)) - 1], 3)
        return out


@dataclass
class _MethodStats:
    count: int = 0
    errors: int = 0
    latency_ms: Reservoir = field(default_factory=Reservoir)


@dataclass
class _Job:
    """One embed request; the batcher sends its texts to the engine in one or more slices."""

    args: EmbedArgs
    future: asyncio.Future[Embeddings]
    enqueued: float
    tokens: list[int]  # estimated engine tokens of each text
    sent: int = 0  # texts handed to the engine so far
    parts: list[Embeddings] = field(default_factory=list)
    alone: bool = False  # rerun by itself after its coalesced batch hit an input error
    stall_retried: bool = False  # one of its slices already met an unresponsive engine

    @property
    def urgent(self) -> bool:
        # Queries are what a person waits for; documents are what an indexer streams.
        return self.args.kind == "query"


@dataclass(frozen=True)
class _Slice:
    job: _Job
    start: int
    end: int


def _join(parts: list[Embeddings]) -> Embeddings:
    if len(parts) == 1:
        return parts[0]
    return Embeddings(
        np.concatenate([p.vectors for p in parts]),
        [n for p in parts for n in p.token_counts],
        [t for p in parts for t in p.truncated],
        [c for p in parts for c in p.chunks],
        parts[0].model,
        parts[0].quant,
    )


def _rows(result: Embeddings, start: int, end: int) -> Embeddings:
    return Embeddings(
        result.vectors[start:end],
        result.token_counts[start:end],
        result.truncated[start:end],
        result.chunks[start:end],
        result.model,
        result.quant,
    )


def _shift_index(exc: EdgeAgentError, offset: int) -> EdgeAgentError:
    """An input error found in a slice that starts at text ``offset`` of its request: the
    same error, with the index (and the ``texts[i]`` in the message) counted in the request."""
    index = exc.data.get("index")
    if offset == 0 or not isinstance(index, int):
        return exc
    message = exc.message.replace(f"texts[{index}]", f"texts[{index + offset}]", 1)
    shifted = type(exc)(message, **{**exc.data, "index": index + offset})
    shifted.__cause__ = exc
    return shifted


class Service:
    """Owns the Embedder (closing the service closes it) and answers every RPC method."""

    def __init__(
        self,
        embedder: Embedder | ProcessEmbedder,
        config: ServiceConfig | None = None,
        query_lane: Callable[[], ProcessEmbedder] | None = None,
    ) -> None:
        """``query_lane``: opens a second engine (one thread, same model) for queries that
        arrive while ``embedder`` runs document work; called on a worker thread, on demand
        (None, or ServiceConfig.query_lane off: every call goes to ``embedder``)."""
        self.embedder = embedder
        self.config = config or ServiceConfig()
        # Limits and counters a transport reports through hello / health / stats.
        self.transport_limits: dict[str, Any] = {}
        self.transport_stats: Callable[[], dict[str, Any]] = dict
        # Fields the daemon adds to hello (e.g. its stable agent_id, as discovery announces it).
        self.identity: dict[str, Any] = {}
        # Sections other layers (the index) add to health and stats: name -> () -> map.
        self.health_sections: dict[str, Callable[[], dict[str, Any]]] = {}
        self.stats_sections: dict[str, Callable[[], dict[str, Any]]] = {}
        self._started_at = time.monotonic()
        self._methods: dict[str, tuple[type[Any], Handler]] = {}
        self._stats: dict[str, _MethodStats] = {}
        self._urgent: deque[_Job] = deque()  # query-kind requests: go first
        self._bulk: deque[_Job] = deque()  # everything else, in slices
        self._urgent_streak = 0  # query calls run in a row while document work waited
        self._queued_texts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine_call: asyncio.Future[Any] | None = None  # the batch (or ping) in the engine
        self._window_timer: asyncio.TimerHandle | None = None
        self._liveness_timer: asyncio.TimerHandle | None = None
        self._last_engine_activity = time.monotonic()
        self._last_batch_requests = 0
        self._main_bulk = False  # the batch in the engine is document work
        self._lane_factory = query_lane if self.config.query_lane else None
        self._lane: ProcessEmbedder | None = None
        self._lane_call: asyncio.Future[Any] | None = None  # the batch in the query lane
        self._lane_opening: asyncio.Future[ProcessEmbedder] | None = None
        self._lane_closing: set[asyncio.Future[Any]] = set()
        self._lane_timer: asyncio.TimerHandle | None = None
        self._lane_paused_until = 0.0  # after the lane failed to open or broke
        self._last_bulk = 0.0  # when document work last went to the engine
        self.lane_starts = 0
        self.lane_calls = 0
        self.lane_failures = 0
        self.lane_busy_s = 0.0
        self.work = WorkModel(
            embedder.max_tokens,
            getattr(embedder, "seconds_per_token", 0.0),
            DeadlinePolicy(self.config.call_deadline_floor_s, self.config.call_deadline_factor),
        )
        self.sliced_requests = 0
        self.liveness_failures = 0
        self.deadline_failures = 0
        self.stall_retries = 0
        self._idle = asyncio.Event()  # set whenever the queue drains with the engine idle
        self._closing = False
        self._closed = False
        self.engine_calls = 0
        self.embed_requests = 0
        self.embedded_texts = 0
        self.engine_busy_s = 0.0
        self.overloaded = 0
        self.batch_texts = Reservoir(self.config.reservoir_size)
        self.register("hello", HelloArgs, self._hello)
        self.register("health", NoArgs, self._health)
        self.register("stats", NoArgs, self._stats_method)
        self.register("embed", EmbedArgs, self._embed)

    # -- registry -----------------------------------------------------------------------------

    def register(self, name: str, args_type: type[Any], handler: Handler) -> None:
        """Add a method; ``args_type.from_args(map)`` validates its named arguments.

        ``handler(args)`` returns a coroutine (run as a task), a future (the embed batcher's:
        no task at all), or a plain value (answered at once). Later features (the vector
        index) register here instead of editing the dispatcher.
        """
        self._methods[name] = (args_type, handler)
        self._stats.setdefault(name, _MethodStats(latency_ms=Reservoir(self.config.reservoir_size)))

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    def submit(self, method: str, params: Any) -> asyncio.Future[Any]:
        """Bind one method and start it; the future holds its result or its EdgeAgentError
        (anything else is a bug, which the transport reports as INTERNAL). Bad arguments
        raise here, before anything starts."""
        entry = self._methods.get(method)
        if entry is None:
            raise UnknownMethod(f"no method {method[:80]!r}", method=method[:80])
        args_type, handler = entry
        stats = self._stats[method]
        started = time.perf_counter()
        try:
            outcome = handler(args_type.from_args(named_args(params)))
        except BaseException:
            stats.count += 1
            stats.errors += 1
            stats.latency_ms.add((time.perf_counter() - started) * 1000)
            raise
        loop = asyncio.get_running_loop()
        if asyncio.isfuture(outcome):
            future: asyncio.Future[Any] = outcome
        elif asyncio.iscoroutine(outcome):
            future = loop.create_task(outcome)
        else:
            future = loop.create_future()
            future.set_result(outcome)

        def account(done: asyncio.Future[Any]) -> None:
            stats.count += 1
            if done.cancelled() or done.exception() is not None:
                stats.errors += 1
            stats.latency_ms.add((time.perf_counter() - started) * 1000)

        future.add_done_callback(account)
        return future

    async def call(self, method: str, params: Any) -> Any:
        """``submit`` and wait for the result."""
        return await self.submit(method, params)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._schedule_liveness()

    @property
    def closing(self) -> bool:
        return self._closing

    def begin_shutdown(self) -> None:
        """New embed requests get SHUTTING_DOWN; queued ones still run."""
        self._closing = True

    async def close(self, grace: float = 10.0) -> None:
        """Finish queued work for up to ``grace`` seconds, fail the rest, close the model."""
        if self._closed:
            return
        self._closed = True
        self.begin_shutdown()
        if self._liveness_timer is not None:
            self._liveness_timer.cancel()
            self._liveness_timer = None
        deadline = time.monotonic() + grace
        self._kick()
        while self._busy() and time.monotonic() < deadline:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._idle.wait()
        if self._busy():
            log.warning("%s", kv(event="shutdown_timeout", queued=self._queued()))
        if self._window_timer is not None:
            self._window_timer.cancel()
            self._window_timer = None
        for queue in (self._urgent, self._bulk):
            while queue:
                job = queue.popleft()
                if not job.future.done():
                    job.future.set_exception(ShuttingDown("the daemon is shutting down"))
        if self._engine_call is not None:
            # Still running after the grace: stop it (a child engine is killed; an in-process
            # one finishes its batch, which close() below waits for).
            self._engine_call.cancel()
        if self._lane_call is not None:
            self._lane_call.cancel()
        await self._close_lane()
        # A batch may still be running on the model thread: close() waits for it.
        await asyncio.to_thread(self.embedder.close)

    def _busy(self) -> bool:
        return bool(self._queued()) or self._engine_call is not None or self._lane_call is not None

    # -- methods ------------------------------------------------------------------------------

    def _limits(self) -> dict[str, Any]:
        config = self.embedder.config
        return {
            "max_texts": config.max_texts,
            "max_text_bytes": config.max_text_bytes,
            "max_queue": self.config.max_queue,
            "batch_max_texts": self.config.batch_max_texts,
            **self.transport_limits,
        }

    def _hello(self, args: HelloArgs) -> dict[str, Any]:
        log.info("%s", kv(event="hello", client=args.client or "-", protocol=args.protocol or "-"))
        manifest = self.embedder.manifest
        templates = {"query": manifest.query_template, "document": manifest.document_template}
        return {
            "protocol": PROTOCOL_VERSION,
            "server": "edge-agent",
            "version": server_version(),
            "model": self.embedder.model_name,
            "quant": self.embedder.quant,
            "dims": self.embedder.dims,
            "max_tokens": self.embedder.max_tokens,
            # Every value embed's "dimensions" accepts (the full size included).
            "supported_dimensions": sorted(set(manifest.matryoshka_dims) | {self.embedder.dims}),
            "kinds": list(KINDS),
            "long_text_modes": list(LONG_TEXT_MODES),
            "instruction_kinds": [k for k, t in templates.items() if t and "{task}" in t],
            "capabilities": self.methods,
            "limits": self._limits(),
            **self.identity,
        }

    def _queued(self) -> int:
        return len(self._urgent) + len(self._bulk)

    def queue_depth(self) -> int:
        return self._queued()

    async def report(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The health and stats results without counting as calls: a metrics scrape every few
        seconds must not drown the real requests in the per-method counts."""
        return self._health(NoArgs()), self._stats_method(NoArgs())

    def _health(self, _args: NoArgs) -> dict[str, Any]:
        health: dict[str, Any] = {
            "status": "shutting_down" if self._closing else "ok",
            "model_loaded": not self._closed,
            "model": self.embedder.model_name,
            "quant": self.embedder.quant,
            "queue_depth": self._queued(),
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }
        for name, section in self.health_sections.items():
            health[name] = part = section()
            # A section reports "degraded" when part of the daemon cannot serve (a collection
            # that failed to open); the daemon itself still answers.
            if part.get("status") == "degraded" and health["status"] == "ok":
                health["status"] = "degraded"
                health["reason"] = f"{name}: {part.get('reason') or 'degraded'}"
        return health

    def _stats_method(self, _args: NoArgs) -> dict[str, Any]:
        methods = {
            name: {"count": s.count, "errors": s.errors, "latency_ms": s.latency_ms.percentiles()}
            for name, s in sorted(self._stats.items())
        }
        busy = self.engine_busy_s
        return {
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "methods": methods,
            "embed": {
                "requests": self.embed_requests,
                "texts": self.embedded_texts,
                "engine_calls": self.engine_calls,
                "engine_busy_s": round(busy, 3),
                # Throughput while the engine works, so idle time does not dilute it.
                "texts_per_s": round(self.embedded_texts / busy, 1) if busy > 0 else 0.0,
                "batch_texts": self.batch_texts.percentiles(),
                "queue_depth": self._queued(),
                "max_queue": self.config.max_queue,
                "overloaded": self.overloaded,
                "sliced_requests": self.sliced_requests,
                "seconds_per_token": round(self.work.seconds_per_token, 7),
                "engine_restarts": getattr(self.embedder, "restarts", 0),
                "deadline_failures": self.deadline_failures,
                "stall_retries": self.stall_retries,
                "liveness_failures": self.liveness_failures,
                "query_lane": self.lane_stats(),
            },
            "transport": self.transport_stats(),
            **{name: section() for name, section in self.stats_sections.items()},
        }

    # -- embed --------------------------------------------------------------------------------

    def _check_model_limits(self, args: EmbedArgs) -> None:
        """The Embedder checks all of this too; checking here first keeps one bad request from
        failing a whole coalesced batch (see _run_batch for what only the engine can find)."""
        config = self.embedder.config
        if len(args.texts) > config.max_texts:
            raise InvalidArgument(
                f"{len(args.texts)} texts in one call; the limit is {config.max_texts}",
                limit=config.max_texts,
            )
        limit = config.max_text_bytes
        for index, text in enumerate(args.texts):
            # UTF-8 is at most 4 bytes a character: most texts need no encoding to pass.
            if len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit:
                raise TextTooLong(f"texts[{index}] is over {limit} bytes", index=index, limit=limit)
        manifest = self.embedder.manifest
        dims = args.dimensions
        if dims is not None and dims != self.embedder.dims and dims not in manifest.matryoshka_dims:
            allowed = sorted(set(manifest.matryoshka_dims) | {self.embedder.dims})
            raise DimensionsNotSupported(
                f"model {manifest.name!r} cannot give {dims} dimensions (supported: {allowed})",
                allowed=allowed,
            )
        if args.instruction is not None:
            template = (
                manifest.query_template if args.kind == "query" else manifest.document_template
            )
            if not template or "{task}" not in template:
                raise InvalidArgument(
                    f"model {manifest.name!r} takes no instruction for {args.kind} texts",
                    argument="instruction",
                )

    async def embed_vectors(self, args: EmbedArgs) -> tuple[np.ndarray, Embeddings]:
        """Embed through the shared batcher (so other layers' texts coalesce with clients'):
        float32 (count, dims) vectors and the Embeddings (token counts, truncation)."""
        result = await self._queue_embed(args)
        return result.vectors, result

    def _embed(self, args: EmbedArgs) -> asyncio.Future[dict[str, Any]]:
        """The wire method: the batcher's Embeddings, encoded for the transport only here."""
        inner = self._queue_embed(args)
        assert self._loop is not None  # _queue_embed checked
        outer: asyncio.Future[dict[str, Any]] = self._loop.create_future()

        def encode(done: asyncio.Future[Embeddings]) -> None:
            if outer.done():
                return
            if done.cancelled():
                outer.cancel()
            elif done.exception() is not None:
                outer.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                result = done.result()
                outer.set_result(
                    encode_embed_result(
                        result.vectors,
                        result.token_counts,
                        result.truncated,
                        result.chunks,
                        result.model,
                        result.quant,
                    )
                )

        def give_up(done: asyncio.Future[dict[str, Any]]) -> None:
            if done.cancelled():  # the caller went away: the batcher skips its texts
                inner.cancel()

        inner.add_done_callback(encode)
        outer.add_done_callback(give_up)
        return outer

    def _queue_embed(self, args: EmbedArgs) -> asyncio.Future[Embeddings]:
        """Queue one embed request; its future resolves when its last slice comes back."""
        if self._closing:
            raise ShuttingDown("the daemon is shutting down")
        self._check_model_limits(args)
        queued = self._queued()
        if queued >= self.config.max_queue:
            self.overloaded += 1
            raise Overloaded(
                f"{queued} embed requests are queued; retry later",
                limit=self.config.max_queue,
            )
        if self._loop is None:
            raise RuntimeError("Service.start() was not called")
        tokens = [self.work.text_tokens(text, args.long_text) for text in args.texts]
        job = _Job(args, self._loop.create_future(), time.monotonic(), tokens)
        (self._urgent if job.urgent else self._bulk).append(job)
        self._queued_texts += len(args.texts)
        self.embed_requests += 1
        self._kick()
        return job.future

    # The batcher is callbacks, not a task: a request that finds the engine idle is on its way
    # to the engine before the callback that received it returns, and a finished batch starts
    # the next one from the callback that delivered it. Each loop turn saved is tens of µs on a
    # small CPU, where one short text takes a few ms.

    def _kick(self) -> None:
        """Start the next batch if the engine is idle and something is queued (queries that
        meet document work in the engine go to the query lane)."""
        if self._engine_call is not None:
            self._kick_lane()
            return
        if self._window_timer is not None:
            return
        if not self._queued():
            if self._lane_call is None:
                self._idle.set()
            return
        # Wait out the rest of the first request's window for company, but only under
        # concurrency (the last batch served several requests): a lone client never pays the
        # window, and requests that queued while the engine was busy have waited enough.
        head = (self._urgent or self._bulk)[0]
        delay = head.enqueued + self.config.batch_window_s - time.monotonic()
        if (
            delay > 0
            and self._last_batch_requests > 1
            and self._queued_texts < self.config.batch_max_texts
            and not head.alone
            and head.sent == 0
        ):
            assert self._loop is not None
            self._window_timer = self._loop.call_later(delay, self._window_elapsed)
            return
        batch = self._take_batch()
        if batch:
            self._start_batch(batch)
        elif not self._queued() and self._lane_call is None:  # every caller had gone away
            self._idle.set()

    def _window_elapsed(self) -> None:
        self._window_timer = None
        self._kick()

    def _pick_queue(self) -> deque[_Job]:
        """Queries first, but after ``query_streak`` query calls in a row one slice of the
        waiting document work runs."""
        self._drop_abandoned(self._urgent)
        self._drop_abandoned(self._bulk)
        if self._urgent and (not self._bulk or self._urgent_streak < self.config.query_streak):
            if self._bulk:
                self._urgent_streak += 1
            return self._urgent
        self._urgent_streak = 0
        return self._bulk

    def _drop_abandoned(self, queue: deque[_Job]) -> None:
        """Requests whose caller went away (connection closed) cost no engine time."""
        if any(job.future.done() for job in queue):
            for job in [job for job in queue if job.future.done()]:
                queue.remove(job)
                self._queued_texts -= len(job.args.texts) - job.sent

    def _take_batch(self) -> list[_Slice]:
        """Slices of queued requests for one engine call: FIFO from the chosen queue; later
        requests join when their options match, up to about ``slice_s`` of estimated work
        (always at least one text). A request marked ``alone`` runs by itself."""
        queue = self._pick_queue()
        seconds = self.config.slice_s
        if queue is self._bulk and self._lane_usable():
            # Queries need no gaps between document slices when they have a lane of their
            # own, and documents embed ~2x faster per text in batches of 16+ than alone.
            seconds = max(seconds, _LANE_SLICE_S)
        budget = self.work.slice_tokens(seconds)
        batch: list[_Slice] = []
        key = None
        tokens = texts = 0
        for job in queue:
            if key is None:
                key = job.args.batch_key
            elif job.alone or batch[0].job.alone or job.args.batch_key != key:
                continue
            start = end = job.sent
            while end < len(job.args.texts) and texts < self.config.batch_max_texts:
                cost = job.tokens[end]
                if texts and tokens + cost > budget:
                    break
                tokens += cost
                texts += 1
                end += 1
            if end == start:
                break
            batch.append(_Slice(job, start, end))
            job.sent = end
            self._queued_texts -= end - start
            if job.alone or end < len(job.args.texts) or texts >= self.config.batch_max_texts:
                break
        for piece in batch:
            if piece.end == len(piece.job.args.texts):
                queue.remove(piece.job)  # all of it is on its way to the engine
            if piece.start == 0 and piece.end < len(piece.job.args.texts):
                self.sliced_requests += 1  # the first of several slices
        return batch

    def _start_batch(self, batch: list[_Slice], lane: ProcessEmbedder | None = None) -> None:
        """Send ``batch`` to the engine, or to the query lane ``lane``."""
        args = batch[0].job.args
        texts = [text for piece in batch for text in piece.job.args.texts[piece.start : piece.end]]
        tokens = sum(sum(piece.job.tokens[piece.start : piece.end]) for piece in batch)
        engine: Embedder | ProcessEmbedder = self.embedder if lane is None else lane
        if lane is None:
            self.engine_calls += 1
            self._last_batch_requests = len(batch)
            self._main_bulk = not batch[0].job.urgent
            if self._main_bulk:
                self._last_bulk = time.monotonic()
        else:
            self.lane_calls += 1
        options: dict[str, Any] = {
            "kind": args.kind,
            "instruction": args.instruction,
            "dimensions": args.dimensions,
            "long_text": args.long_text,
        }
        if isinstance(engine, ProcessEmbedder):
            # The work model's rate is the engine's; the lane has one thread of its several.
            slower = 1 if lane is None else max(1, self.embedder.threads)
            options["timeout"] = self.work.deadline(tokens) * slower
        started = time.perf_counter()
        try:
            call = engine.submit(texts, **options)
        except BaseException as exc:  # refused before it reached the engine
            assert self._loop is not None
            call = self._loop.create_future()
            call.set_exception(exc)
        if lane is None:
            self._engine_call = call
        else:
            self._lane_call = call
        call.add_done_callback(
            functools.partial(self._batch_done, batch, texts, started, lane is not None)
        )

    def _batch_done(
        self,
        batch: list[_Slice],
        texts: list[str],
        started: float,
        in_lane: bool,
        call: asyncio.Future[Embeddings],
    ) -> None:
        elapsed = time.perf_counter() - started
        try:
            if in_lane:
                self._lane_call = None
                self.lane_busy_s += elapsed
                exc = None if call.cancelled() else call.exception()
                if isinstance(exc, EngineError) and not self._closing:
                    # The lane broke, not the request: the engine runs it instead.
                    self._lane_broke(exc)
                    self._requeue(batch)
                    return
            else:
                self.engine_busy_s += elapsed
                self._engine_call = None
                self._main_bulk = False
                self._last_engine_activity = time.monotonic()
            self._deliver(batch, texts, elapsed, call, observe=not in_lane)
        finally:
            self._kick()

    # -- the query lane -----------------------------------------------------------------------

    def _kick_lane(self) -> None:
        """While the engine runs document work, the query at the head of the queue (whole
        requests only: a request is never split between two engines) goes to the lane."""
        if (
            self._lane_factory is None
            or self._lane_call is not None
            or not self._main_bulk
            or self._closing
        ):
            return
        self._drop_abandoned(self._urgent)
        if not self._urgent:
            return
        if self._lane is None:
            self._open_lane()
            return
        budget = self.work.slice_tokens(self.config.slice_s)
        batch: list[_Slice] = []
        tokens = texts = 0
        for job in self._urgent:
            size = len(job.args.texts)
            cost = sum(job.tokens)
            if job.sent != 0 or job.alone or cost > budget:
                break  # large query requests are sliced by the engine itself
            if batch and (
                job.args.batch_key != batch[0].job.args.batch_key
                or tokens + cost > budget
                or texts + size > self.config.batch_max_texts
            ):
                break
            batch.append(_Slice(job, 0, size))
            tokens += cost
            texts += size
        if not batch:
            return
        for piece in batch:
            piece.job.sent = piece.end
            self._queued_texts -= piece.end
            self._urgent.remove(piece.job)
        self._start_batch(batch, lane=self._lane)

    def _lane_usable(self) -> bool:
        """A lane is running, or one would be opened for the next query."""
        return self._lane is not None or (
            self._lane_factory is not None and time.monotonic() >= self._lane_paused_until
        )

    def _open_lane(self) -> None:
        if (
            self._lane_factory is None
            or self._lane_opening is not None
            or time.monotonic() < self._lane_paused_until
        ):
            return
        self.lane_starts += 1
        log.info("%s", kv(event="query_lane_start", reason="a query met document work"))
        opening = asyncio.ensure_future(asyncio.to_thread(self._lane_factory))
        self._lane_opening = opening
        opening.add_done_callback(self._lane_opened)

    def _lane_opened(self, opening: asyncio.Future[ProcessEmbedder]) -> None:
        self._lane_opening = None
        if opening.cancelled():
            return
        exc = opening.exception()
        if exc is not None:
            self.lane_failures += 1
            self._lane_paused_until = time.monotonic() + _LANE_PAUSE_S
            log.warning("%s", kv(event="query_lane_failed", detail=str(exc)[:200]))
            return
        lane = opening.result()
        if self._closing:
            self._retire_lane(lane)
            return
        self._lane = lane
        self._schedule_lane_check()
        self._kick()

    def _lane_broke(self, exc: BaseException) -> None:
        self.lane_failures += 1
        self._lane_paused_until = time.monotonic() + _LANE_PAUSE_S
        log.warning("%s", kv(event="query_lane_failed", detail=str(exc)[:200]))
        lane, self._lane = self._lane, None
        if lane is not None:
            self._retire_lane(lane)

    def _schedule_lane_check(self) -> None:
        if self._loop is not None and self._lane_timer is None:
            every = min(5.0, self.config.query_lane_idle_s / 2)
            self._lane_timer = self._loop.call_later(every, self._lane_check)

    def _lane_check(self) -> None:
        """The lane's process exits once no document work has run for query_lane_idle_s."""
        self._lane_timer = None
        if self._lane is None:
            return
        quiet = time.monotonic() - self._last_bulk
        if (
            self._lane_call is None
            and not self._main_bulk
            and not self._bulk
            and quiet >= self.config.query_lane_idle_s
        ):
            lane, self._lane = self._lane, None
            log.info("%s", kv(event="query_lane_stop", idle_s=round(quiet, 1)))
            self._retire_lane(lane)
            return
        self._schedule_lane_check()

    def _retire_lane(self, lane: ProcessEmbedder) -> None:
        closing = asyncio.ensure_future(asyncio.to_thread(lane.close))
        self._lane_closing.add(closing)
        closing.add_done_callback(self._lane_closing.discard)

    async def _close_lane(self) -> None:
        if self._lane_timer is not None:
            self._lane_timer.cancel()
            self._lane_timer = None
        if self._lane_opening is not None:
            with contextlib.suppress(BaseException):
                await self._lane_opening  # _lane_opened retires it: we are closing
        if self._lane is not None:
            lane, self._lane = self._lane, None
            self._retire_lane(lane)
        if self._lane_closing:
            await asyncio.gather(*self._lane_closing, return_exceptions=True)

    def lane_stats(self) -> dict[str, Any]:
        return {
            "enabled": self._lane_factory is not None,
            "running": self._lane is not None,
            "pid": self._lane.pid if self._lane is not None else None,
            "starts": self.lane_starts,
            "calls": self.lane_calls,
            "failures": self.lane_failures,
            "busy_s": round(self.lane_busy_s, 3),
        }

    def _requeue(self, batch: list[_Slice]) -> None:
        """Put the requests of a batch the lane could not run back at the queue's front."""
        for piece in reversed(batch):
            job = piece.job
            self._queued_texts += job.sent - piece.start
            job.sent = piece.start
            queue = self._urgent if job.urgent else self._bulk
            if job not in queue:
                queue.appendleft(job)

    def _retry_after_stall(self, batch: list[_Slice], exc: EngineUnresponsive) -> None:
        """The engine gave no answer by the deadline and was killed. A stall is rarely the
        input's fault (a stopped, swapped-out or starved child), so each request of the batch
        runs once more, alone, on the fresh child; one that stalls a second engine fails, so a
        text that truly hangs the engine costs two deadlines, not a loop."""
        failed = [piece for piece in batch if piece.job.stall_retried]
        again = [piece for piece in batch if not piece.job.stall_retried]
        for piece in again:
            piece.job.stall_retried = True
        self.stall_retries += len(again)
        log.warning(
            "%s",
            kv(event="engine_stalled", detail=exc.message, retried=len(again), failed=len(failed)),
        )
        self._fail(failed, exc)
        self._requeue_alone(again)

    def _requeue_alone(self, batch: list[_Slice]) -> None:
        """Run each request of a failed coalesced batch by itself, from the failed slice on,
        at the front of its queue, so only the sender of the bad text sees the error."""
        for piece in reversed(batch):
            job = piece.job
            queue = self._urgent if job.urgent else self._bulk
            self._queued_texts += job.sent - piece.start
            job.sent = piece.start
            job.alone = True
            if job not in queue:
                queue.appendleft(job)

    def _deliver(
        self,
        batch: list[_Slice],
        texts: list[str],
        elapsed: float,
        call: asyncio.Future[Embeddings],
        observe: bool = True,
    ) -> None:
        if call.cancelled():
            self._fail(batch, ShuttingDown("the daemon is shutting down"))
            return
        exc = call.exception()
        if isinstance(exc, InvalidArgument) and len(batch) > 1:
            # Only the engine can find some input errors (a text with no tokens, one over
            # max_tokens with long_text="error"). Run each request alone so only its sender
            # sees the error, with indices into its own texts.
            log.info("%s", kv(event="batch_split", requests=len(batch), code=exc.code.name))
            self._requeue_alone(batch)
            return
        if isinstance(exc, InvalidArgument):
            piece = batch[0]
            self._fail(batch, _shift_index(exc, piece.start))
            return
        if isinstance(exc, EngineUnresponsive):
            self.deadline_failures += 1
            self._retry_after_stall(batch, exc)
            return
        if isinstance(exc, EdgeAgentError):
            self._fail(batch, exc)
            return
        if exc is not None:  # a bug in the engine layer: report it, keep serving
            log.error("%s", kv(event="embed_failed", texts=len(texts)), exc_info=exc)
            self._fail(batch, EdgeAgentError(f"internal error: {type(exc).__name__}"))
            return
        embeddings = call.result()
        self.embedded_texts += len(texts)
        self.batch_texts.add(len(texts))
        if observe:  # the engine's rate, not the one-thread lane's
            self.work.observe(
                texts, embeddings.token_counts, batch[0].job.args.long_text, elapsed
            )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s",
                kv(event="batch", requests=len(batch), texts=len(texts), ms=elapsed * 1000),
            )
        offset = 0
        for piece in batch:
            job = piece.job
            count = piece.end - piece.start
            job.parts.append(_rows(embeddings, offset, offset + count))
            offset += count
            if job.sent == len(job.args.texts) and not job.future.done():
                job.future.set_result(_join(job.parts))

    def _fail(self, batch: list[_Slice], exc: BaseException) -> None:
        for piece in batch:
            job = piece.job
            if not job.future.done():
                job.future.set_exception(exc)
            queue = self._urgent if job.urgent else self._bulk
            if job in queue:  # the rest of a sliced request is not worth the engine's time
                queue.remove(job)
                self._queued_texts -= len(job.args.texts) - job.sent

    # -- engine liveness ----------------------------------------------------------------------

    def _schedule_liveness(self) -> None:
        interval = self.config.liveness_interval_s
        if (
            interval > 0
            and self._loop is not None
            and not self._closing
            and isinstance(self.embedder, ProcessEmbedder)
        ):
            self._liveness_timer = self._loop.call_later(interval, self._liveness_tick)

    def _liveness_tick(self) -> None:
        """Ping an engine that has been idle for an interval: a stopped, hung or swapped-out
        child is then found (and replaced) before a request waits on it."""
        self._liveness_timer = None
        idle_for = time.monotonic() - self._last_engine_activity
        if (
            self._engine_call is None
            and self._window_timer is None
            and not self._queued()
            and idle_for >= self.config.liveness_interval_s
        ):
            assert isinstance(self.embedder, ProcessEmbedder)
            ping = self.embedder.ping(self.config.call_deadline_floor_s)
            self._engine_call = ping
            ping.add_done_callback(self._ping_done)
        self._schedule_liveness()

    def _ping_done(self, ping: asyncio.Future[Any]) -> None:
        self._last_engine_activity = time.monotonic()
        if ping.cancelled() or ping.exception() is None:
            self._engine_call = None
            self._kick()
            return
        self.liveness_failures += 1
        log.warning(
            "%s",
            kv(event="engine_unresponsive", detail=str(ping.exception()), action="restart"),
        )
        assert isinstance(self.embedder, ProcessEmbedder)
        # Requests that arrive meanwhile wait for the fresh child instead of a dead one.
        restart = asyncio.ensure_future(self.embedder.restart())
        self._engine_call = restart

        def restarted(done: asyncio.Future[None]) -> None:
            self._engine_call = None
            self._last_engine_activity = time.monotonic()
            if not done.cancelled() and done.exception() is not None:
                log.error("%s", kv(event="engine_restart_failed", detail=str(done.exception())))
            self._kick()

        restart.add_done_callback(restarted)
