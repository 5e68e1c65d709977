"""Qwen3-Embedding's memory at real size: the guard reads each file's shape from its GGUF header
(layers, KV heads, vocabulary) and sizes a decoder's context by the batch, not by its 32k
training context. The 4B files are header-only GGUFs with the real model's metadata (8 GB of
weights cannot be part of a test); the manifest carries the published files' sizes.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import gguf
import pytest
from test_probe import load_host

from edge_agent.embedding.embedder import Embedder, EmbedderConfig
from edge_agent.models import ModelFile, ModelManifest, ModelStore
from edge_agent.models.convert_hf import convert_model
from edge_agent.models.gguf_meta import GgufInfo, read_gguf_info
from edge_agent.selection.choose import (
    InsufficientMemory,
    estimate_memory,
    kv_bytes_per_token,
    override_from,
    select,
)
from edge_agent.selection.profiles import load_profiles

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import qwen3_fixture  # noqa: E402

GIB = 1 << 30
VOCAB = 151_669
# Published Qwen3-Embedding-4B GGUF sizes (bytes).
SIZES_4B = {
    "F16": 8_050_000_000,
    "Q8_0": 4_280_000_000,
    "Q6_K": 3_310_000_000,
    "Q5_K_M": 2_890_000_000,
    "Q4_K_M": 2_500_000_000,
}


def _header_only_gguf(path: Path, layers: int, dims: int, heads: int, kv_heads: int) -> Path:
    """A GGUF with Qwen3-Embedding's metadata and full vocabulary but no tensors."""
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_block_count(layers)
    writer.add_embedding_length(dims)
    writer.add_context_length(32768)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(128)
    writer.add_value_length(128)
    writer.add_pooling_type(gguf.PoolingType.LAST)
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _manifest(name: str, dims: int, sizes: dict[str, int]) -> ModelManifest:
    return ModelManifest(
        name=name,
        source="test",
        architecture="qwen3",
        dims=dims,
        pooling="last",
        max_tokens=32768,
        files={
            q: ModelFile(quant=q, path=f"{name}.{q}.gguf", sha256=f"sha-{q}", size=size)
            for q, size in sizes.items()
        },
    )


@pytest.fixture(scope="module")
def shape_4b(tmp_path_factory: pytest.TempPathFactory) -> GgufInfo:
    path = _header_only_gguf(tmp_path_factory.mktemp("4b") / "4b.gguf", 36, 2560, 32, 8)
    return read_gguf_info(path)


@pytest.fixture(scope="module")
def shape_06b(tmp_path_factory: pytest.TempPathFactory) -> GgufInfo:
    path = _header_only_gguf(tmp_path_factory.mktemp("06b") / "06b.gguf", 28, 1024, 16, 8)
    return read_gguf_info(path)


def test_the_header_gives_the_shape(shape_4b: GgufInfo) -> None:
    assert (shape_4b.layers, shape_4b.kv_heads, shape_4b.key_length) == (36, 8, 128)
    assert shape_4b.value_length == 128 and shape_4b.vocab_size == VOCAB
    # q8_0 K and V: 36 layers x 8 heads x 256 values x 34/32 bytes per token.
    assert kv_bytes_per_token(2560, True, shape_4b) == 36 * 8 * 256 * 34 // 32
    assert kv_bytes_per_token(2560, False, shape_4b) == 36 * 8 * 256 * 2  # f16 without FA


def test_estimate_matches_the_measured_06b(shape_06b: GgufInfo) -> None:
    """docs/benchmarks.md: the 0.6B shape at Q8_0 (638 MB file) served at 829 MB peak RSS
    (daemon + engine child) with a 512-token batch in 256-token micro-batches (856 MB
    before them and the engine child's lighter import: the estimate stays an upper bound)."""
    need = estimate_memory(638_000_000, 1024, 512, 64, True, decoder=True, shape=shape_06b)
    assert 829_000_000 <= need <= 829_000_000 * 1.05


def test_4gb_box_refuses_4b_at_f16_and_picks_a_quant_that_fits(shape_4b: GgufInfo) -> None:
    laptop = load_host("x86-avx2-laptop")
    host = dataclasses.replace(
        laptop, cgroup=dataclasses.replace(laptop.cgroup, memory_limit=4 * GIB)
    )
    profiles = load_profiles()
    manifest = _manifest("qwen3-embedding-4b", 2560, SIZES_4B)
    shapes = {q: shape_4b for q in SIZES_4B}
    with pytest.raises(InsufficientMemory) as caught:
        select(host, profiles, manifest, override=override_from({"quant": "F16"}), shapes=shapes)
    error = caught.value
    assert "F16 needs 7." in error.message and "cgroup memory limit 4.00 GiB" in error.message
    assert error.data["needed"] > SIZES_4B["F16"] and error.data["needed"] > error.data["budget"]

    selection = select(host, profiles, manifest, shapes=shapes)
    decision = selection.decision
    rejected = dict(selection.rejected)
    assert {"F16", "Q8_0"} <= set(rejected) and "over the budget of 3.50 GiB" in rejected["F16"]
    assert decision.quant == "Q6_K" and decision.memory_needed <= selection.budget.budget
    # The estimate is the file + this shape's KV cache for the batch + buffers + processes.
    expected = estimate_memory(
        SIZES_4B["Q6_K"],
        2560,
        decision.batch_tokens,
        decision.max_sequences,
        selection.profile.flash_attention,
        decoder=True,
        shape=shape_4b,
    )
    assert decision.memory_needed == expected
    assert decision.max_context == max(decision.batch_tokens, 512)  # not the profile's 4096


def test_decoder_context_is_bounded_by_the_batch_not_the_32k_training_context(
    tmp_path: Path,
) -> None:
    """A real tiny Qwen3 GGUF through the embedder with the largest max_context allowed: the
    engine's batch (its n_ctx) stays at 512 tokens, not the model's context, and long texts
    follow long_text."""
    hf_dir = qwen3_fixture.write_model_dir(tmp_path / "hf", qwen3_fixture.SHAPES["tiny"], seed=2)
    store = ModelStore(tmp_path / "store")
    convert_model(store, hf_dir, name="tiny", quants=("F16",))
    assert store.get("tiny").max_tokens > 128
    config = EmbedderConfig(threads=1, batch_tokens=128, max_sequences=4, max_sequence_tokens=32768)
    # The tiny fixture's own context is 2048: a decoder gets 512 (DECODER_CONTEXT) at most.
    with Embedder(store.resolve("tiny", "F16"), config) as embedder:
        assert embedder.max_tokens == 512
        assert embedder._inference.engine.settings.batch_tokens == 512
        long = "word " * 3000
        result = embedder.embed([long, "short"], long_text="chunk")
        assert len(result.vectors) == 2 and result.chunks[0] > 1 and result.chunks[1] == 1
