"""Operational numbers: process memory, and the Prometheus text exposition over HTTP.

``MetricsServer`` answers ``GET /metrics`` on a TCP port (``metrics_listen``, off by default)
with the daemon's health and stats in the Prometheus text format (version 0.0.4): request
counts, errors and latency quantiles per method, embed throughput, queue depth, connections,
resident memory of the daemon and of the engine child. It is a few lines of HTTP/1.0 on the
daemon's own event loop: no thread, no dependency. Metrics carry names, counts and timings
only, never document text or tokens, and there is no authentication: keep the port on
loopback (or behind a firewall) as the default suggests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import subprocess
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..addresses import is_loopback, parse_host_port
from ..errors import InvalidArgument
from ..logs import kv

__all__ = [
    "CONTENT_TYPE",
    "MetricsServer",
    "memory_section",
    "metrics_endpoint",
    "process_memory",
    "render_metrics",
]

log = logging.getLogger("edge_agent.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD = 8 << 10  # a scrape's request line and headers are a few hundred bytes
READ_TIMEOUT_S = 5.0  # a client that sends nothing does not hold a connection open
MAX_CONCURRENT = 8  # scrapes at once; more get 503 (a scraper needs one)
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")

Report = Callable[[], Awaitable[tuple[dict[str, Any], dict[str, Any]]]]


def metrics_endpoint(listen: str | None, socket_mode: int = 0o600) -> tuple[str, int] | None:
    """Check the serve options this module and the socket set-up depend on, before the model
    loads: ``metrics_listen`` (HOST:PORT or None) -> (host, port); a socket mode other than
    0600/0660 is refused (other users must never reach the socket)."""
    if socket_mode not in (0o600, 0o660):
        raise InvalidArgument(f"socket_mode must be 0600 or 0660, got {socket_mode:o}")
    if listen is None:
        return None
    try:
        host, port = parse_host_port(listen)
    except ValueError as exc:
        raise InvalidArgument(
            f"metrics_listen must be HOST:PORT, got {listen!r:.80}: {exc}"
        ) from None
    if not is_loopback(host):
        log.warning(
            "%s",
            kv(
                event="metrics_unauthenticated",
                address=f"{host}:{port}",
                note="reachable beyond this host, no authentication (counts and model names only)",
            ),
        )
    return host, port


# -- process memory -----------------------------------------------------------------------------


def process_memory(pid: int) -> dict[str, int | None]:
    """Resident set size (``rss``) and its peak (``peak``) of ``pid`` in bytes; None if unknown.

    Linux reads /proc/PID/status (VmRSS, VmHWM); elsewhere (macOS) ``ps`` gives the RSS.
    """
    status = Path(f"/proc/{pid}/status")
    if status.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            text = status.read_text(encoding="ascii", errors="replace")
        except OSError:
            return {"rss": None, "peak": None}
        found: dict[str, int | None] = {"rss": None, "peak": None}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                parts = rest.split()
                if parts and parts[0].isdigit():
                    found["rss" if key == "VmRSS" else "peak"] = int(parts[0]) * 1024
        return found
    try:
        out = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"rss": None, "peak": None}
    return {"rss": int(out) * 1024 if out.isdigit() else None, "peak": None}


def memory_section(engine_pid: Callable[[], int | None]) -> dict[str, Any]:
    """The ``memory`` section of ``stats``: the daemon's RSS and the engine child's.

    ``engine_pid`` returns the child's pid, or None when the engine runs in-process (its memory
    is then part of the daemon's).
    """
    own = process_memory(os.getpid())
    pid = engine_pid()
    engine = process_memory(pid) if pid is not None else {"rss": None, "peak": None}
    total = (own["rss"] or 0) + (engine["rss"] or 0)
    return {
        "rss_bytes": own["rss"],
        "peak_rss_bytes": own["peak"],
        "engine_pid": pid,
        "engine_rss_bytes": engine["rss"],
        "engine_peak_rss_bytes": engine["peak"],
        "total_rss_bytes": total if own["rss"] is not None else None,
    }


# -- exposition format --------------------------------------------------------------------------


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(number)


class _Families:
    """Metric families in exposition order; each declared once with HELP and TYPE."""

    def __init__(self) -> None:
        self._order: list[str] = []
        self._meta: dict[str, tuple[str, str]] = {}
        self._samples: dict[str, list[str]] = {}

    def add(
        self,
        name: str,
        kind: str,
        help: str,
        value: Any,
        labels: Mapping[str, Any] | None = None,
        suffix: str = "",
    ) -> None:
        if value is None:
            return
        if name not in self._meta:
            self._order.append(name)
            self._meta[name] = (kind, help)
            self._samples[name] = []
        label_text = ""
        if labels:
            label_text = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"
        self._samples[name].append(f"{name}{suffix}{label_text} {_number(value)}")

    def text(self) -> str:
        lines: list[str] = []
        for name in self._order:
            kind, help = self._meta[name]
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(self._samples[name])
        return "\n".join(lines) + "\n"


def _metric_name(*parts: str) -> str:
    return "_".join(_NAME_BAD.sub("_", p).strip("_").lower() for p in parts if p)


def _numeric_leaves(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple]:
    """(path, number) for the numbers of a nested stats section, two levels deep at most: deeper
    levels are per-object maps (collections by name) whose keys are not metric names."""
    for key, value in data.items():
        if isinstance(value, bool) or (
            isinstance(value, (int, float)) and not isinstance(value, bool)
        ):
            yield (*prefix, str(key)), value
        elif isinstance(value, Mapping) and len(prefix) < 1:
            yield from _numeric_leaves(value, (*prefix, str(key)))


_KNOWN_STATS = {"uptime_s", "methods", "embed", "transport", "memory"}


def render_metrics(health: Mapping[str, Any], stats: Mapping[str, Any], version: str) -> str:
    """The Prometheus text exposition of a ``health`` and a ``stats`` result."""
    f = _Families()
    f.add(
        "edge_agent_info",
        "gauge",
        "Constant 1, labelled with the version and the model being served.",
        1,
        {"version": version, "model": health.get("model", ""), "quant": health.get("quant", "")},
    )
    f.add(
        "edge_agent_healthy",
        "gauge",
        "1 when health reports status ok.",
        health.get("status") == "ok",
    )
    f.add(
        "edge_agent_model_loaded",
        "gauge",
        "1 while the model is loaded.",
        bool(health.get("model_loaded")),
    )
    selftest = health.get("selftest")
    if isinstance(selftest, Mapping) and "ok" in selftest:
        f.add(
            "edge_agent_selftest_ok",
            "gauge",
            "1 if the served file passed its start-up self-test.",
            bool(selftest["ok"]),
        )
    f.add(
        "edge_agent_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        stats.get("uptime_s"),
    )
    for method, entry in sorted((stats.get("methods") or {}).items()):
        labels = {"method": method}
        f.add(
            "edge_agent_requests_total",
            "counter",
            "RPC calls answered, by method.",
            entry.get("count"),
            labels,
        )
        f.add(
            "edge_agent_request_errors_total",
            "counter",
            "RPC calls that failed, by method.",
            entry.get("errors"),
            labels,
        )
    for method, entry in sorted((stats.get("methods") or {}).items()):
        latency = entry.get("latency_ms") or {}
        for name, quantile in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99")):
            if name in latency:
                f.add(
                    "edge_agent_request_duration_seconds",
                    "summary",
                    "Server-side time per call (a uniform sample of at most 1024 calls).",
                    latency[name] / 1000.0,
                    {"method": method, "quantile": quantile},
                )
        f.add(
            "edge_agent_request_duration_seconds",
            "summary",
            "",
            entry.get("count"),
            {"method": method},
            suffix="_count",
        )
    embed = stats.get("embed") or {}
    for key, name, help in (
        ("requests", "edge_agent_embed_requests_total", "embed requests queued."),
        ("texts", "edge_agent_embed_texts_total", "Texts embedded."),
        ("engine_calls", "edge_agent_engine_calls_total", "Model calls (coalesced batches)."),
        ("engine_busy_s", "edge_agent_engine_busy_seconds_total", "Seconds the model worked."),
        ("overloaded", "edge_agent_overloaded_total", "embed requests refused OVERLOADED."),
    ):
        f.add(name, "counter", help, embed.get(key))
    f.add(
        "edge_agent_embed_texts_per_second",
        "gauge",
        "Texts per second of model time since start.",
        embed.get("texts_per_s"),
    )
    f.add(
        "edge_agent_queue_depth",
        "gauge",
        "embed requests waiting for the model.",
        health.get("queue_depth", embed.get("queue_depth")),
    )
    f.add(
        "edge_agent_queue_limit",
        "gauge",
        "max_queue: more waiting requests are refused.",
        embed.get("max_queue"),
    )
    transport = stats.get("transport") or {}
    f.add(
        "edge_agent_connections", "gauge", "Open client connections.", transport.get("connections")
    )
    for key, help in (
        ("accepted", "Connections accepted."),
        ("rejected", "Connections refused (connection table full, or stopping)."),
        ("protocol_errors", "Connections ended by a protocol error."),
    ):
        f.add(f"edge_agent_connections_{key}_total", "counter", help, transport.get(key))
    memory = stats.get("memory") or {}
    help = "Resident memory in bytes, of the daemon and of the engine child process."
    f.add(
        "edge_agent_resident_memory_bytes",
        "gauge",
        help,
        memory.get("rss_bytes"),
        {"process": "daemon"},
    )
    f.add(
        "edge_agent_resident_memory_bytes",
        "gauge",
        help,
        memory.get("engine_rss_bytes"),
        {"process": "engine"},
    )
    index = health.get("index")
    if isinstance(index, Mapping):
        f.add(
            "edge_agent_index_collections",
            "gauge",
            "Collections on disk.",
            index.get("collections"),
        )
        unavailable = index.get("unavailable")
        f.add(
            "edge_agent_index_unavailable_collections",
            "gauge",
            "Collections that failed to open (health is degraded while any do).",
            len(unavailable) if isinstance(unavailable, Mapping) else None,
        )
    # Sections other layers add (the index, discovery): their numbers, as gauges.
    for section, data in sorted(stats.items()):
        if section in _KNOWN_STATS or not isinstance(data, Mapping):
            continue
        for path, value in _numeric_leaves(data):
            f.add(
                _metric_name("edge_agent", section, *path),
                "gauge",
                f"stats {section}.{'.'.join(path)}",
                value,
            )
    return f.text()


# -- HTTP ---------------------------------------------------------------------------------------


def _response(
    status: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
) -> bytes:
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


class MetricsServer:
    """``GET /metrics`` on ``host:port``, served from the daemon's event loop."""

    def __init__(self, report: Report, host: str, port: int, version: str) -> None:
        self._report = report
        self.host, self.port = host, port
        self.version = version
        self._server: asyncio.base_events.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self.scrapes = 0

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self.port, limit=MAX_REQUEST_HEAD
        )
        sockets = self._server.sockets or ()
        if sockets and self.port == 0:
            self.port = sockets[0].getsockname()[1]
        log.info("%s", kv(event="metrics_listening", address=self.address))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)
            self._server = None

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if self._slots.locked():
                writer.write(_response("503 Service Unavailable", b"too many scrapes\n"))
                return
            async with self._slots:
                writer.write(await self._answer(reader))
            await asyncio.wait_for(writer.drain(), timeout=READ_TIMEOUT_S)
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=READ_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            return _response("431 Request Header Fields Too Large", b"request head too large\n")
        except (TimeoutError, asyncio.IncompleteReadError):
            return _response("400 Bad Request", b"incomplete request\n")
        if len(head) > MAX_REQUEST_HEAD:
            return _response("431 Request Header Fields Too Large", b"request head too large\n")
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response("400 Bad Request", b"bad request line\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _response("405 Method Not Allowed", b"GET /metrics\n")
        if target != b"/metrics":
            return _response(
                "404 Not Found", b"metrics are at /metrics\n", head_only=method == b"HEAD"
            )
        health, stats = await self._report()
        self.scrapes += 1
        body = render_metrics(health, stats, self.version).encode("utf-8")
        return _response("200 OK", body, CONTENT_TYPE, head_only=method == b"HEAD")
