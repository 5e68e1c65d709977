"""The engine built by packaging/build_engine.py carries packaging/patches/: pooled embeddings
reserve no logits and Qwen3 runs no output head (llama.cpp PR #25964 / #28949, not yet in the
vendored llama.cpp). Checked on the real engine library: an unpatched build fails these tests.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from edge_agent.embedding.engine import Engine, EngineSettings
from edge_agent.models import DEFAULT_MODEL, ModelStore
from edge_agent.models.convert_hf import convert_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "packaging"))
import build_engine  # noqa: E402
import qwen3_fixture  # noqa: E402

VOCAB = 32_768  # big enough that a vocab x batch logits tensor dwarfs everything else
BATCH = 256
LOGITS_MIB = VOCAB * BATCH * 4 / 2**20  # 32 MiB: the head's output at a full batch


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = qwen3_fixture.SHAPES["tiny"]
    shape = qwen3_fixture.Shape("tiny-wide-vocab", 2, 64, 128, 4, 2, 32, VOCAB, 2048, "F32")
    assert shape.layers == tiny.layers
    hf_dir = qwen3_fixture.write_model_dir(tmp_path_factory.mktemp("hf") / "q", shape, seed=4)
    store = ModelStore(tmp_path_factory.mktemp("store"))
    manifest = convert_model(store, hf_dir, name="wide", quants=("F16",))
    return store.model_dir("wide") / manifest.files["F16"].path


def _compute_buffer_mib(records: list[logging.LogRecord]) -> float:
    sizes = [
        float(m.group(1))
        for r in records
        if (m := re.search(r"CPU compute buffer size\s*=\s*([\d.]+) MiB", r.getMessage()))
    ]
    assert sizes, "llama.cpp logged no compute buffer size"
    return max(sizes)


def _engine(path: Path) -> Engine:
    settings = EngineSettings(
        threads=2, batch_tokens=BATCH, max_sequences=4, flash_attention=True, solo_tokens=64
    )
    return Engine(path, settings)


def test_qwen3_embeddings_run_without_output_head_or_logits(
    qwen3_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_agent.llama_cpp")
    engine = _engine(qwen3_path)
    try:
        # The graph is reserved without the vocab x batch head output (patched qwen3.cpp).
        assert _compute_buffer_mib(caplog.records) < LOGITS_MIB / 2
        tokens = [int(t) for t in np.arange(BATCH - 1) % 1000] + [engine.eos]
        vector = engine.embed_batch([tokens])[0]
        assert np.isfinite(vector).all() and np.linalg.norm(vector) > 0
        # No logits buffer behind the embeddings (patched output_reserve).
        assert not llama_cpp.llama_get_logits(engine._ctx)
        # Engine parameters for decoders: a q8_0 KV cache, no second (solo) context.
        assert engine.kv_q8 and engine.solo_tokens == 0
        assert any("K (q8_0)" in r.getMessage() for r in caplog.records)
    finally:
        engine.close()


def test_bert_embeddings_reserve_no_logits(model_store: ModelStore) -> None:
    engine = _engine(model_store.resolve(DEFAULT_MODEL, "Q8_0").path)
    try:
        engine.embed_batch([[engine.bos, 2000, 2001, engine.sep]])
        assert not llama_cpp.llama_get_logits(engine._ctx)
    finally:
        engine.close()


def test_patches_are_part_of_the_wheel_cache_key(tmp_path: Path) -> None:
    patches = build_engine.llama_patches()
    assert [p.name for p in patches] == ["llama-embeddings-no-logits.patch"]
    text = patches[0].read_text()
    # Each patch says which upstream work it stands in for.
    assert "https://github.com/ggml-org/llama.cpp/pull/25964" in text
    key = build_engine.patches_key(patches)
    edited = tmp_path / patches[0].name
    shutil.copy(patches[0], edited)
    edited.write_text(text + "\n")
    assert build_engine.patches_key([edited]) != key
    flags = {"CMAKE_ARGS": build_engine.llama_cmake_flags(False)}
    assert build_engine.llama_wheel_dir(False) == build_engine.wheel_dir_for(
        *build_engine.LLAMA, {**flags, **key}
    )
    assert build_engine.llama_wheel_dir(False) != build_engine.wheel_dir_for(
        *build_engine.LLAMA, flags
    )


def test_patches_apply_exactly_or_stop_the_build(tmp_path: Path) -> None:
    """build_engine applies patches without a ``patch`` program; a hunk that does not fit the
    source stops the build instead of being skipped."""
    source = tmp_path / "pkg" / "src"
    source.mkdir(parents=True)
    (source / "a.cpp").write_text("int a = 1;\nint b = 2;\nint c = 3;\n")
    diff = (
        "header text is ignored\n"
        "--- a/src/a.cpp\n+++ b/src/a.cpp\n@@ -1,3 +1,3 @@\n"
        " int a = 1;\n-int b = 2;\n+int b = 20;\n int c = 3;\n"
    )
    assert build_engine.apply_patch(diff, tmp_path / "pkg") == [source / "a.cpp"]
    assert (source / "a.cpp").read_text() == "int a = 1;\nint b = 20;\nint c = 3;\n"
    with pytest.raises(SystemExit, match="does not apply"):
        build_engine.apply_patch(diff, tmp_path / "pkg")  # already applied: b is 20 now
