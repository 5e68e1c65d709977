"""Three real daemons in separate network namespaces (tests/lan.py) write into one Milvus
collection on a Milvus Lite gRPC server in a fourth namespace; the server is SIGKILLed in the
middle of the ingest and restarted. Every acknowledged id is there afterwards, a search from
each agent sees every agent's documents, and the daemons stayed up and recovered without a
restart. The test talks to each daemon over its Unix socket (the file system is shared);
only the daemons' Milvus traffic crosses the namespaces' bridge."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from lan import Host, Lan, namespaces_available

pytest.importorskip("pymilvus", reason="the milvus extra: pip install 'edge-agent[milvus]'")

from edge_agent.client import Client
from edge_agent.errors import BackendUnavailable
from edge_agent.models import ModelStore

TOKEN = "milvus-fleet-token-0123456789abcdef"
PORT = 19530
WAIT_PORT = """
import socket, sys, time
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0:
            sys.exit(0)
    time.sleep(0.1)
sys.exit(1)
"""


def _start_milvus(host: Host, data: Path) -> subprocess.Popen[bytes]:
    assert host.netns is not None
    proc = subprocess.Popen(
        ["ip", "netns", "exec", host.netns, sys.executable, "-m", "milvus_lite", "server",
         "--data-dir", os.fspath(data), "--host", host.ipv4, "--port", str(PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    waited = host.run(sys.executable, "-c", WAIT_PORT, host.ipv4, str(PORT), timeout=90)
    assert waited.returncode == 0, "milvus-lite server did not listen"
    return proc


def test_three_agents_in_namespaces_share_milvus_through_a_server_kill(
    model_store: ModelStore, tmp_path: Path
) -> None:
    available, reason = namespaces_available()
    if not available:
        pytest.skip(f"network namespaces unavailable: {reason}")
    (tmp_path / "lan").mkdir()
    lan = Lan(tmp_path / "lan", True)
    milvus: subprocess.Popen[bytes] | None = None
    try:
        box = lan.add_host("milvus")
        agents = [lan.add_host(f"agent{i}") for i in (1, 2, 3)]
        milvus = _start_milvus(box, tmp_path / "milvus-data")
        uri = f"http://{box.ipv4}:{PORT}"
        procs = []
        for host in agents:
            argv = ["agent", "--models-dir", os.fspath(model_store.root),
                    "--data", os.fspath(tmp_path / host.name),
                    "--listen", f"{host.ipv4}:0", "--token", TOKEN]  # fmt: skip
            procs.append(host.spawn(*argv))
        sockets = []
        for proc in procs:
            address = proc.expect("ready", timeout=120)["address"]
            assert address.startswith("unix:"), address
            sockets.append(address.removeprefix("unix:"))
        clients = [Client(path, timeout=120) for path in sockets]
        for client in clients:
            info = client.create_collection("fleet", backend="milvus", uri=uri)
            assert info["backend"] == "milvus"

        acked: list[str] = []
        outages: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + 240

        def ingest(n: int, client: Client) -> None:
            for batch in range(12):
                docs = [
                    {"id": f"a{n}-{batch}-{i}",
                     "text": f"agent {n} note {batch}-{i}: the pump in hall {i} was serviced",
                     "metadata": {"agent": n}}
                    for i in range(4)
                ]  # fmt: skip
                while time.monotonic() < deadline:
                    try:
                        client.add("fleet", docs)
                    except BackendUnavailable as exc:
                        with lock:
                            outages.append(exc.message)
                        time.sleep(min(1.0, exc.data["retry_after_ms"] / 1000))
                        continue
                    with lock:
                        acked.extend(doc["id"] for doc in docs)
                    break

        writers = [
            threading.Thread(target=ingest, args=(n, c)) for n, c in enumerate(clients, 1)
        ]
        for writer in writers:
            writer.start()
        while len(acked) < 24 and time.monotonic() < deadline:
            time.sleep(0.05)
        milvus.kill()
        milvus.wait(timeout=30)
        time.sleep(2.0)
        health = clients[0].health()
        assert health["status"] == "degraded", health
        milvus = _start_milvus(box, tmp_path / "milvus-data")
        for writer in writers:
            writer.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not any(w.is_alive() for w in writers), "a writer never got its batch in"
        assert outages, "no write met the outage"
        assert len(acked) == 3 * 12 * 4

        for n, client in enumerate(clients, 1):
            until = time.monotonic() + 60
            while client.health()["status"] != "ok" and time.monotonic() < until:
                time.sleep(0.2)
            assert client.health()["status"] == "ok", f"agent {n} did not recover"
            assert client.count("fleet") == len(acked)
            got = client.get("fleet", acked)
            assert all(doc is not None for doc in got), "an acknowledged id is missing"
            hits = client.search("fleet", "pump serviced in the hall", k=30, mode="dense")
            assert {hit.metadata["agent"] for hit in hits} == {1, 2, 3}
        assert all(proc.popen.poll() is None for proc in procs), "a daemon exited"
        for client in clients:
            client.close()
    finally:
        if milvus is not None and milvus.poll() is None:
            milvus.kill()
            milvus.wait(timeout=30)
        lan.close()
