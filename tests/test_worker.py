"""The process-isolated embedder: a dead engine costs a child process, never the caller."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from edge_agent.embedder import EmbedderConfig
from edge_agent.errors import EmptyText, EngineError, ErrorCode, InvalidArgument, ModelNotFound
from edge_agent.models import DEFAULT_MODEL, ModelStore
from edge_agent.worker import ProcessEmbedder


@pytest.fixture(scope="module")
def process_embedder(model_store: ModelStore):
    with ProcessEmbedder.open(model_store, DEFAULT_MODEL, "Q8_0", EmbedderConfig(threads=1)) as emb:
        yield emb


def test_same_vectors_as_in_process(process_embedder: ProcessEmbedder, reference) -> None:
    sentences, expected = reference
    result = process_embedder.embed(sentences)
    assert result.vectors.shape == expected.shape
    assert ((result.vectors * expected).sum(axis=1)).min() > 0.998
    assert process_embedder.pid != os.getpid()
    assert process_embedder.max_tokens == 256 and process_embedder.dims == 384


def test_typed_errors_cross_the_process_boundary(process_embedder: ProcessEmbedder) -> None:
    with pytest.raises(EmptyText) as caught:
        process_embedder.embed(["ok", ""])
    assert caught.value.code == ErrorCode.EMPTY_TEXT and caught.value.data == {"index": 1}
    with pytest.raises(InvalidArgument, match="texts\\[0\\] is object"):
        process_embedder.embed([object()])
    with pytest.raises(InvalidArgument, match="cannot be sent"):
        process_embedder.embed([lambda: None])  # unpicklable: refused before the pipe
    assert process_embedder.embed(["still fine"]).vectors.shape == (1, 384)


@pytest.mark.parametrize("fatal", [signal.SIGABRT, signal.SIGKILL])
def test_a_crash_mid_call_is_an_engine_error_and_the_next_call_restarts(
    process_embedder: ProcessEmbedder, fatal: signal.Signals
) -> None:
    before = process_embedder.restarts
    pid = process_embedder.pid
    assert pid is not None
    outcome: dict[str, BaseException | object] = {}

    def long_call() -> None:
        try:
            outcome["result"] = process_embedder.embed(
                [f"sentence number {i}" for i in range(4000)]
            )
        except BaseException as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=long_call)
    caller.start()
    time.sleep(0.5)  # the child is busy embedding 4000 texts (several seconds on one thread)
    os.kill(pid, fatal)  # what a GGML_ASSERT abort or the OOM killer does to the engine
    caller.join(timeout=60)
    error = outcome.get("error")
    assert isinstance(error, EngineError), outcome
    assert fatal.name in error.message
    # The caller is alive; the next call transparently starts a fresh engine.
    again = process_embedder.embed(["after the crash"])
    assert np.isclose(np.linalg.norm(again.vectors[0]), 1.0, atol=1e-5)
    assert process_embedder.restarts == before + 1 and process_embedder.pid != pid


def test_a_model_that_cannot_load_is_a_typed_error(model_store: ModelStore) -> None:
    with pytest.raises(ModelNotFound):
        ProcessEmbedder.open(model_store, "no-such-model")
