"""The daemon: options in, a serving socket out, a clean stop on SIGTERM/SIGINT.

``serve`` is what the CLI calls (blocking, signal-driven); ``run_server`` is the same thing as a
coroutine stopped by an event, for tests and embedding in another event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .embedder import Embedder, EmbedderConfig
from .models import DEFAULT_MODEL, ModelStore
from .paths import default_paths
from .protocol import Limits
from .selection import Override
from .selftest import safe_start
from .server import Server, check_socket_free
from .service import Service, ServiceConfig, kv
from .worker import ProcessEmbedder

__all__ = ["ServeOptions", "run_server", "serve"]

log = logging.getLogger("edge_agent.app")


@dataclass(frozen=True)
class ServeOptions:
    socket_path: Path
    models_dir: Path
    model: str = DEFAULT_MODEL
    quant: str | None = None
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    max_message_bytes: int = 8 << 20
    max_connections: int = 64
    max_queue: int = 256
    # How long a stop waits for in-flight requests before answering them SHUTTING_DOWN.
    shutdown_grace: float = 10.0
    # Run llama.cpp in a child process (edge_agent.worker): an engine abort then fails the
    # requests in flight and restarts the child instead of killing the daemon.
    isolate_engine: bool = True
    # Choose quant/threads/batch from the hardware probe, profiles and measurements, and
    # self-test the chosen file in a child before serving (edge_agent.selftest.safe_start).
    # False: open ``quant`` (or the manifest's default) with ``embedder`` as given.
    select_model: bool = True
    override: Override | None = None  # what the user pinned (flag > env > config file)
    state_dir: Path | None = None  # tuning results + known-bad files; None: data dir/hardware
    tune_budget_s: float | None = 20.0  # first-start tuning; None skips it


def _open_embedder(options: ServeOptions, store: ModelStore) -> Embedder | ProcessEmbedder:
    """Select + self-test (unless disabled), then open the engine, isolated by default."""
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
            state_dir=state_dir,
            override=override,
            tune_budget_s=options.tune_budget_s,
            base_config=options.embedder,
        )
        for line in plan.report().splitlines():
            log.info("%s", kv(event="model_selection", detail=line))
        resolved, config = plan.resolved, plan.config
    else:
        resolved = store.resolve(options.model, options.quant)
    if options.isolate_engine:
        return ProcessEmbedder(resolved, config)
    return Embedder(resolved, config)


async def run_server(
    options: ServeOptions,
    stop: asyncio.Event,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Load the model, serve until ``stop`` is set, then shut down gracefully.

    ``ready(address)`` is called once the socket accepts connections. Raises AlreadyRunning if
    another daemon listens on the socket, ModelNotFound etc. if the model cannot be loaded.
    """
    socket_path = Path(options.socket_path).expanduser()
    # Fail before spending seconds on the model when another daemon already has the socket.
    check_socket_free(socket_path)
    limits = Limits(max_message_bytes=options.max_message_bytes)
    store = ModelStore(Path(options.models_dir).expanduser())
    embedder = await asyncio.to_thread(_open_embedder, options, store)
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
        service = Service(embedder, ServiceConfig(max_queue=options.max_queue))
    except BaseException:
        embedder.close()
        raise
    server = Server(service, socket_path, limits=limits, max_connections=options.max_connections)
    try:
        await service.start()
        await server.start()
        if not stop.is_set() and ready is not None:
            ready(server.address)
        await stop.wait()
        log.info("%s", kv(event="stopping", grace_s=options.shutdown_grace))
    finally:
        await server.shutdown(options.shutdown_grace)
        await service.close(options.shutdown_grace)


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

    def announce(address: str) -> None:
        socket_arg = shlex.quote(str(Path(options.socket_path).expanduser()))
        print(f"edge-agent listening on {address}")
        print(f'try: {_own_command()} embed --socket {socket_arg} "hello world"')
        sys.stdout.flush()
        if ready is not None:
            ready(address)

    asyncio.run(_serve_until_signal(options, announce))


async def _serve_until_signal(options: ServeOptions, ready: Callable[[str], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        log.info("%s", kv(event="signal", signal=signum.name))
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
        for sig in installed:
            loop.remove_signal_handler(sig)
