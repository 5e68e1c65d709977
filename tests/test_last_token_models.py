"""Last-token-pooling (Qwen3-Embedding style) models, end to end through the real engine.

The model is the tiny random Qwen3 written by tinyqwen3.py: same llama.cpp graph, vocab type
and pooling as Qwen3-Embedding, a few hundred KB instead of hundreds of MB. Checks compare the
Embedder against a second, independent Engine fed hand-built token sequences, so they test
what the Embedder sends to the model rather than how it is written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tinyqwen3 import MODEL_NAME, write_tiny_qwen3_gguf

from edge_agent.embedding.embedder import Embedder, EmbedderConfig
from edge_agent.embedding.engine import Engine, EngineSettings
from edge_agent.errors import DimensionsNotSupported, ErrorCode, InvalidArgument, TextTooLong
from edge_agent.models import ModelManifest, ModelStore

NAME = "tiny-qwen3"
# 128 rather than the writer's default 64: with this byte-level toy vocab the Qwen3 default
# instruction alone is ~80 tokens, so at 64 every query would be truncated to the same prefix.
CONTEXT = 128
BATCH_TOKENS = 256  # room for several short sequences per batch, so packing is exercised
QUERY_TEMPLATE = "Instruct: {task}\nQuery:{text}"
DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"
POOLING_LAST = 3  # llama.cpp's LLAMA_POOLING_TYPE_LAST
SAME = 0.9999  # cosine above which two vectors count as the same embedding
DIFFERENT = 0.999  # cosine below which they count as different

SENTENCE = "the quick brown fox jumps over the lazy dog in the morning"


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(_unit(a), _unit(b)))


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen3_gguf(
        tmp_path_factory.mktemp("tiny-qwen3-src") / "tiny-qwen3.gguf", context_length=CONTEXT
    )


@pytest.fixture(scope="module")
def tiny_store(
    tmp_path_factory: pytest.TempPathFactory, tiny_source: Path
) -> tuple[ModelStore, ModelManifest]:
    store = ModelStore(tmp_path_factory.mktemp("tiny-qwen3-store"))
    return store, store.import_gguf(tiny_source, name=NAME)


@pytest.fixture(scope="module")
def tiny(tiny_store: tuple[ModelStore, ModelManifest]) -> Iterator[Embedder]:
    store, _ = tiny_store
    config = EmbedderConfig(threads=2, batch_tokens=BATCH_TOKENS)
    with Embedder(store.resolve(NAME), config) as emb:
        yield emb


@pytest.fixture(scope="module")
def engine(tiny_store: tuple[ModelStore, ModelManifest]) -> Iterator[Engine]:
    """A second engine on the same file, driven directly from the test thread as a reference."""
    store, _ = tiny_store
    settings = EngineSettings(
        threads=2, batch_tokens=BATCH_TOKENS, max_sequences=8, flash_attention=True
    )
    eng = Engine(store.resolve(NAME).path, settings)
    yield eng
    eng.close()


def _long_text(engine: Engine, min_tokens: int) -> tuple[str, list[int]]:
    # Words plus a counter, so no two windows of the text are alike (chunks must differ).
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    parts: list[str] = []
    while True:
        parts.append(f"{words[len(parts) % len(words)]} {len(parts)}")
        text = " ".join(parts)
        tokens = engine.tokenize(text, add_special=False)
        if len(tokens) >= min_tokens:
            return text, tokens


def _reference(engine: Engine, tokens: list[int]) -> np.ndarray:
    return _unit(np.frombuffer(engine.embed_batch([tokens]), dtype=np.float32))


# -- import ------------------------------------------------------------------------------------


def test_import_reads_qwen3_metadata_and_instruction_template(
    tiny_store: tuple[ModelStore, ModelManifest], tiny_source: Path
) -> None:
    store, manifest = tiny_store
    assert manifest.architecture == "qwen3"
    assert manifest.dims == 64
    assert manifest.pooling == "last"
    assert manifest.max_tokens == CONTEXT
    assert manifest.query_template == QUERY_TEMPLATE
    assert manifest.document_template is None
    assert manifest.default_task == DEFAULT_TASK
    assert manifest.matryoshka_dims == (32,)
    assert list(manifest.files) == ["F32"]

    # What `models list` shows is read back from disk, not the object import returned.
    (listed,) = store.list()
    assert listed == manifest
    assert listed.name == NAME
    assert listed.source == f"import:{tiny_source.name}"
    entry = listed.files["F32"]
    stored = store.model_dir(NAME) / entry.path
    assert entry.size == stored.stat().st_size == tiny_source.stat().st_size
    assert entry.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()


def test_import_without_a_name_uses_general_name(
    tmp_path: Path, tiny_source: Path
) -> None:
    manifest = ModelStore(tmp_path).import_gguf(tiny_source)
    assert manifest.name == MODEL_NAME


# -- last-token pooling reads an appended EOS ---------------------------------------------------


def test_tokenizer_itself_does_not_append_eos(engine: Engine) -> None:
    # Precondition of the EOS tests below: otherwise they could pass without the embedder's help.
    assert engine.pooling == POOLING_LAST
    assert not engine.add_eos
    assert not engine.add_bos
    content = engine.tokenize(SENTENCE, add_special=False)
    assert engine.tokenize(SENTENCE, add_special=True) == content
    assert engine.eos >= 0
    assert engine.eos not in content


def test_embedding_is_the_state_at_an_appended_eos(tiny: Embedder, engine: Engine) -> None:
    assert tiny.pooling == POOLING_LAST
    content = engine.tokenize(SENTENCE, add_special=False)
    result = tiny.embed([SENTENCE])
    assert result.token_counts == [len(content) + 1]
    assert result.truncated == [False]
    got = result.vectors[0]
    assert _cos(got, _reference(engine, [*content, engine.eos])) > SAME
    # The EOS changes the vector, so a missing EOS would be caught by the check above.
    assert _cos(got, _reference(engine, content)) < DIFFERENT


def test_truncated_text_keeps_eos_last(tiny: Embedder, engine: Engine) -> None:
    text, content = _long_text(engine, CONTEXT + 20)
    result = tiny.embed([text], long_text="truncate")
    assert result.truncated == [True]
    assert result.token_counts == [len(content) + 1]
    assert result.token_counts[0] > tiny.max_tokens == CONTEXT
    assert result.chunks == [1]
    got = result.vectors[0]
    # Room for the EOS is made by cutting text, not by cutting the EOS off the end.
    assert _cos(got, _reference(engine, [*content[: CONTEXT - 1], engine.eos])) > SAME
    assert _cos(got, _reference(engine, content[:CONTEXT])) < DIFFERENT


# -- instructions ------------------------------------------------------------------------------


def test_query_gets_the_default_instruction(tiny: Embedder) -> None:
    query = tiny.embed(["what is rust"], kind="query").vectors[0]
    templated = f"Instruct: {DEFAULT_TASK}\nQuery:what is rust"
    assert _cos(query, tiny.embed([templated], kind="document").vectors[0]) > SAME
    assert _cos(query, tiny.embed(["what is rust"], kind="document").vectors[0]) < DIFFERENT


def test_query_with_a_custom_instruction(tiny: Embedder) -> None:
    custom = tiny.embed(["what is rust"], kind="query", instruction="Find code").vectors[0]
    templated = "Instruct: Find code\nQuery:what is rust"
    assert _cos(custom, tiny.embed([templated], kind="document").vectors[0]) > SAME
    default = tiny.embed(["what is rust"], kind="query").vectors[0]
    assert _cos(custom, default) < DIFFERENT


def test_instruction_on_documents_is_rejected(tiny: Embedder) -> None:
    with pytest.raises(InvalidArgument) as caught:
        tiny.embed(["what is rust"], kind="document", instruction="Find code")
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("instruction", ["", "   "])
def test_blank_instruction_is_rejected(tiny: Embedder, instruction: str) -> None:
    with pytest.raises(InvalidArgument):
        tiny.embed(["what is rust"], kind="query", instruction=instruction)


@pytest.mark.parametrize("kind", ["query", "document"])
def test_minilm_takes_no_instruction(embedder: Embedder, kind: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        embedder.embed(["what is rust"], kind=kind, instruction="Find code")  # type: ignore[arg-type]
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT


def test_instruction_text_is_taken_literally(tiny: Embedder) -> None:
    instruction = "Match {text} exactly"
    got = tiny.embed(["what is rust"], kind="query", instruction=instruction).vectors[0]
    templated = f"Instruct: {instruction}\nQuery:what is rust"
    assert _cos(got, tiny.embed([templated], kind="document").vectors[0]) > SAME


# -- dimensions (Matryoshka) -------------------------------------------------------------------


def test_dimensions_shortens_and_renormalises(tiny: Embedder) -> None:
    texts = [SENTENCE, "what is rust", "hello world"]
    full = tiny.embed(texts).vectors
    short = tiny.embed(texts, dimensions=32).vectors
    assert short.shape == (3, 32)
    assert short.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    expected = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-5)
    np.testing.assert_allclose(tiny.embed(texts, dimensions=64).vectors, full, atol=1e-6)


def test_undeclared_dimensions_are_rejected(tiny: Embedder) -> None:
    with pytest.raises(DimensionsNotSupported) as caught:
        tiny.embed(["what is rust"], dimensions=48)
    assert caught.value.data["allowed"] == [32]


def test_minilm_does_not_shorten(embedder: Embedder) -> None:
    with pytest.raises(DimensionsNotSupported):
        embedder.embed(["what is rust"], dimensions=128)


# -- long texts --------------------------------------------------------------------------------


def test_chunked_long_text(tiny: Embedder, engine: Engine) -> None:
    text, content = _long_text(engine, 3 * CONTEXT)
    result = tiny.embed([text], long_text="chunk")
    assert result.chunks[0] > 1
    assert result.truncated == [False]
    assert result.token_counts == [len(content) + 1]
    assert result.vectors.shape == (1, 64)
    assert np.linalg.norm(result.vectors[0]) == pytest.approx(1.0, abs=1e-5)
    # The text past the first window must count, unlike with truncation.
    truncated = tiny.embed([text], long_text="truncate").vectors[0]
    assert _cos(result.vectors[0], truncated) < DIFFERENT


def test_long_text_error_reports_token_count(tiny: Embedder, engine: Engine) -> None:
    text, content = _long_text(engine, CONTEXT + 20)
    with pytest.raises(TextTooLong) as caught:
        tiny.embed(["short one", text], long_text="error")
    assert caught.value.data["tokens"] == len(content) + 1
    assert caught.value.data["limit"] == CONTEXT
    assert caught.value.data["index"] == 1


# -- vector properties -------------------------------------------------------------------------


def test_vectors_are_normalised_deterministic_and_order_free(tiny: Embedder) -> None:
    # Different lengths, so one batch mixes sequences of different sizes under causal attention.
    texts = ["hello", SENTENCE, "what is the capital of France?"]
    first = tiny.embed(texts)
    second = tiny.embed(texts)
    assert first.vectors.dtype == np.float32
    assert first.vectors.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(first.vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first.vectors, second.vectors)

    for index, text in enumerate(texts):
        alone = tiny.embed([text]).vectors[0]
        assert _cos(first.vectors[index], alone) > SAME
    reversed_ = tiny.embed(texts[::-1]).vectors[::-1]
    for index in range(len(texts)):
        assert _cos(first.vectors[index], reversed_[index]) > SAME
    # Distinct texts give distinct vectors, so a mix-up of rows would not go unnoticed.
    similarity = first.vectors @ first.vectors.T
    assert np.all(similarity[~np.eye(3, dtype=bool)] < DIFFERENT)
