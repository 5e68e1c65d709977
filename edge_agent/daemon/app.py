"""The daemon: options in, a serving socket out, a clean stop on SIGTERM/SIGINT.

``serve`` is what the CLI calls (blocking, signal-driven); ``run_server`` is the same thing as a
coroutine stopped by an event, for tests and embedding in another event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..addresses import is_loopback, parse_host_port
from ..embedding.embedder import Embedder
from ..embedding.worker import ProcessEmbedder
from ..errors import EdgeAgentError, EngineError, InsecureListen, InvalidArgument
from ..hardware.memory import read_meminfo, release_free_heap
from ..index import IndexStore
from ..index.manifest import CollectionManifest
from ..lan.identity import agent_id_for
from ..logs import kv
from ..models import ModelStore
from ..options import ServeOptions
from ..paths import default_paths
from ..protocol import Limits
from ..selection.choose import Override
from ..selection.selftest import safe_start
from .index_service import IndexService
from .metrics import MetricsServer, memory_section, metrics_endpoint, process_memory
from .sdnotify import Notifier
from .server import Server, check_socket_free

if TYPE_CHECKING:
    # Imported where used: a daemon without HTTP or mDNS never loads Starlette/uvicorn
    # (~9 MB) or zeroconf (~9 MB).
    from ..lan.discovery import Advertiser
    from .http import HttpServer
from .service import Service, server_version

__all__ = ["MIN_TOKEN_CHARS", "resolve_auth_token", "run_server", "serve"]

log = logging.getLogger("edge_agent.app")


MIN_TOKEN_CHARS = 16  # `edge-agent token` makes 43 (32 random bytes, URL-safe base64)


def resolve_auth_token(options: ServeOptions, environ: dict[str, str] | None = None) -> str | None:
    """The TCP auth token: options.auth_token, else the token file, else $EDGE_AGENT_TOKEN."""
    environ = dict(os.environ) if environ is None else environ
    token, source = options.auth_token, "auth_token"
    if token is None and options.auth_token_file is not None:
        path = Path(options.auth_token_file).expanduser()
        try:
            mode = path.stat().st_mode
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InvalidArgument(f"cannot read token file {path}: {exc.strerror or exc}") from exc
        if mode & 0o077:
            # Like ssh with a private key: a token others can read is not a secret.
            raise InsecureListen(
                f"token file {path} is readable by other users (mode {mode & 0o777:o});"
                f" run: chmod 600 {shlex.quote(str(path))}"
            )
        source = str(path)
    if token is None and environ.get("EDGE_AGENT_TOKEN"):
        token, source = environ["EDGE_AGENT_TOKEN"].strip(), "EDGE_AGENT_TOKEN"
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise InsecureListen(
            f"the auth token from {source} has {len(token)} characters; use at least"
            f" {MIN_TOKEN_CHARS} (`edge-agent token` makes one)"
        )
    return token


def _tcp_endpoint(options: ServeOptions, token: str | None) -> tuple[str, int] | None:
    if options.listen is None:
        if options.advertise:
            raise InvalidArgument("advertise needs TCP: add --listen HOST:PORT")
        return None
    host, port = parse_host_port(options.listen)
    if not is_loopback(host) and token is None:
        raise InsecureListen(
            f"refusing to listen on {host}:{port} without an auth token: anyone who can reach"
            " this address could use the daemon. Create one (`edge-agent token > token &&"
            " chmod 600 token`) and pass --token-file token (or set EDGE_AGENT_TOKEN), or"
            " listen on 127.0.0.1"
        )
    return host, port


def _http_endpoint(options: ServeOptions, token: str | None) -> tuple[str, int] | None:
    """The HTTP listener's address: the same protected mode as TCP."""
    if options.http_listen is None:
        return None
    host, port = parse_host_port(options.http_listen)
    if not is_loopback(host) and token is None:
        raise InsecureListen(
            f"refusing to serve HTTP on {host}:{port} without an auth token: anyone who can"
            " reach this address could use the daemon. Create one (`edge-agent token > token"
            " && chmod 600 token`) and pass --token-file token (or set EDGE_AGENT_TOKEN), or"
            " serve HTTP on 127.0.0.1"
        )
    return host, port


def _merged_stats(server: Server, http: HttpServer) -> dict[str, Any]:
    return {**server.stats(), **http.stats()}


def _data_dir(options: ServeOptions) -> Path:
    """Where this daemon's identity lives: beside its collections."""
    if options.index_dir:
        return Path(options.index_dir).expanduser().parent
    return default_paths().data_dir


def _index_dir(options: ServeOptions) -> Path:
    return Path(options.index_dir or default_paths().data_dir / "index").expanduser()


def _quant_of_collections(index_dir: Path, store: ModelStore, model: str) -> tuple[str, str] | None:
    """The quant whose file the existing collections of ``model`` were embedded with.

    Their vectors only compare with that file's: preferring it keeps them searchable by text
    when tuning would otherwise pick another quant (a rebuilt engine, new profiles).
    """
    shas: dict[str, list[str]] = {}
    for name in IndexStore(index_dir).names():
        try:
            fingerprint = CollectionManifest.load(index_dir / name).fingerprint
        except EdgeAgentError:
            continue  # a damaged collection is reported when it is opened
        if fingerprint.model == model:
            shas.setdefault(fingerprint.sha256, []).append(name)
    if len(shas) != 1:
        return None  # none, or collections disagree: selection decides on its own
    ((sha, names),) = shas.items()
    try:
        files = store.get(model).files
    except EdgeAgentError:
        return None
    for quant, file in files.items():
        if file.sha256 == sha:
            return quant, f"collections {', '.join(sorted(names)[:5])} were embedded with it"
    return None


def _open_embedder(
    options: ServeOptions, store: ModelStore, startup: dict[str, Any] | None = None
) -> Embedder | ProcessEmbedder:
    """Select + self-test (unless disabled), then open the engine, isolated by default.

    ``startup`` receives the self-test result of the file being served (for ``health``)."""
    if startup is not None:
        startup["selftest"] = {"ok": None, "result": "skipped", "quant": options.quant}
    resolved = None
    config = options.embedder
    if options.select_model:
        override = options.override or Override()
        if options.quant and override.quant is None:
            override = replace(
                override, quant=options.quant, sources={**override.sources, "quant": "options"}
            )
        state_dir = options.state_dir or default_paths().data_dir / "hardware"
        plan = safe_start(
            store,
            options.model,
            prefer=_quant_of_collections(_index_dir(options), store, options.model),
            state_dir=state_dir,
            override=override,
            tune_budget_s=options.tune_budget_s,
            base_config=options.embedder,
        )
        for line in plan.report().splitlines():
            log.info("%s", kv(event="model_selection", detail=line))
        resolved, config = plan.resolved, plan.config
        if startup is not None and plan.outcomes:
            served = plan.outcomes[-1]
            startup["selftest"] = {
                "ok": served.ok,
                "result": served.kind,  # "ok", or "unverified" without reference vectors
                "quant": served.quant,
                "cosine": served.cosine,
                "seconds": round(served.seconds, 3),
                "failed_before": [o.line() for o in plan.outcomes[:-1]],
                "basis": plan.decision.basis,
            }
    else:
        resolved = store.resolve(options.model, options.quant)
    if options.isolate_engine:
        return ProcessEmbedder(resolved, config)
    return Embedder(resolved, config)


def _query_lane(embedder: Embedder | ProcessEmbedder) -> Callable[[], ProcessEmbedder] | None:
    """How the service opens its query lane: a one-thread sibling of the engine child, if
    the engine is a child with threads to spare and the box has the memory for a second one
    (twice the engine child's RSS available: the file's pages are shared, its buffers not)."""
    if not isinstance(embedder, ProcessEmbedder) or embedder.threads < 2:
        return None

    def open_lane() -> ProcessEmbedder:
        pid = embedder.pid
        rss = process_memory(pid)["rss"] if pid is not None else None
        _, available = read_meminfo()
        if rss is not None and available is not None and available < 2 * rss:
            raise EngineError(
                f"not enough memory for a query lane: {available >> 20} MiB available, it"
                f" needs about {2 * rss >> 20} MiB (queries wait for the engine instead)"
            )
        return embedder.sibling(threads=1)

    return open_lane


async def run_server(
    options: ServeOptions,
    stop: asyncio.Event,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Load the model, serve until ``stop`` is set, then shut down gracefully.

    ``ready(address)`` is called once the socket accepts connections, and once more with the
    ``tcp://`` address when TCP is on. Raises AlreadyRunning if
    another daemon listens on the socket, ModelNotFound etc. if the model cannot be loaded.
    """
    socket_path = Path(options.socket_path).expanduser()
    # Fail before spending seconds on the model when another daemon already has the socket or
    # the TCP settings are unsafe.
    check_socket_free(socket_path)
    token = resolve_auth_token(options)
    tcp = _tcp_endpoint(options, token)
    http_at = _http_endpoint(options, token)
    metrics_at = metrics_endpoint(options.metrics_listen, options.socket_mode)
    limits = Limits(max_message_bytes=options.max_message_bytes)
    store = ModelStore(Path(options.models_dir).expanduser())
    startup: dict[str, Any] = {}
    embedder = await asyncio.to_thread(_open_embedder, options, store, startup)
    log.info(
        "%s",
        kv(
            event="model_loaded",
            model=embedder.model_name,
            quant=embedder.quant,
            dims=embedder.dims,
            threads=embedder.threads,
        ),
    )
    try:
        service = Service(
            embedder,
            replace(options.service, max_queue=options.max_queue),
            query_lane=_query_lane(embedder),
        )
    except BaseException:
        embedder.close()
        raise
    service.health_sections["selftest"] = lambda: dict(startup["selftest"])
    # One id per data directory, the same one discovery announces in its TXT record.
    agent_id = agent_id_for(_data_dir(options))
    service.identity["agent_id"] = agent_id
    # The engine child's pid changes when it is restarted after a crash: look it up each time.
    service.stats_sections["memory"] = functools.partial(
        memory_section, lambda: getattr(service.embedder, "pid", None)
    )
    index_dir = _index_dir(options)
    index = IndexService(IndexStore(index_dir, options.index), service)
    for name, args_type, handler in index.methods():
        service.register(name, args_type, handler)
    service.health_sections["index"] = index.health
    service.stats_sections["index"] = index.stats
    server = Server(
        service,
        socket_path,
        limits=limits,
        max_connections=options.max_connections,
        tcp=tcp,
        auth_token=token,
        auth_timeout=options.auth_timeout,
        first_byte_timeout=options.first_byte_timeout,
        max_preauth_connections=options.max_preauth_connections,
        max_preauth_per_source=options.max_preauth_per_source,
        idle_timeout=options.idle_timeout,
    )
    service.transport_limits.update(server.transport_limits())
    service.transport_stats = server.stats
    http: HttpServer | None = None
    if http_at is not None:
        from .http import HttpServer, HttpSettings, build_app

        settings = HttpSettings(
            token=token,
            max_body_bytes=options.max_message_bytes,
            metrics=metrics_at is not None,
            version=server_version(),
        )
        http = HttpServer(
            build_app(service, settings), *http_at, max_connections=options.max_connections
        )
        service.transport_stats = functools.partial(_merged_stats, server, http)
    metrics: MetricsServer | None = None
    advertiser: Advertiser | None = None
    try:
        await service.start()
        await index.start()
        await server.start()
        if options.advertise and tcp is not None and server.tcp_port is not None:
            # Before ready(): once the daemon says it is up, it can also be found.
            advertiser = await _advertise(
                options, service, agent_id, tcp[0], server.tcp_port, token is not None
            )
        if options.socket_mode != 0o600:
            # Widening only (bind made it 0600): group members may connect from now on.
            os.chmod(socket_path, options.socket_mode)
        if metrics_at is not None:
            metrics = MetricsServer(service.report, *metrics_at, version=server_version())
            await metrics.start()
        if http is not None:
            await http.start()
            # hello names it, so a socket client can hand the HTTP address on (docs/protocol.md).
            service.identity["http"] = http.address
        if not stop.is_set() and ready is not None:
            ready(server.address)
            if server.tcp_address is not None:
                ready(server.tcp_address)
            if http is not None:
                ready(http.address)
        await stop.wait()
        log.info("%s", kv(event="stopping", grace_s=options.shutdown_grace))
    finally:
        # Order: stop taking requests and finish those in flight (they may still be queued on
        # the model or the index writer), then apply the queued writes, then free the model.
        if advertiser is not None:
            # Goodbye packets first, so browsers drop this agent before it stops answering.
            await advertiser.close()
        if metrics is not None:
            await metrics.close()
        # Both transports drain at once: in-flight HTTP and socket requests share the grace.
        await asyncio.gather(
            server.shutdown(options.shutdown_grace),
            *([http.close(options.shutdown_grace)] if http is not None else []),
        )
        await asyncio.to_thread(index.close)
        await service.close(options.shutdown_grace)


async def _advertise(
    options: ServeOptions, service: Service, agent_id: str, host: str, port: int, auth: bool
) -> Advertiser:
    """Announce the TCP endpoint with mDNS (edge_agent.lan.discovery), following model changes.
    ``host``: the listen address as _tcp_endpoint parsed it; ``agent_id``: the one hello gives."""

    from ..lan.discovery import Advertiser, AgentInfo, bound_addresses

    def current() -> AgentInfo:
        embedder = service.embedder
        return AgentInfo(agent_id, embedder.model_name, embedder.dims, embedder.quant, auth)

    advertiser = Advertiser(
        current(),
        port,
        bound_hosts=bound_addresses(host),
        interfaces=options.advertise_interfaces,
        follow=current,
    )
    await advertiser.start()
    return advertiser


def _own_command() -> str:
    """How the user can run this same edge-agent: plain ``edge-agent`` when that is what PATH
    finds, else the path we were started from (e.g. .venv/bin/edge-agent under ``make run``)."""
    started_as = Path(sys.argv[0])
    if started_as.name == "edge-agent":
        on_path = shutil.which("edge-agent")
        if on_path and Path(on_path).resolve() == started_as.resolve():
            return "edge-agent"
        return shlex.quote(
            os.path.relpath(started_as) if not started_as.is_absolute() else str(started_as)
        )
    return "edge-agent"


def serve(options: ServeOptions, ready: Callable[[str], None] | None = None) -> None:
    """Run the daemon until SIGINT or SIGTERM (handlers are installed only on the main thread;
    elsewhere stop it by signalling the process or use ``run_server``)."""

    # systemd (Type=notify): READY=1 once the socket listens, watchdog pings, STOPPING=1.
    notifier = Notifier.from_environ()
    addresses: list[str] = []

    def announce(address: str) -> None:
        addresses.append(address)
        notifier.ready(f"serving on {', '.join(addresses)}")
        print(f"edge-agent listening on {address}")
        if address.startswith("unix:"):
            socket_arg = shlex.quote(str(Path(options.socket_path).expanduser()))
            print(f'try: {_own_command()} embed --socket {socket_arg} "hello world"')
        sys.stdout.flush()
        # Start-up is over: hand back the heap it freed (module compiles, the self-test).
        release_free_heap()
        if ready is not None:
            ready(address)

    notifier.status("loading the model")
    asyncio.run(_serve_until_signal(options, announce, notifier))


async def _serve_until_signal(
    options: ServeOptions, ready: Callable[[str], None], notifier: Notifier | None = None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    notifier = notifier or Notifier(None)
    # Pings start before the model loads (that runs off the loop), so a slow first-start
    # tuning is not mistaken for a hang, while a blocked loop still is.
    keepalive = asyncio.create_task(notifier.keepalive(), name="edge-agent-watchdog")

    def on_signal(signum: signal.Signals) -> None:
        log.info("%s", kv(event="signal", signal=signum.name))
        notifier.stopping(f"stopping ({signum.name})")
        stop.set()
        # A second signal gets the default behaviour, so a stuck shutdown can still be killed.
        for sig in installed:
            loop.remove_signal_handler(sig)
        installed.clear()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        await run_server(options, stop, ready)
    finally:
        keepalive.cancel()
        await asyncio.gather(keepalive, return_exceptions=True)
        for sig in installed:
            loop.remove_signal_handler(sig)
