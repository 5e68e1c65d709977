"""An embedding-only daemon loads neither hnswlib nor SQLite: they load when a collection
first needs them, and then work (docs/benchmarks.md, "Serving RSS against llama-server":
every module the daemon loads is RSS next to the engine child's)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.client import Client
from edge_agent.models import DEFAULT_MODEL, ModelStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_index_libraries_load_with_the_first_collection(
    model_store: ModelStore, tmp_path: Path
) -> None:
    socket_path = tmp_path / "agent.sock"
    command = [
        sys.executable, "-m", "edge_agent.cli", "--models-dir", os.fspath(model_store.root),
        "--log-level", "warning", "serve", "--socket", os.fspath(socket_path),
        "--index-dir", os.fspath(tmp_path / "index"), "--model", DEFAULT_MODEL,
        "--quant", "Q8_0", "--threads", "1", "--no-tune",
    ]  # fmt: skip
    env = {**os.environ, "EDGE_AGENT_HOME": os.fspath(tmp_path / "home")}
    daemon = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert daemon.stdout is not None
        ready, _, _ = select.select([daemon.stdout], [], [], 120)
        assert ready, "the daemon did not start in 120 s"
        assert daemon.stdout.readline().startswith("edge-agent listening on unix:")
        maps = Path(f"/proc/{daemon.pid}/maps")
        with Client(socket_path, timeout=60.0) as client:
            assert client.embed(["a text"]).vectors.shape == (1, 384)
            before = maps.read_text()
            assert "hnswlib" not in before and "_sqlite3" not in before
            client.add("notes", [("a", "the cat sat on the mat"), ("b", "stock prices fell")])
            hits = client.search("notes", "where did the cat sit?", k=1, mode="hybrid")
            after = maps.read_text()
        assert [hit.id for hit in hits] == ["a"]
        assert "hnswlib" in after and "_sqlite3" in after
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=10)
