"""`edge-agent index check|repair` on a real collection directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from edge_agent.index import IndexConfig, IndexStore, ModelFingerprint

FINGERPRINT = ModelFingerprint(model="m", sha256="0" * 64, dims=4, pooling="mean", dimensions=None)


def run_cli(index_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "index", "--index-dir", str(index_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def make_collection(root: Path, writes: int) -> Path:
    store = IndexStore(root, IndexConfig())
    collection = store.get_or_create("notes", FINGERPRINT)
    for i in range(writes):
        vector = np.zeros((1, 4), dtype=np.float32)
        vector[0, i % 4] = 1.0
        collection.upsert(FINGERPRINT, [f"doc-{i}"], vector, [f"text {i}"], [{}])
    collection.close()
    return root / "notes"


def test_check_a_healthy_collection(tmp_path: Path) -> None:
    make_collection(tmp_path, writes=5)
    result = run_cli(tmp_path, "check", "notes")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "5 documents" in result.stdout


def test_mid_log_corruption_is_reported_and_repaired_without_deleting(tmp_path: Path) -> None:
    directory = make_collection(tmp_path, writes=12)
    segments = sorted(directory.glob("wal-*.log"), key=lambda p: p.stat().st_size)
    damaged = segments[-1]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the log, not at its tail: not a torn write
    damaged.write_bytes(bytes(data))
    checked = run_cli(tmp_path, "check", "notes")
    assert checked.returncode == 1 and "DAMAGED" in checked.stdout
    repaired = run_cli(tmp_path, "repair", "notes")
    assert repaired.returncode == 0, repaired.stderr
    assert "set aside" in repaired.stdout or "NOT recovered" in repaired.stdout
    after = run_cli(tmp_path, "check", "notes")
    assert after.returncode == 0 and "OK" in after.stdout


def test_unknown_collection_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "check", "absent")
    assert result.returncode != 0
    assert "absent" in (result.stderr + result.stdout)
