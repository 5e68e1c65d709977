"""The daemon's engine child imports llama_cpp's ctypes bindings only, not the package's
high-level ``Llama`` class with jinja2, diskcache (sqlite3) and the chat formats: ~5 MB of
every engine child's RSS (docs/benchmarks.md, Qwen3 section, "Session 2026-12-04"). Nor numpy,
asyncio/ssl, multiprocessing's hashlib (libcrypto) or gguf: ~20 MB more (docs/benchmarks.md,
"Serving RSS against llama-server")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.embedding.children import child_environment
from edge_agent.embedding.embedder import EmbedderConfig
from edge_agent.embedding.worker import ProcessEmbedder
from edge_agent.models import DEFAULT_MODEL, ModelStore

PROBE = """
import json, sys
from edge_agent.embedding.children import import_engine_bindings
import_engine_bindings()
import llama_cpp
from edge_agent.embedding.engine import Engine
print(json.dumps({
    "high_level": sorted(m for m in ("jinja2", "diskcache", "sqlite3", "llama_cpp.llama")
                         if m in sys.modules),
    "bindings": callable(llama_cpp.llama_decode) and llama_cpp.LLAMA_POOLING_TYPE_LAST == 3,
}))
"""


def test_bindings_without_the_package_init() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True, text=True, check=True, timeout=60, env=child_environment(),
    )  # fmt: skip
    assert json.loads(out.stdout) == {"high_level": [], "bindings": True}


def test_bindings_only_is_a_no_op_once_llama_cpp_is_imported() -> None:
    import llama_cpp

    from edge_agent.embedding.children import import_engine_bindings

    import_engine_bindings()
    assert sys.modules["llama_cpp"] is llama_cpp and hasattr(llama_cpp, "Llama")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_the_serving_child_maps_no_sqlite(model_store: ModelStore) -> None:
    config = EmbedderConfig(threads=1)
    with ProcessEmbedder.open(model_store, DEFAULT_MODEL, "Q8_0", config) as embedder:
        assert embedder.embed(["a text"]).vectors.shape == (1, 384)
        maps = Path(f"/proc/{embedder.pid}/maps").read_text()
    assert "libllama" in maps  # the engine is loaded, and llama_cpp's Llama class is not:
    assert "_sqlite3" not in maps  # diskcache (its prompt cache) would have loaded sqlite3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_the_serving_child_maps_no_numpy_ssl_or_libcrypto(model_store: ModelStore) -> None:
    """The child sends raw rows; the daemon normalises them. Its vectors are still unit
    vectors, shortened and chunk-pooled as asked."""
    config = EmbedderConfig(threads=1, batch_tokens=128, max_sequences=4)
    with ProcessEmbedder.open(model_store, DEFAULT_MODEL, "Q8_0", config) as embedder:
        result = embedder.embed(["a text", "word " * 400], long_text="chunk")
        maps = Path(f"/proc/{embedder.pid}/maps").read_text()
    assert result.vectors.shape == (2, 384) and result.chunks[0] == 1 and result.chunks[1] > 1
    assert abs(float((result.vectors**2).sum(axis=1).max()) - 1.0) < 1e-5
    for library in ("numpy", "_ssl", "libcrypto", "_hashlib", "_multiprocessing"):
        assert library not in maps, library
