"""The embedder on the real default model: fidelity to sentence-transformers, batching, limits."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_agent.embedding.embedder import Embedder, EmbedderConfig
from edge_agent.errors import EdgeAgentError, EmptyText, ErrorCode, InvalidArgument, TextTooLong
from edge_agent.models import DEFAULT_MODEL, ModelStore

# Minimum cosine to sentence-transformers' own vectors on the fixture sentences, per file.
# Measured here: F32/F16 1.0000, Q8_0 0.9992, Q6_K 0.9978, Q5_K_M 0.9911, Q4_K_M 0.9847,
# Q4_0 0.9353 (docs/benchmarks.md has the STS quality per quant).
QUANT_MIN_COSINE = {
    "F32": 0.9999,
    "F16": 0.999,
    "Q8_0": 0.998,
    "Q6_K": 0.995,
    "Q5_K_M": 0.985,
    "Q4_K_M": 0.975,
    "Q4_0": 0.90,
}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("quant", list(QUANT_MIN_COSINE))
def test_every_quant_reproduces_sentence_transformers(
    model_store: ModelStore, reference: tuple[list[str], np.ndarray], quant: str
) -> None:
    sentences, expected = reference
    with Embedder.open(model_store, DEFAULT_MODEL, quant, EmbedderConfig(threads=2)) as embedder:
        result = embedder.embed(sentences)
    assert result.vectors.dtype == np.float32 and result.vectors.shape == expected.shape
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert cosines(result.vectors, expected).min() >= QUANT_MIN_COSINE[quant]
    # The last fixture sentence is longer than 256 tokens: truncated exactly as the reference.
    assert result.truncated[-1] and not any(result.truncated[:-1])


def test_meaning_drives_similarity(embedder: Embedder) -> None:
    v = embedder.embed(
        [
            "A man is playing a guitar.",
            "Someone plays an instrument.",
            "The stock market crashed today.",
        ]
    ).vectors
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_results_do_not_depend_on_batching_or_order(embedder: Embedder, reference) -> None:
    sentences, _ = reference
    together = embedder.embed(sentences).vectors
    alone = np.vstack([embedder.embed([s]).vectors for s in sentences[:8]])
    reversed_ = embedder.embed(sentences[::-1]).vectors[::-1]
    assert cosines(together[:8], alone).min() > 0.9999
    assert cosines(together, reversed_).min() > 0.9999


def test_single_texts_match_sentence_transformers_with_and_without_the_solo_context(
    model_store: ModelStore, reference
) -> None:
    """A lone short text runs in the second context (no flash attention), a longer one and
    every batch in the main one: the vectors are the reference's either way."""
    sentences, expected = reference
    for solo in (256, 0):
        config = EmbedderConfig(threads=2, solo_tokens=solo)
        with Embedder.open(model_store, DEFAULT_MODEL, "F32", config) as embedder:
            alone = np.vstack([embedder.embed([s]).vectors for s in sentences])
        assert cosines(alone, expected).min() > 0.9999, solo


def test_tiny_batches_still_fit_the_longest_text(model_store: ModelStore, reference) -> None:
    """batch_tokens below max_tokens is raised to it: a 256-token text never overflows a batch
    (llama.cpp aborts the process on an encoder batch larger than n_ubatch)."""
    sentences, expected = reference
    config = EmbedderConfig(threads=2, batch_tokens=32, max_sequences=3)  # 256 % 3 != 0 too
    with Embedder.open(model_store, DEFAULT_MODEL, "F32", config) as embedder:
        result = embedder.embed(sentences)
    assert cosines(result.vectors, expected).min() > 0.9999


def test_long_text_modes(embedder: Embedder) -> None:
    long_text = " ".join(f"word{i} is followed by more words" for i in range(120))
    truncated = embedder.embed([long_text, "short"], long_text="truncate")
    assert truncated.truncated == [True, False]
    assert truncated.token_counts[0] > embedder.max_tokens
    chunked = embedder.embed([long_text], long_text="chunk")
    assert chunked.chunks[0] >= 3 and not chunked.truncated[0]
    assert abs(np.linalg.norm(chunked.vectors[0]) - 1) < 1e-5
    # The mean over chunks is not the same vector as the first window alone.
    assert float(chunked.vectors[0] @ truncated.vectors[0]) < 0.999
    with pytest.raises(TextTooLong) as caught:
        embedder.embed(["fine", long_text], long_text="error")
    assert caught.value.data["index"] == 1
    assert caught.value.data["tokens"] == truncated.token_counts[0]
    assert caught.value.code == ErrorCode.TEXT_TOO_LONG


@pytest.mark.parametrize(
    ("texts", "kwargs", "error", "code"),
    [
        ([""], {}, EmptyText, ErrorCode.EMPTY_TEXT),
        (["ok", "   \n\t "], {}, EmptyText, ErrorCode.EMPTY_TEXT),
        (["ok", 42], {}, InvalidArgument, ErrorCode.INVALID_ARGUMENT),
        ("a bare string", {}, InvalidArgument, ErrorCode.INVALID_ARGUMENT),
        ([], {}, InvalidArgument, ErrorCode.INVALID_ARGUMENT),
        (None, {}, InvalidArgument, ErrorCode.INVALID_ARGUMENT),
        (["ok"], {"kind": "passage"}, InvalidArgument, ErrorCode.INVALID_ARGUMENT),
        (["ok"], {"long_text": "drop"}, InvalidArgument, ErrorCode.INVALID_ARGUMENT),
        (["ok"], {"dimensions": 128}, InvalidArgument, ErrorCode.DIMENSIONS_NOT_SUPPORTED),
        (["ok"], {"dimensions": "384"}, InvalidArgument, ErrorCode.INVALID_ARGUMENT),
        (["ok"], {"instruction": "Find"}, InvalidArgument, ErrorCode.INVALID_ARGUMENT),
    ],
)
def test_bad_input_is_a_typed_error_and_the_embedder_survives(
    embedder: Embedder, texts, kwargs, error, code
) -> None:
    with pytest.raises(error) as caught:
        embedder.embed(texts, **kwargs)
    assert caught.value.code == code and caught.value.message
    assert embedder.embed(["still works"]).vectors.shape == (1, 384)


def test_limits_are_enforced(model_store: ModelStore) -> None:
    config = EmbedderConfig(threads=1, max_texts=3, max_text_bytes=100)
    with Embedder.open(model_store, DEFAULT_MODEL, "Q8_0", config) as embedder:
        assert embedder.embed(["a", "b", "c"]).vectors.shape == (3, 384)
        with pytest.raises(InvalidArgument, match="limit is 3"):
            embedder.embed(["a", "b", "c", "d"])
        assert embedder.embed(["x" * 100]).vectors.shape == (1, 384)
        with pytest.raises(TextTooLong):
            embedder.embed(["é" * 51])  # 102 UTF-8 bytes


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_tokens": 8},
        {"max_sequences": 0},
        {"threads": 0},
        {"max_texts": True},
        {"solo_tokens": -1},
    ],
)
def test_config_is_validated_once(kwargs) -> None:
    with pytest.raises(InvalidArgument):
        EmbedderConfig(**kwargs)


def test_concurrent_callers_get_their_own_results(embedder: Embedder, reference) -> None:
    sentences, _ = reference
    expected = embedder.embed(sentences).vectors
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            picked = [sentences[(i + j) % len(sentences)] for j in range(5)]
            results[i] = embedder.embed(picked).vectors
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    for i, got in results.items():
        want = np.vstack([expected[(i + j) % len(sentences)] for j in range(5)])
        assert cosines(got, want).min() > 0.9999
    assert len(results) == 12


def test_closed_embedder_refuses_work(model_store: ModelStore) -> None:
    embedder = Embedder.open(model_store, DEFAULT_MODEL, "Q4_0", EmbedderConfig(threads=1))
    embedder.close()
    embedder.close()  # idempotent
    with pytest.raises(EdgeAgentError, match="closed"):
        embedder.embed(["x"])
