"""Operations: sd_notify, the watchdog, structured logs, health, stats and Prometheus metrics.

The end-to-end test runs `edge-agent serve` the way systemd does: a config file, a
NOTIFY_SOCKET (a real AF_UNIX datagram socket) and WATCHDOG_USEC in the environment.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.client import Client
from edge_agent.daemon.metrics import render_metrics
from edge_agent.daemon.sdnotify import Notifier
from edge_agent.logs import JsonFormatter, KeyValueFormatter, kv, setup_logging, under_journald
from edge_agent.models import ModelStore


class Datagrams:
    """A bound AF_UNIX datagram socket (what systemd listens on) and what arrives on it."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> list[str]:
        with self._lock:
            return [line for _, m in self.messages for line in m.split("\n")]

    def wait_for(self, line: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.lines():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {line!r} within {timeout}s; got {self.lines()}")
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


# -- sd_notify ----------------------------------------------------------------------------------


def test_notify_reaches_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    receiver = Datagrams(os.fspath(path))
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": os.fspath(path)})
        assert notifier.enabled
        assert notifier.ready("serving on unix:/x") is True
        assert notifier.ready("serving on unix:/x, tcp://127.0.0.1:1") is True  # status only
        assert notifier.stopping() is True
        receiver.wait_for("STOPPING=1", 5)
        assert [m for _, m in receiver.messages] == [
            "READY=1\nSTATUS=serving on unix:/x",
            "STATUS=serving on unix:/x, tcp://127.0.0.1:1",
            "STOPPING=1\nSTATUS=stopping",
        ]
    finally:
        receiver.close()


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    receiver = Datagrams("\0" + name)
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.watchdog()
        receiver.wait_for("WATCHDOG=1", 5)
    finally:
        receiver.close()


def test_no_notify_socket_means_no_notifications() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled and notifier.ready("x") is False
    assert notifier.watchdog_interval is None
    # A missing receiver is logged, not raised: serving goes on.
    gone = Notifier("/nonexistent/notify.sock")
    assert gone.notify("READY=1") is False


def test_watchdog_interval_is_half_the_timeout_and_only_for_its_pid() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environ(env).watchdog_interval == 15.0
    mine = {**env, "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(mine).watchdog_interval == 15.0
    # A child that inherited its parent's environment must not ping for it.
    assert Notifier.from_environ({**env, "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_watchdog_pings_stop_while_the_event_loop_is_blocked(tmp_path: Path) -> None:
    """The pings come from the loop: a hung loop stops them, so systemd restarts it."""
    path = tmp_path / "notify"
    receiver = Datagrams(os.fspath(path))
    notifier = Notifier(os.fspath(path), watchdog_usec=200_000)  # a ping every 0.1 s

    async def main() -> tuple[float, float]:
        task = asyncio.create_task(notifier.keepalive())
        await asyncio.sleep(0.45)
        hung_at = time.monotonic()
        time.sleep(1.2)  # a callback that blocks the loop
        resumed_at = time.monotonic()
        await asyncio.sleep(0.45)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return hung_at, resumed_at

    try:
        hung_at, resumed_at = asyncio.run(main())
        time.sleep(0.3)
        pings = [t for t, m in receiver.messages if m == "WATCHDOG=1"]
    finally:
        receiver.close()
    before = [t for t in pings if t < hung_at]
    during = [t for t in pings if hung_at + 0.05 < t < resumed_at - 0.05]
    after = [t for t in pings if t > resumed_at]
    assert len(before) >= 3 and len(after) >= 2, pings
    assert during == [], "pings went on while the loop was blocked"


# -- logs ---------------------------------------------------------------------------------------


def record(message: str, *args: Any, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("edge_agent.app", level, __file__, 1, message, args, None)


def test_key_value_lines() -> None:
    line = KeyValueFormatter().format(
        record("%s", kv(event="model_loaded", quant="Q8_0", ms=1.23456, note="two words"))
    )
    assert line.startswith("ts=")
    assert line.split(" ", 1)[1] == (
        'level=info logger=edge_agent.app event=model_loaded quant=Q8_0 ms=1.235 note="two words"'
    )
    plain = KeyValueFormatter().format(record("falling back from %s to %s", "Q8_0", "F16"))
    assert plain.endswith('msg="falling back from Q8_0 to F16"')


def test_json_lines_keep_types_and_cannot_be_spoofed() -> None:
    line = JsonFormatter().format(
        record("%s", kv(event="batch", texts=3, ms=2.5, level="fake"), level=logging.WARNING)
    )
    data = json.loads(line)
    assert data["level"] == "warning" and data["field_level"] == "fake"
    assert (data["event"], data["texts"], data["ms"], data["logger"]) == (
        "batch",
        3,
        2.5,
        "edge_agent.app",
    )
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record("%s", kv(event="embed_failed"), level=logging.ERROR)
        failed.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(failed))
    assert "ValueError: boom" in out["exc"] and "\n" not in JsonFormatter().format(failed)


def test_journald_gets_priorities_and_no_timestamps(tmp_path: Path) -> None:
    target = tmp_path / "journal"
    with open(target, "w", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert under_journald(stream, env)
        assert not under_journald(stream, {"JOURNAL_STREAM": "1:2"})
        handler = setup_logging("info", "kv", stream=stream, environ=env)
        try:
            logging.getLogger("edge_agent.test").warning("%s", kv(event="disk_slow"))
            logging.getLogger("edge_agent.test").debug("%s", kv(event="hidden"))
        finally:
            logging.getLogger().removeHandler(handler)
    assert target.read_text() == "<4>level=warning logger=edge_agent.test event=disk_slow\n"


def test_setup_logging_replaces_its_own_handler() -> None:
    first = setup_logging("info", "kv", stream=io.StringIO())
    second = setup_logging("info", "json", stream=io.StringIO())
    try:
        root = logging.getLogger()
        assert second in root.handlers and first not in root.handlers
    finally:
        logging.getLogger().removeHandler(second)


# -- metrics ------------------------------------------------------------------------------------


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(family: Any, suffix: str = "", **labels: str) -> float:
    for s in family.samples:
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no {family.name}{suffix} {labels}: {family.samples}")


def test_render_metrics_is_valid_exposition_format() -> None:
    health = {
        "status": "ok",
        "model_loaded": True,
        "model": 'odd "name"\\x',
        "quant": "Q8_0",
        "queue_depth": 2,
        "selftest": {"ok": True},
    }
    stats = {
        "uptime_s": 12.5,
        "methods": {
            "embed": {"count": 7, "errors": 1, "latency_ms": {"p50": 2.0, "p95": 9.5, "p99": 12.0}}
        },
        "embed": {
            "requests": 7,
            "texts": 20,
            "engine_calls": 5,
            "engine_busy_s": 0.5,
            "texts_per_s": 40.0,
            "queue_depth": 2,
            "max_queue": 256,
            "overloaded": 0,
        },
        "transport": {"connections": 1, "accepted": 3, "rejected": 0, "protocol_errors": 0},
        "memory": {"rss_bytes": 100 << 20, "engine_rss_bytes": 150 << 20},
        "index": {"collections": 2, "vectors": 1000, "by_name": {"docs": {"count": 1000}}},
    }
    text = render_metrics(health, stats, "0.1.0")
    parsed = families(text)
    assert sample(parsed["edge_agent_info"], model='odd "name"\\x', quant="Q8_0") == 1
    assert sample(parsed["edge_agent_requests"], "_total", method="embed") == 7
    assert sample(parsed["edge_agent_request_errors"], "_total", method="embed") == 1
    latency = parsed["edge_agent_request_duration_seconds"]
    assert latency.type == "summary"
    assert sample(latency, quantile="0.95", method="embed") == pytest.approx(0.0095)
    assert sample(latency, "_count", method="embed") == 7
    assert sample(parsed["edge_agent_resident_memory_bytes"], process="engine") == 150 << 20
    assert sample(parsed["edge_agent_queue_depth"]) == 2
    assert sample(parsed["edge_agent_index_vectors"]) == 1000
    # Per-object maps (collections by name) are not turned into metric names.
    assert not any("docs" in name for name in parsed)
    assert text.endswith("\n") and "# TYPE edge_agent_healthy gauge" in text


# -- the daemon, as systemd runs it -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def edge_agent(*args: str, env: dict[str, str], timeout: float = 60) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def daemon(model_store: ModelStore, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`edge-agent serve` under a fake systemd: config file, NOTIFY_SOCKET, WATCHDOG_USEC."""
    sock = tmp_path / "run" / "agent.sock"
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'socket = "{sock}"\nsocket_mode = "0660"\nmodels_dir = "{model_store.root}"\n'
        f'index_dir = "{tmp_path / "index"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'quant = "Q8_0"\nthreads = 1\nmetrics_listen = "127.0.0.1:{port}"\n'
        '[log]\nformat = "json"\nlevel = "debug"\n',
        encoding="utf-8",
    )
    notify = tmp_path / "notify"
    receiver = Datagrams(os.fspath(notify))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "NOTIFY"))}
    env.update(EDGE_AGENT_HOME=str(tmp_path / "home"), EDGE_AGENT_CONFIG=str(config))
    stderr = open(tmp_path / "stderr.log", "w+", encoding="utf-8")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "serve"],
        env={**env, "NOTIFY_SOCKET": os.fspath(notify), "WATCHDOG_USEC": "1000000"},
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        yield {
            "proc": proc,
            "socket": sock,
            "port": port,
            "env": env,
            "notify": receiver,
            "stderr": tmp_path / "stderr.log",
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        receiver.close()
        stderr.close()


def test_serve_under_systemd_notifies_serves_metrics_and_stops(daemon: dict[str, Any]) -> None:
    proc, notify, sock = daemon["proc"], daemon["notify"], daemon["socket"]
    notify.wait_for("READY=1", 120)
    lines = notify.lines()
    # Pings began while the model was loading (the loop is free then), before READY.
    assert lines[0] == "STATUS=loading the model"
    assert "WATCHDOG=1" in lines[: lines.index("READY=1")]
    assert f"STATUS=serving on unix:{sock}" in lines
    # READY=1 means the socket accepts connections now, with the configured group access.
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    secret = "confidential-merger-plan-7731"
    with Client(sock, timeout=60) as client:
        assert client.embed([secret, "hello world"]).count == 2
        stats = client.stats()
    memory = stats["memory"]
    assert memory["rss_bytes"] > 10 << 20 and memory["engine_rss_bytes"] > 10 << 20
    # Neither HTTP nor mDNS is configured: their libraries are never loaded (~18 MB of the
    # daemon's RSS). zeroconf and orjson are compiled modules, so they would show in the maps.
    mapped = Path(f"/proc/{proc.pid}/maps").read_text(encoding="utf-8")
    assert "zeroconf" not in mapped and "orjson" not in mapped
    assert memory["engine_pid"] != proc.pid
    assert stats["methods"]["embed"]["count"] == 1
    assert set(stats["methods"]["embed"]["latency_ms"]) == {"p50", "p95", "p99"}
    assert stats["embed"]["texts"] == 2 and stats["embed"]["texts_per_s"] > 0

    health = edge_agent("health", "--json", env=daemon["env"])
    assert health.returncode == 0, health.stderr
    report = json.loads(health.stdout)
    assert report["status"] == "ok" and report["model_loaded"] is True
    assert report["queue_depth"] == 0
    assert report["index"]["status"] == "ok"  # the index's own section (index_service)
    assert report["selftest"]["ok"] is True and report["selftest"]["quant"] == "Q8_0"
    assert report["selftest"]["result"] in ("ok", "unverified")

    url = f"http://127.0.0.1:{daemon['port']}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        parsed = families(response.read().decode("utf-8"))
    assert sample(parsed["edge_agent_requests"], "_total", method="embed") == 1
    assert sample(parsed["edge_agent_healthy"]) == 1
    assert sample(parsed["edge_agent_selftest_ok"]) == 1
    assert sample(parsed["edge_agent_embed_texts"], "_total") == 2
    assert sample(parsed["edge_agent_resident_memory_bytes"], process="engine") > 10 << 20
    assert sample(parsed["edge_agent_info"], quant="Q8_0") == 1
    assert sample(parsed["edge_agent_index_unavailable_collections"]) == 0
    # A scrape is not a call: only the earlier `stats` call is counted (a call is counted
    # once it has answered, so this one is not in its own result).
    with Client(sock, timeout=30) as client:
        assert client.stats()["methods"]["stats"]["count"] == 1
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{daemon['port']}/other", timeout=30)
    assert missing.value.code == 404
    post = urllib.request.Request(url, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=30)
    assert refused.value.code == 405

    pings = lines.count("WATCHDOG=1")
    time.sleep(1.6)
    assert notify.lines().count("WATCHDOG=1") >= pings + 2  # still pinging while serving

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "STOPPING=1" in notify.lines()
    assert not sock.exists()
    assert edge_agent("health", env=daemon["env"]).returncode == 1

    # Logs: one JSON object a line, structured, and no document text anywhere.
    log_text = daemon["stderr"].read_text(encoding="utf-8")
    records = [json.loads(line) for line in log_text.splitlines() if line.strip()]
    assert any(r.get("event") == "model_loaded" and r["quant"] == "Q8_0" for r in records)
    assert all({"ts", "level", "logger"} <= r.keys() for r in records)
    assert secret not in log_text
