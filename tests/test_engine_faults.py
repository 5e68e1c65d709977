"""Field faults of the engine child (issue #12): a stopped engine, bulk work in front of a
query, a parent that dies, memory after an oversized batch, other processes on the CPUs.

Real daemon, real sockets, the real default model; the engine is stopped with SIGSTOP as a hung
or swapped-out process looks from outside.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon import ServerThread, options_for

from edge_agent import Client
from edge_agent.embedding.embedder import EmbedderConfig
from edge_agent.embedding.worker import ProcessEmbedder
from edge_agent.embedding.workload import DeadlinePolicy, WorkModel
from edge_agent.errors import EdgeAgentError, EngineError, ErrorCode, TextTooLong
from edge_agent.hardware.load import LoadSampler, ThreadGovernor
from edge_agent.models import DEFAULT_MODEL, ModelStore
from edge_agent.options import ServiceConfig

DOCUMENT = (
    "The index keeps a write-ahead log and periodic snapshots, so every acknowledged document"
    " survives a crash; searches read a consistent view while a single writer appends. "
) * 4  # ~700 characters, like the chunks a file indexer sends


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def daemon(model_store: ModelStore, tmp_path: Path) -> Iterator[ServerThread]:
    thread = ServerThread(
        options_for(
            model_store,
            tmp_path / "faults.sock",
            quant="Q8_0",
            service=ServiceConfig(liveness_interval_s=0.5, call_deadline_floor_s=1.0),
        )
    ).start()
    try:
        yield thread
    finally:
        thread.stop()


def _engine_pid(client: Client) -> int:
    pid = client.stats()["memory"]["engine_pid"]
    assert isinstance(pid, int)
    return pid


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


# -- a stopped engine -----------------------------------------------------------------------------


def test_stopped_engine_mid_batch_is_replaced_and_no_request_fails(daemon: ServerThread) -> None:
    """SIGSTOP while a bulk request is in the engine: the stalled call is killed at its
    deadline and retried on a fresh child; a query typed meanwhile is answered within seconds,
    and neither request fails (whichever of them was in the engine at the stop)."""
    with Client(daemon.socket_path, timeout=60.0) as client:
        client.embed(["warm up"])
        pid = _engine_pid(client)
        outcome: dict[str, Any] = {}
        started = threading.Event()

        def bulk() -> None:
            with Client(daemon.socket_path, timeout=60.0) as other:
                started.set()
                try:
                    outcome["rows"] = other.embed([f"{DOCUMENT} {i}" for i in range(600)]).vectors
                except EdgeAgentError as exc:
                    outcome["error"] = exc

        caller = threading.Thread(target=bulk)
        caller.start()
        started.wait(10)
        time.sleep(0.5)  # the bulk request is in the engine now
        os.kill(pid, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            result = client.embed(["a question typed while the engine hangs"], kind="query")
            waited = time.monotonic() - stopped_at
        finally:
            _resume(pid)
        caller.join(60)
        assert result.vectors.shape == (1, 384)
        # The stalled call's deadline (1 s floor + its work here) plus a fresh child's start
        # (model load and warm-up): ~2-3 s on an idle 2-core box, ~6 s with a busy loop beside
        # it. The bound is what matters to the user: seconds, not the old 600 s.
        assert waited < 12.0, (waited, outcome)
        assert "error" not in outcome, outcome
        rows = outcome["rows"]
        assert rows.shape == (600, 384)
        # Every row is a real embedding of its own text, the retried slice included.
        assert np.all(np.abs(np.linalg.norm(rows, axis=1) - 1.0) < 1e-3)
        assert len({row.tobytes() for row in rows}) == 600
        stats = client.stats()
        assert stats["embed"]["deadline_failures"] == 1
        assert stats["embed"]["stall_retries"] >= 1
        assert stats["memory"]["engine_pid"] not in (None, pid)
        assert client.health()["status"] == "ok"


class _StallingEngine(ProcessEmbedder):
    """A real engine child that is SIGSTOPped just before each of its next ``stalls`` embed
    requests reaches it: a hang at the worst moment, on demand. (Catching a freshly restarted
    child from outside before it answers is a race a test cannot win every time.)"""

    stalls = 0

    def _send(self, request: tuple[Any, ...]) -> None:
        if request != "ping" and self.stalls > 0 and self.pid is not None:
            self.stalls -= 1
            os.kill(self.pid, signal.SIGSTOP)
        super()._send(request)


@pytest.mark.parametrize("stalls", [1, 2])
def test_a_stalled_call_is_retried_once_on_a_fresh_engine(
    model_store: ModelStore, stalls: int
) -> None:
    from edge_agent.daemon.service import Service

    engine = _StallingEngine(model_store.resolve(DEFAULT_MODEL, "Q8_0"), EmbedderConfig(threads=1))
    service = Service(engine, ServiceConfig(call_deadline_floor_s=0.5, liveness_interval_s=0))

    async def scenario() -> tuple[Any, float]:
        await service.start()
        try:
            engine.stalls = stalls
            began = time.monotonic()
            try:
                outcome: Any = await service.call(
                    "embed", [{"texts": ["stalled once", "or twice"]}]
                )
            except EdgeAgentError as exc:
                outcome = exc
            return outcome, time.monotonic() - began
        finally:
            await service.close(grace=1.0)

    import asyncio

    outcome, took = asyncio.run(scenario())
    assert service.deadline_failures == stalls, (outcome, took, engine.stalls)
    assert service.stall_retries == 1
    assert engine.restarts == 1  # the retry's child (after a second stall, none is needed yet)
    if stalls == 1:  # a stall is not the input's fault: the retry on the fresh child answers
        assert isinstance(outcome, dict) and outcome["count"] == 2, outcome
    else:  # stalling a second engine too: the request fails, typed, after two deadlines
        assert isinstance(outcome, EngineError) and outcome.code == ErrorCode.ENGINE_ERROR
        assert "no answer in" in outcome.message
    assert took < 30.0


def test_stopped_idle_engine_is_found_and_replaced(daemon: ServerThread) -> None:
    with Client(daemon.socket_path, timeout=60.0) as client:
        client.embed(["warm up"])
        pid = _engine_pid(client)
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10
            while client.stats()["embed"]["liveness_failures"] == 0:
                assert time.monotonic() < deadline, "the liveness check never fired"
                time.sleep(0.1)
        finally:
            _resume(pid)
        # No request failed: the next one runs on the replacement.
        assert client.embed(["after the hang"]).vectors.shape == (1, 384)
        assert _engine_pid(client) != pid
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


# -- bulk work and queries ----------------------------------------------------------------------


def test_query_goes_ahead_of_a_bulk_request(daemon: ServerThread) -> None:
    """A search app indexing in the background: the query answers while the bulk request is
    still running, not after it."""
    with Client(daemon.socket_path, timeout=120.0) as client:
        client.embed(["warm up"])
        finished: dict[str, float] = {}
        started = threading.Event()

        def bulk() -> None:
            with Client(daemon.socket_path, timeout=120.0) as other:
                started.set()
                other.embed([f"{DOCUMENT} {i}" for i in range(150)])
                finished["bulk"] = time.monotonic()

        caller = threading.Thread(target=bulk)
        caller.start()
        started.wait(10)
        time.sleep(0.3)
        client.embed(["where is the write-ahead log?"], kind="query")
        finished["query"] = time.monotonic()
        caller.join(120)
        assert finished["query"] < finished["bulk"]
        assert client.stats()["embed"]["sliced_requests"] >= 1


def test_sliced_requests_give_the_same_vectors_and_indices(
    daemon: ServerThread, embedder: Any
) -> None:
    texts = [f"{DOCUMENT} number {i}" for i in range(40)]
    with Client(daemon.socket_path, timeout=120.0) as client:
        got = client.embed(texts).vectors
        before = client.stats()["embed"]["sliced_requests"]
        assert before >= 1, "40 long texts should not fit one slice"
        # An input error only the engine finds, deep in a later slice: reported at its index
        # in the request, not in the slice.
        bad = [*texts[:30], "word " * 2000, *texts[30:]]
        with pytest.raises(TextTooLong) as info:
            client.embed(bad, long_text="error")
        assert info.value.data["index"] == 30
        assert "texts[30]" in info.value.message
    want = embedder.embed(texts).vectors  # in-process, F32: compare with the daemon's Q8_0
    cosines = np.sum(got * want, axis=1)
    assert cosines.min() > 0.98


# -- the engine child's own hygiene ---------------------------------------------------------------


def test_engine_child_exits_with_its_parent(model_store: ModelStore, tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from edge_agent.embedding.worker import ProcessEmbedder\n"
        "from edge_agent.embedding.embedder import EmbedderConfig\n"
        "from edge_agent.models import ModelStore\n"
        "store = ModelStore(sys.argv[1])\n"
        "emb = ProcessEmbedder(store.resolve(sys.argv[2], 'Q8_0'), EmbedderConfig(threads=1))\n"
        "print(emb.pid, flush=True)\n"
        "import threading\n"
        "threading.Thread(target=lambda: emb.embed(['x ' * 200] * 3000), daemon=True).start()\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(model_store.root), DEFAULT_MODEL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(0.5)  # mid-batch
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{child}").exists():
            stat = Path(f"/proc/{child}/stat").read_text()
            if stat.split(")")[-1].split()[0] == "Z":
                break
            assert time.monotonic() < deadline, "the engine child outlived its parent"
            time.sleep(0.05)
        assert parent.stderr is not None
        assert "Traceback" not in parent.stderr.read()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def test_engine_child_gives_memory_back_after_an_oversized_batch(model_store: ModelStore) -> None:
    """A 4,096-text call leaves the child no larger than ordinary batches do. (The first
    multi-text batch itself pages in the main context's compute buffers, ~60 MB for the
    default model: that is the steady state, so the baseline is taken after one.)"""
    resolved = model_store.resolve(DEFAULT_MODEL, "Q8_0")
    with ProcessEmbedder(resolved, EmbedderConfig(threads=2)) as engine:
        engine.embed([f"warm up {i}" for i in range(128)])
        assert engine.pid is not None
        before = _rss_bytes(engine.pid)
        engine.embed([f"t{i}" for i in range(4096)])
        after = _rss_bytes(engine.pid)
    assert after - before < 20 << 20, f"+{(after - before) >> 20} MB kept after the batch"


# -- deadlines and slices from measured work ------------------------------------------------------


def test_work_model_learns_rates_and_derives_deadlines() -> None:
    model = WorkModel(256, 0.001, DeadlinePolicy(floor_s=2.0, factor=10.0))
    assert model.text_tokens("x" * 3000, "truncate") == 256
    assert model.text_tokens("x" * 3000, "chunk") > 256
    assert model.deadline(100) == pytest.approx(2.0 + 10 * 100 * 0.001)
    for _ in range(30):
        model.observe(["a" * 400] * 10, [100] * 10, "truncate", 0.5)  # 0.5 ms a token
    assert model.chars_per_token == pytest.approx(4.0, rel=0.05)
    assert model.seconds_per_token == pytest.approx(0.0005, rel=0.05)
    assert model.slice_tokens(0.025) == 256  # never less than one sequence
    assert model.slice_tokens(1.0) == pytest.approx(2000, rel=0.05)


# -- CPU contention -------------------------------------------------------------------------------


def _fake_proc(root: Path, busy: int, idle: int, own: tuple[int, int]) -> None:
    (root / "proc" / "1").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "2").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    for pid, ticks in zip((1, 2), own, strict=True):
        (root / "proc" / str(pid) / "stat").write_text(
            f"{pid} (python (x) y) S 1 1 1 0 -1 0 0 0 0 0 {ticks} 0 0 0 20 0 1 0\n"
        )


def test_governor_drops_threads_when_others_use_the_cpus(tmp_path: Path) -> None:
    clock = [0.0]
    sampler = LoadSampler(tmp_path, pids=(1, 2), window=1, clock=lambda: clock[0])
    ticks = os.sysconf("SC_CLK_TCK")
    _fake_proc(tmp_path, busy=0, idle=0, own=(0, 0))
    sampler.sample()
    # One second: 2 CPUs fully busy, of which our processes used 0.2 CPU.
    clock[0] = 1.0
    _fake_proc(tmp_path, busy=2 * ticks, idle=0, own=(ticks // 10, ticks // 10))
    assert sampler.sample() == pytest.approx(1.8, abs=0.05)
    governor = ThreadGovernor(configured=2, cpus=2, sampler=sampler)
    assert governor.threads_for(sampler.others()) == 1
    assert governor.threads_for(0.0) == 2
    assert governor.threads_for(0.5) == 2  # a client waiting on us half the time
    assert governor.threads_for(0.9) == 1  # most of a core taken: a barrier would stall
    assert ThreadGovernor(configured=8, cpus=8).threads_for(2.0) == 6


def test_sampler_sees_real_busy_processes() -> None:
    sampler = LoadSampler()
    if not sampler.available:
        pytest.skip("no /proc/stat on this system")
    code = "import time\nend = time.time() + 8\nwhile time.time() < end: pass\n"
    loops = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    try:
        time.sleep(0.3)
        sampler.sample()
        time.sleep(1.0)
        others = sampler.sample()
    finally:
        for loop in loops:
            loop.kill()
            loop.wait(10)
    assert others > 1.2, f"two busy loops measured as {others:.2f} CPUs"


def test_the_chosen_engine_config_keeps_the_adaptive_threads_setting() -> None:
    """The start-up choice rebuilds the EmbedderConfig from the tuned numbers: a user's
    embedder.adaptive_threads = false must survive it (it once did not)."""
    from types import SimpleNamespace

    from edge_agent.selection.selftest import embedder_config

    decision = SimpleNamespace(
        threads=2, batch_tokens=512, max_sequences=64, max_context=512,
        flash_attention=True, mlock=False,
    )  # fmt: skip
    for adaptive in (True, False):
        config = embedder_config(decision, EmbedderConfig(adaptive_threads=adaptive))  # type: ignore[arg-type]
        assert config.adaptive_threads is adaptive
