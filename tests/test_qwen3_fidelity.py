"""Our Qwen3 conversion against the reference implementation, on the same random weights.

A tiny Qwen3 model (2 layers, the real structure: grouped-query attention, q/k norms, tied
embeddings, byte-level BPE with the Qwen2 pre-tokenizer) is written as a Hugging Face directory
by bench/qwen3_fixture.py, converted by ``models convert``, and embedded through our Embedder;
the reference is ``transformers``' Qwen3Model in float32 with last-token pooling and L2
normalisation, as the Qwen3-Embedding model card does it (its tokenizer appends <|endoftext|>).
The real-shape comparison is bench/qwen3_bench.py's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch  # the CPU build, pinned by the Makefile's test-deps (never a bare `torch`)
import transformers

from edge_agent.embedding.embedder import Embedder, EmbedderConfig
from edge_agent.models import ModelManifest, ModelStore
from edge_agent.models.convert_hf import convert_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import qwen3_fixture

NAME = "tiny-qwen3-hf"
MAX_SEQUENCE = 128  # the engine's batch (and longest sequence): one text below is longer
TASK = "Given a web search query, retrieve relevant passages that answer the query"
CUSTOM_TASK = "Find the source code that implements the described function"

DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embedding models turn text into vectors; similar texts get similar vectors.",
    "今天天气很好，我们去公园散步吧。",
    "机器学习模型可以把文本变成向量，用于语义搜索。",
    "Mixed 中文 and English text, with numbers 12345 and symbols #@!",
    "edge-agent runs llama.cpp in a child process.",
]
QUERIES = [("what is a vector embedding", TASK), ("a function that parses JSON", CUSTOM_TASK)]
LONG = " ".join(f"sentence {i} about search, indexes and small devices." for i in range(60))


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelStore, ModelManifest]:
    hf_dir = qwen3_fixture.write_model_dir(
        tmp_path_factory.mktemp("qwen3-hf") / "tiny", qwen3_fixture.SHAPES["tiny"], seed=1
    )
    store = ModelStore(tmp_path_factory.mktemp("qwen3-store"))
    return hf_dir, store, convert_model(store, hf_dir, name=NAME, quants=("F16", "Q8_0"))


class Reference:
    """transformers' Qwen3Model, fp32, last token (the appended <|endoftext|>), L2-normalised."""

    def __init__(self, hf_dir: Path) -> None:
        torch.manual_seed(0)
        self.model = transformers.Qwen3Model.from_pretrained(
            str(hf_dir), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.tokenizer = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        self.eos = self.tokenizer.token_to_id(qwen3_fixture.EOS)

    def ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text).ids)
        assert ids[-1] == self.eos  # the post-processor's <|endoftext|>
        return ids

    def embed_ids(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        vector = out.numpy().astype(np.float64)
        return vector / np.linalg.norm(vector)

    def embed(self, text: str) -> np.ndarray:
        return self.embed_ids(self.ids(text))


@pytest.fixture(scope="module")
def reference(converted: tuple[Path, ModelStore, ModelManifest]) -> Reference:
    return Reference(converted[0])


@pytest.fixture(scope="module", params=["F16", "Q8_0"])
def ours(
    request: pytest.FixtureRequest, converted: tuple[Path, ModelStore, ModelManifest]
) -> Iterator[tuple[str, Embedder]]:
    _, store, _ = converted
    config = EmbedderConfig(threads=2, batch_tokens=64, max_sequence_tokens=MAX_SEQUENCE)
    with Embedder(store.resolve(NAME, request.param), config) as embedder:
        yield request.param, embedder


# Both run with the engine's q8_0 KV cache (head_dim 32 here, as 128 in the real model):
# measured 0.99999 (F16) and 0.9999 (Q8_0) on this set.
FLOOR = {"F16": 0.999, "Q8_0": 0.999}


def test_documents_match_the_reference(ours: tuple[str, Embedder], reference: Reference) -> None:
    quant, embedder = ours
    result = embedder.embed(DOCUMENTS)  # packed into shared batches
    assert result.token_counts == [len(reference.ids(t)) for t in DOCUMENTS]
    for text, vector in zip(DOCUMENTS, result.vectors, strict=True):
        cosine = float(np.dot(vector, reference.embed(text)))
        assert cosine >= FLOOR[quant], (quant, text, cosine)


def test_queries_with_instructions_match_the_reference(
    ours: tuple[str, Embedder], reference: Reference
) -> None:
    quant, embedder = ours
    for text, task in QUERIES:
        instruction = None if task == TASK else task
        vector = embedder.embed([text], kind="query", instruction=instruction).vectors[0]
        expected = reference.embed(f"Instruct: {task}\nQuery:{text}")
        cosine = float(np.dot(vector, expected))
        assert cosine >= FLOOR[quant], (quant, text, cosine)
        # The instruction matters: the bare text is a different vector.
        assert float(np.dot(vector, reference.embed(text))) < 0.99


def test_text_longer_than_the_batch_is_truncated_like_the_reference(
    ours: tuple[str, Embedder], reference: Reference
) -> None:
    quant, embedder = ours
    ids = reference.ids(LONG)
    assert len(ids) > 2 * MAX_SEQUENCE
    result = embedder.embed([LONG, DOCUMENTS[0]], long_text="truncate")
    assert result.truncated == [True, False]
    # Truncation keeps the first tokens and the <|endoftext|> the pooling reads.
    expected = reference.embed_ids([*ids[: MAX_SEQUENCE - 1], reference.eos])
    cosine = float(np.dot(result.vectors[0], expected))
    assert cosine >= FLOOR[quant], (quant, cosine)
    assert float(np.dot(result.vectors[0], reference.embed_ids(ids))) < 0.99


def test_matryoshka_prefix_matches_the_reference(
    ours: tuple[str, Embedder],
    reference: Reference,
    converted: tuple[Path, ModelStore, ModelManifest],
) -> None:
    quant, embedder = ours
    assert converted[2].matryoshka_dims == (32,)
    vector = embedder.embed([DOCUMENTS[1]], dimensions=32).vectors[0]
    full = reference.embed(DOCUMENTS[1])[:32]
    cosine = float(np.dot(vector, full / np.linalg.norm(full)))
    assert cosine >= FLOOR[quant], (quant, cosine)


def test_a_sequence_split_across_micro_batches_matches_the_reference(
    converted: tuple[Path, ModelStore, ModelManifest], reference: Reference
) -> None:
    """Decoders run a 512-token batch in 256-token micro-batches (less compute buffer:
    engine.DECODER_MICRO_BATCH): a text longer than one micro-batch, and short ones packed
    behind it, still match the reference."""
    _, store, _ = converted
    config = EmbedderConfig(threads=2, batch_tokens=512, max_sequence_tokens=512)
    ids = reference.ids(LONG)
    assert len(ids) > 512
    with Embedder(store.resolve(NAME, "F16"), config) as embedder:
        assert embedder._inference.engine.micro_batch == 256
        result = embedder.embed([LONG, *DOCUMENTS], long_text="truncate")
    assert result.truncated == [True] + [False] * len(DOCUMENTS)
    expected = reference.embed_ids([*ids[:511], reference.eos])
    assert float(np.dot(result.vectors[0], expected)) >= FLOOR["F16"]
    for text, vector in zip(DOCUMENTS, result.vectors[1:], strict=True):
        assert float(np.dot(vector, reference.embed(text))) >= FLOOR["F16"], text
