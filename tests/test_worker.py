"""The process-isolated embedder: a dead engine costs a child process, never the caller."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest

from edge_agent.embedding.embedder import EmbedderConfig
from edge_agent.embedding.worker import ProcessEmbedder
from edge_agent.errors import EmptyText, EngineError, ErrorCode, InvalidArgument, ModelNotFound
from edge_agent.models import DEFAULT_MODEL, ModelStore


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


# -- the event-loop path the daemon uses (submit) -------------------------------------------------


def test_submit_gives_the_same_vectors_as_embed(process_embedder: ProcessEmbedder) -> None:
    texts = ["the event loop path", "and a second text"]

    async def run() -> np.ndarray:
        return (await process_embedder.submit(texts, kind="query")).vectors

    from_loop = asyncio.run(run())
    direct = process_embedder.embed(texts, kind="query").vectors
    np.testing.assert_allclose(from_loop, direct, atol=1e-6)
    assert from_loop.flags.writeable  # callers may normalise or slice in place


def test_submit_errors_are_typed(process_embedder: ProcessEmbedder) -> None:
    async def run() -> None:
        with pytest.raises(EmptyText) as caught:
            await process_embedder.submit(["fine", "   "])
        assert caught.value.data == {"index": 1}
        assert (await process_embedder.submit(["still fine"])).vectors.shape == (1, 384)

    asyncio.run(run())


@pytest.mark.parametrize("fatal", [signal.SIGABRT, signal.SIGKILL])
def test_submit_crash_mid_call_fails_that_call_and_the_next_restarts(
    process_embedder: ProcessEmbedder, fatal: signal.Signals
) -> None:
    before = process_embedder.restarts

    async def run() -> None:
        pid = process_embedder.pid
        assert pid is not None
        call = process_embedder.submit([f"sentence number {i}" for i in range(4000)])
        await asyncio.sleep(0.5)
        os.kill(pid, fatal)
        with pytest.raises(EngineError) as caught:
            await call
        assert fatal.name in caught.value.message
        again = await process_embedder.submit(["after the crash"])
        assert again.vectors.shape == (1, 384)
        assert process_embedder.pid not in (None, pid)

    asyncio.run(run())
    assert process_embedder.restarts == before + 1


def test_submit_after_the_child_died_while_idle_restarts_it(
    process_embedder: ProcessEmbedder,
) -> None:
    """A child killed between requests (the OOM killer, an operator) costs no request."""
    before = process_embedder.restarts
    pid = process_embedder.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)

    async def run() -> np.ndarray:
        return (await process_embedder.submit(["nobody noticed"])).vectors

    assert asyncio.run(run()).shape == (1, 384)
    assert process_embedder.restarts == before + 1 and process_embedder.pid != pid


def test_submit_cancelled_mid_call_does_not_mix_up_replies(
    process_embedder: ProcessEmbedder,
) -> None:
    """A caller that gives up leaves its request in the child: its late reply must never be
    taken for the next request's (the child is replaced instead)."""

    async def run() -> None:
        slow = process_embedder.submit([f"long batch {i}" for i in range(3000)])
        await asyncio.sleep(0.3)
        slow.cancel()
        fresh = await process_embedder.submit(["a short text", "and another"], kind="query")
        expected = process_embedder.embed(["a short text", "and another"], kind="query")
        np.testing.assert_allclose(fresh.vectors, expected.vectors, atol=1e-6)

    asyncio.run(run())


def test_submit_unresponsive_child_times_out(model_store: ModelStore) -> None:
    with ProcessEmbedder(
        model_store.resolve(DEFAULT_MODEL, "Q8_0"), EmbedderConfig(threads=1), call_timeout=1.0
    ) as embedder:
        pid = embedder.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # alive but never answering (a hung engine)

        async def run() -> None:
            started = time.monotonic()
            with pytest.raises(EngineError, match="no answer in 1s"):
                await embedder.submit(["anyone there?"])
            assert time.monotonic() - started < 10
            assert (await embedder.submit(["a fresh engine"])).vectors.shape == (1, 384)

        asyncio.run(run())
        assert embedder.restarts == 1
