"""``edge-agent models convert``: Hugging Face / sentence-transformers directories into the store.

The BERT path runs on the real all-MiniLM-L6-v2 directory (the default model's weights package)
and is checked against sentence-transformers' own vectors; the Qwen3 path on the tiny random
Qwen3 directory of bench/qwen3_fixture.py (its fidelity to transformers is
test_qwen3_fidelity.py's). Errors are the typed ones a user sees.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.embedding.embedder import Embedder, EmbedderConfig
from edge_agent.errors import ErrorCode, InvalidArgument, ModelFileError
from edge_agent.models import ModelStore
from edge_agent.models.convert_hf import convert_model
from edge_agent.models.default import default_model_source_dir
from edge_agent.models.gguf_meta import read_gguf_info

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import qwen3_fixture


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the MiniLM directory (tests edit their own copies of it)."""
    target = tmp_path_factory.mktemp("minilm") / "all-MiniLM-L6-v2"
    shutil.copytree(default_model_source_dir(), target)
    return target


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qwen3_fixture.write_model_dir(
        tmp_path_factory.mktemp("qwen3") / "tiny-qwen3", qwen3_fixture.SHAPES["tiny"], seed=2
    )


def _cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "--models-dir", str(store), "models", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_converts_a_bert_directory_that_matches_sentence_transformers(
    minilm_dir: Path, tmp_path: Path, reference: tuple[list[str], np.ndarray]
) -> None:
    result = _cli(tmp_path, "convert", str(minilm_dir), "--name", "minilm", "--quants", "F16,q8_0")
    assert result.returncode == 0, result.stderr
    assert "minilm: bert, 384 dims, mean pooling" in result.stdout
    store = ModelStore(tmp_path)
    manifest = store.get("minilm")
    assert set(manifest.files) == {"F16", "Q8_0"}
    assert manifest.preferred_quants == ("Q8_0", "F16")
    assert manifest.source.startswith(f"convert:{minilm_dir}")
    for quant, entry in manifest.files.items():
        info = read_gguf_info(store.model_dir("minilm") / entry.path)
        assert (info.architecture, info.pooling, info.quant) == ("bert", "mean", quant)
    sentences, expected = reference
    with Embedder.open(store, "minilm", "F16", EmbedderConfig(threads=2)) as embedder:
        got = embedder.embed(sentences).vectors
    cosines = np.sum(got * expected, axis=1)
    assert cosines.min() > 0.999, cosines


def test_bert_pooling_comes_from_the_sentence_transformers_config(
    minilm_dir: Path, tmp_path: Path
) -> None:
    cls_dir = tmp_path / "minilm-cls"
    shutil.copytree(minilm_dir, cls_dir)
    pooling = cls_dir / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(config))
    (cls_dir / "vocab.txt").unlink()  # the WordPiece vocabulary is then read from tokenizer.json
    store = ModelStore(tmp_path / "store")
    manifest = convert_model(store, cls_dir, quants=("F16",))
    assert (manifest.name, manifest.pooling) == ("minilm-cls", "cls")
    mean = convert_model(store, minilm_dir, name="minilm-mean", quants=("F16",))
    texts = ["the cat sat on the mat", "edge devices embed text locally"]
    with Embedder.open(store, manifest.name, "F16", EmbedderConfig(threads=2)) as embedder:
        cls_vectors = embedder.embed(texts).vectors
    with Embedder.open(store, mean.name, "F16", EmbedderConfig(threads=2)) as embedder:
        mean_vectors = embedder.embed(texts).vectors
    # Same weights and vocabulary, another pooling: other vectors.
    assert np.sum(cls_vectors * mean_vectors, axis=1).max() < 0.99


def test_unsupported_pooling_is_a_typed_error(minilm_dir: Path, tmp_path: Path) -> None:
    max_dir = tmp_path / "minilm-max"
    shutil.copytree(minilm_dir, max_dir)
    pooling = max_dir / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    pooling.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"pooling_mode_max_tokens.*supported poolings"):
        convert_model(ModelStore(tmp_path / "store"), max_dir, quants=("F16",))


def test_unsupported_architecture_names_what_is_supported(tmp_path: Path) -> None:
    source = tmp_path / "t5"
    source.mkdir()
    (source / "config.json").write_text(
        json.dumps({"model_type": "t5", "architectures": ["T5EncoderModel"]})
    )
    with pytest.raises(ModelFileError) as caught:
        convert_model(ModelStore(tmp_path / "store"), source)
    assert caught.value.code == ErrorCode.MODEL_FILE_ERROR
    assert "'t5'" in caught.value.message
    assert "bert" in caught.value.message and "qwen3" in caught.value.message
    # The command line says the same and exits non-zero, with no traceback.
    result = _cli(tmp_path / "store", "convert", str(source))
    assert result.returncode != 0
    assert "supported model types: bert" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_directory_and_unknown_quant_are_typed_errors(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(ModelFileError, match="not a directory"):
        convert_model(store, tmp_path / "nowhere")
    with pytest.raises(InvalidArgument, match="unknown quant 'Q3_X'"):
        convert_model(store, qwen3_dir, quants=("F16", "Q3_X"))


def test_qwen3_directory_becomes_an_instruction_aware_last_token_model(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path)
    manifest = convert_model(store, qwen3_dir, quants=("F16", "Q8_0"))
    assert manifest.name == "tiny-qwen3"
    assert (manifest.architecture, manifest.dims, manifest.pooling) == ("qwen3", 64, "last")
    assert manifest.max_tokens == qwen3_fixture.SHAPES["tiny"].context
    # From config_sentence_transformers.json's query prompt.
    assert manifest.query_template == "Instruct: {task}\nQuery:{text}"
    assert manifest.default_task == (
        "Given a web search query, retrieve relevant passages that answer the query"
    )
    assert manifest.document_template is None
    assert manifest.matryoshka_dims == (32,)
    path = store.model_dir(manifest.name) / manifest.files["Q8_0"].path
    info = read_gguf_info(path)
    assert (info.architecture, info.pooling, info.quant) == ("qwen3", "last", "Q8_0")


def test_convert_is_idempotent_and_adds_missing_quants(qwen3_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = convert_model(store, qwen3_dir, name="q", quants=("F16",))
    f16 = store.model_dir("q") / first.files["F16"].path
    written = f16.stat().st_mtime_ns
    again = convert_model(store, qwen3_dir, name="q", quants=("F16",))
    assert again == first
    assert f16.stat().st_mtime_ns == written  # nothing rewritten
    more = convert_model(store, qwen3_dir, name="q", quants=("F16", "Q8_0"))
    assert set(more.files) == {"F16", "Q8_0"}
    assert more.files["F16"] == first.files["F16"]
    assert f16.stat().st_mtime_ns == written
    # A damaged file is rebuilt rather than trusted.
    f16.write_bytes(f16.read_bytes()[:-10] + b"\0" * 10)
    repaired = convert_model(store, qwen3_dir, name="q", quants=("F16", "Q8_0"))
    assert repaired.files["F16"].sha256 == first.files["F16"].sha256
    assert store.verify_all("q") == {"F16": "ok", "Q8_0": "ok"}


def test_same_name_from_another_source_is_refused(
    qwen3_dir: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path)
    convert_model(store, qwen3_dir, name="taken", quants=("F16",))
    with pytest.raises(InvalidArgument, match="already exists from another source"):
        convert_model(store, minilm_dir, name="taken", quants=("F16",))
    assert store.get("taken").architecture == "qwen3"


def test_bf16_weights_are_widened_exactly(tmp_path: Path) -> None:
    """Real Qwen3 checkpoints are bf16 (numpy has no bf16): the reader widens them."""
    from edge_agent.models.convert_tensors import open_tensors

    shape = qwen3_fixture.Shape("bf16", 1, 64, 128, 4, 2, 16, 300, 512, "BF16")
    qwen3_fixture.write_weights(tmp_path / "model.safetensors", shape, seed=3)
    tensors = open_tensors(tmp_path)
    embd = tensors.get("embed_tokens.weight")
    assert embd.dtype == np.float32 and embd.shape == (300, 64)
    # bf16 values: the low 16 bits of each float32 are zero, and they are not all zero.
    assert not np.any(embd.view(np.uint32) & 0xFFFF)
    assert np.abs(embd).mean() > 0.5
