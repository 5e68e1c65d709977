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
import importlib.metadata
import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .embedder import Embedder, Embeddings
from .errors import DimensionsNotSupported, EdgeAgentError, InvalidArgument, TextTooLong
from .protocol import (
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
from .worker import ProcessEmbedder

__all__ = ["Reservoir", "Service", "ServiceConfig", "kv", "server_version"]

log = logging.getLogger("edge_agent.service")

Handler = Callable[[Any], Any]  # -> coroutine, future or value


class kv:  # lower case: used like a function, log.info("%s", kv(event="x", n=1))
    """key=value log fields, formatted only if the record is emitted.

    Values are ours (counts, names, timings), never document text: callers pass lengths.
    """

    __slots__ = ("fields",)

    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def __str__(self) -> str:
        parts = []
        for key, value in self.fields.items():
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            if not text or any(c in text for c in ' ="\n'):
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        return " ".join(parts)


def server_version() -> str:
    try:
        return importlib.metadata.version("edge-agent")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        from . import __version__

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


@dataclass(frozen=True)
class ServiceConfig:
    max_queue: int = 256  # embed requests waiting for the engine; more are refused OVERLOADED
    # How long the first request of a batch waits for company, when the previous batch served
    # several requests (under concurrency); a lone client's requests go to the engine at once.
    batch_window_s: float = 0.002
    batch_max_texts: int = 256  # texts per engine call, unless one request alone has more
    reservoir_size: int = 1024  # latency samples kept per method

    def __post_init__(self) -> None:
        if not 1 <= self.max_queue <= 1_000_000:
            raise InvalidArgument(f"max_queue must be in [1, 1000000], got {self.max_queue!r}")
        if not 0 <= self.batch_window_s <= 1:
            raise InvalidArgument(f"batch_window_s must be in [0, 1], got {self.batch_window_s!r}")
        if self.batch_max_texts < 1 or self.reservoir_size < 1:
            raise InvalidArgument("batch_max_texts and reservoir_size must be positive")


@dataclass
class _Job:
    args: EmbedArgs
    future: asyncio.Future[dict[str, Any]]
    enqueued: float
    alone: bool = False  # rerun by itself after its coalesced batch hit an input error


class Service:
    """Owns the Embedder (closing the service closes it) and answers every RPC method."""

    def __init__(
        self, embedder: Embedder | ProcessEmbedder, config: ServiceConfig | None = None
    ) -> None:
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
        self._queue: deque[_Job] = deque()
        self._queued_texts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine_call: asyncio.Future[Embeddings] | None = None  # the batch in the engine
        self._window_timer: asyncio.TimerHandle | None = None
        self._last_batch_requests = 0
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
        deadline = time.monotonic() + grace
        self._kick()
        while (self._queue or self._engine_call is not None) and time.monotonic() < deadline:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._idle.wait()
        if self._queue or self._engine_call is not None:
            log.warning("%s", kv(event="shutdown_timeout", queued=len(self._queue)))
        if self._window_timer is not None:
            self._window_timer.cancel()
            self._window_timer = None
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the daemon is shutting down"))
        if self._engine_call is not None:
            # Still running after the grace: stop it (a child engine is killed; an in-process
            # one finishes its batch, which close() below waits for).
            self._engine_call.cancel()
        # A batch may still be running on the model thread: close() waits for it.
        await asyncio.to_thread(self.embedder.close)

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

    def queue_depth(self) -> int:
        return len(self._queue)

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
            "queue_depth": len(self._queue),
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }
        for name, section in self.health_sections.items():
            health[name] = part = section()
            # A section reports "degraded" when part of the daemon cannot serve (a collection
            # that failed to open); the daemon itself still answers.
            if part.get("status") == "degraded" and health["status"] == "ok":
                health["status"] = "degraded"
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
                "queue_depth": len(self._queue),
                "max_queue": self.config.max_queue,
                "overloaded": self.overloaded,
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

    async def embed_vectors(self, args: EmbedArgs) -> tuple[np.ndarray, dict[str, Any]]:
        """Embed through the shared batcher (so other layers' texts coalesce with clients'):
        float32 (count, dims) vectors and the embed result map (token counts, truncation)."""
        result = await self._embed(args)
        vectors = np.frombuffer(result["vectors"], dtype="<f4").reshape(
            result["count"], result["dims"]
        )
        return vectors, result

    def _embed(self, args: EmbedArgs) -> asyncio.Future[dict[str, Any]]:
        """Queue one embed request; its future resolves when its batch comes back."""
        if self._closing:
            raise ShuttingDown("the daemon is shutting down")
        self._check_model_limits(args)
        if len(self._queue) >= self.config.max_queue:
            self.overloaded += 1
            raise Overloaded(
                f"{len(self._queue)} embed requests are queued; retry later",
                limit=self.config.max_queue,
            )
        if self._loop is None:
            raise RuntimeError("Service.start() was not called")
        job = _Job(args, self._loop.create_future(), time.monotonic())
        self._queue.append(job)
        self._queued_texts += len(args.texts)
        self.embed_requests += 1
        self._kick()
        return job.future

    # The batcher is callbacks, not a task: a request that finds the engine idle is on its way
    # to the engine before the callback that received it returns, and a finished batch starts
    # the next one from the callback that delivered it. Each loop turn saved is tens of µs on a
    # small CPU, where one short text takes a few ms.

    def _kick(self) -> None:
        """Start the next batch if the engine is idle and something is queued."""
        if self._engine_call is not None or self._window_timer is not None:
            return
        if not self._queue:
            self._idle.set()
            return
        # Wait out the rest of the first request's window for company, but only under
        # concurrency (the last batch served several requests): a lone client never pays the
        # window, and requests that queued while the engine was busy have waited enough.
        delay = self._queue[0].enqueued + self.config.batch_window_s - time.monotonic()
        if (
            delay > 0
            and self._last_batch_requests > 1
            and self._queued_texts < self.config.batch_max_texts
            and not self._queue[0].alone
        ):
            assert self._loop is not None
            self._window_timer = self._loop.call_later(delay, self._window_elapsed)
            return
        batch = self._take_batch()
        if batch:
            self._start_batch(batch)
        elif not self._queue:  # every queued caller had gone away
            self._idle.set()

    def _window_elapsed(self) -> None:
        self._window_timer = None
        self._kick()

    def _take_batch(self) -> list[_Job]:
        """FIFO by first request; later requests join it when their options match (a request
        marked ``alone`` runs by itself)."""
        batch: list[_Job] = []
        rest: deque[_Job] = deque()
        key = None
        texts = 0
        while self._queue:
            job = self._queue.popleft()
            if job.future.done():  # the caller went away (connection closed): skip the work
                self._queued_texts -= len(job.args.texts)
                continue
            size = len(job.args.texts)
            if key is None:
                key = job.args.batch_key
            elif (
                job.alone
                or batch[0].alone
                or job.args.batch_key != key
                or texts + size > self.config.batch_max_texts
            ):
                rest.append(job)
                continue
            batch.append(job)
            texts += size
            self._queued_texts -= size
        self._queue = rest
        return batch

    def _start_batch(self, batch: list[_Job]) -> None:
        args = batch[0].args
        texts = [text for job in batch for text in job.args.texts]
        self.engine_calls += 1
        self._last_batch_requests = len(batch)
        started = time.perf_counter()
        try:
            call = self.embedder.submit(
                texts,
                kind=args.kind,  # type: ignore[arg-type]
                instruction=args.instruction,
                dimensions=args.dimensions,
                long_text=args.long_text,  # type: ignore[arg-type]
            )
        except BaseException as exc:  # refused before it reached the engine
            assert self._loop is not None
            call = self._loop.create_future()
            call.set_exception(exc)
        self._engine_call = call
        call.add_done_callback(functools.partial(self._batch_done, batch, texts, started))

    def _batch_done(
        self,
        batch: list[_Job],
        texts: list[str],
        started: float,
        call: asyncio.Future[Embeddings],
    ) -> None:
        elapsed = time.perf_counter() - started
        self.engine_busy_s += elapsed
        self._engine_call = None
        try:
            self._deliver(batch, texts, elapsed, call)
        finally:
            self._kick()

    def _deliver(
        self,
        batch: list[_Job],
        texts: list[str],
        elapsed: float,
        call: asyncio.Future[Embeddings],
    ) -> None:
        if call.cancelled():
            self._fail(batch, ShuttingDown("the daemon is shutting down"))
            return
        exc = call.exception()
        if isinstance(exc, InvalidArgument) and len(batch) > 1:
            # Only the engine can find some input errors (a text with no tokens, one over
            # max_tokens with long_text="error"). Run each request alone so only its sender
            # sees the error, with indices into its own texts: back to the queue's front.
            log.info("%s", kv(event="batch_split", requests=len(batch), code=exc.code.name))
            for job in reversed(batch):
                job.alone = True
                self._queue.appendleft(job)
                self._queued_texts += len(job.args.texts)
            return
        if isinstance(exc, EdgeAgentError):
            self._fail(batch, exc)
            return
        if exc is not None:  # a bug in the engine layer: report it, keep serving
            log.error(
                "%s", kv(event="embed_failed", texts=len(texts)), exc_info=exc
            )
            self._fail(batch, EdgeAgentError(f"internal error: {type(exc).__name__}"))
            return
        embeddings = call.result()
        self.embedded_texts += len(texts)
        self.batch_texts.add(len(texts))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s",
                kv(event="batch", requests=len(batch), texts=len(texts), ms=elapsed * 1000),
            )
        offset = 0
        for job in batch:
            end = offset + len(job.args.texts)
            if not job.future.done():
                job.future.set_result(
                    encode_embed_result(
                        embeddings.vectors[offset:end],
                        embeddings.token_counts[offset:end],
                        embeddings.truncated[offset:end],
                        embeddings.chunks[offset:end],
                        embeddings.model,
                        embeddings.quant,
                    )
                )
            offset = end

    @staticmethod
    def _fail(batch: list[_Job], exc: BaseException) -> None:
        for job in batch:
            if not job.future.done():
                job.future.set_exception(exc)
