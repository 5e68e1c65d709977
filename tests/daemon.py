"""A real daemon for tests: ``app.run_server`` on a background thread with its own event loop,
stopped through its stop event as SIGTERM would stop it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_agent.daemon.app import run_server
from edge_agent.embedding.embedder import EmbedderConfig
from edge_agent.models import DEFAULT_MODEL, ModelStore
from edge_agent.options import ServeOptions

MAX_MESSAGE = 1 << 20  # small, so the oversized-frame test sends ~1 MiB, not 8
CONFIG = EmbedderConfig(threads=2)


class ServerThread:
    """``run_server`` on its own thread and event loop."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.addresses: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)

    @property
    def socket_path(self) -> Path:
        return self.options.socket_path

    def start(self) -> ServerThread:
        self._thread.start()
        assert self.ready.wait(60), "server did not start"
        if self.error is not None:
            raise self.error
        return self

    def _on_ready(self, address: str) -> None:
        self.addresses.append(address)
        if address.startswith("tcp://") or self.options.listen is None:
            self.ready.set()

    @property
    def tcp_address(self) -> str:
        return next(a for a in self.addresses if a.startswith("tcp://"))

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await run_server(self.options, self._stop, self._on_ready)

        try:
            asyncio.run(main())
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "server did not stop"
        if self.error is not None:
            raise self.error


def options_for(model_store: ModelStore, socket_path: Path, **overrides: Any) -> ServeOptions:
    options = ServeOptions(
        socket_path=socket_path,
        models_dir=model_store.root,
        model=DEFAULT_MODEL,
        quant="F32",
        embedder=CONFIG,
        max_message_bytes=MAX_MESSAGE,
        shutdown_grace=10.0,
        # Model selection + self-test has its own tests (test_selftest.py, and the serve test
        # below); here the model is pinned so each server starts in about a second.
        select_model=False,
        # Beside the socket's directory (not in it: the daemon creates that one, mode 0700), so
        # a test never touches the user's real collections.
        index_dir=socket_path.parent.with_name(socket_path.parent.name + "-data") / "index",
    )
    return replace(options, **overrides)
