"""Fleet search against real daemons over loopback TCP (no mDNS: the agents are given).

Three daemons: A and B serve the same model file (F32), C another quant (Q8_0) and so another
fingerprint, behind a token. Vectors are made by hand so every cosine score is known, and the
merged order can be checked exactly. tests/test_discovery.py does it across network namespaces,
with discovery.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from daemon import ServerThread, options_for

from edge_agent.client import Client, SearchHit, async_fleet_search, fleet_search
from edge_agent.errors import InvalidArgument
from edge_agent.lan.discovery import DiscoveredAgent
from edge_agent.lan.fleet import (
    ANSWERED,
    FAILED,
    NO_COLLECTION,
    REFUSED,
    SKIPPED,
    TIMED_OUT,
    choose_fingerprint,
    merge_hits,
)
from edge_agent.models import ModelStore

DIMS = 384
TOKEN_C = "fleet-token-c-0123456789abcdef"
# doc id -> cosine with the query e0, per agent.
SCORES = {
    "a": {"a1": 0.95, "a2": 0.80, "a3": 0.40},
    "b": {"b1": 0.90, "b2": 0.85, "b3": 0.10},
    "c": {"c1": 0.99, "c2": 0.20},
}


def unit(score: float, axis: int) -> np.ndarray:
    """A unit vector whose cosine with e0 is ``score`` (the rest of it along ``axis``)."""
    vector = np.zeros(DIMS, dtype=np.float32)
    vector[0] = score
    vector[axis] = math.sqrt(1 - score * score)
    return vector


def query() -> np.ndarray:
    return unit(1.0, 1)


def as_agent(name: str, server: ServerThread, agent_id: str) -> DiscoveredAgent:
    url = urlsplit(server.tcp_address)
    assert url.hostname and url.port
    return DiscoveredAgent(name, f"{name}.local.", url.port, (url.hostname,), {"id": agent_id})


@pytest.fixture(scope="module")
def fleet(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[ServerThread, DiscoveredAgent]]]:
    servers: dict[str, tuple[ServerThread, DiscoveredAgent]] = {}
    try:
        for name, quant, token in (("a", "F32", None), ("b", "F32", None), ("c", "Q8_0", TOKEN_C)):
            path = tmp_path_factory.mktemp(f"fleet-{name}") / "edge-agent.sock"
            options = options_for(
                model_store,
                path,
                quant=quant,
                listen="127.0.0.1:0",
                auth_token=token,
                isolate_engine=False,
            )
            server = ServerThread(options).start()
            servers[name] = (server, as_agent(f"box-{name}", server, f"agent-{name}"))
            with Client(server.tcp_address, token=token, timeout=30) as client:
                ids = list(SCORES[name])
                vectors = [unit(SCORES[name][i], 2 + n) for n, i in enumerate(ids)]
                client.add_vectors(
                    "vecs", ids, np.stack(vectors), texts=[f"text of {i}" for i in ids]
                )
                client.add(
                    "docs",
                    [
                        (f"{name}-cat", "The cat sleeps on the warm windowsill."),
                        (f"{name}-car", f"Box {name} parked the car in the garage."),
                    ],
                )
                if name == "a":
                    client.add_vectors("only-a", ["x"], unit(0.5, 3).reshape(1, -1))
        yield servers
    finally:
        for server, _ in servers.values():
            server.stop()


def agents(fleet: dict[str, tuple[ServerThread, DiscoveredAgent]], *names: str) -> list[Any]:
    return [fleet[name][1] for name in names]


def test_hits_merge_by_score_and_other_models_are_skipped(
    fleet: dict[str, tuple[ServerThread, DiscoveredAgent]],
) -> None:
    result = fleet_search(
        "vecs",
        vector=query(),
        k=4,
        agents=agents(fleet, "a", "b", "c"),
        token={"agent-c": TOKEN_C},
    )
    assert [(hit.agent, hit.id) for hit in result.hits] == [
        ("box-a", "a1"),
        ("box-b", "b1"),
        ("box-b", "b2"),
        ("box-a", "a2"),
    ]
    assert [hit.score for hit in result.hits] == pytest.approx([0.95, 0.90, 0.85, 0.80], abs=1e-5)
    assert result.hits[0].text == "text of a1" and result.hits[0].agent_id == "agent-a"
    status = {outcome.name: outcome for outcome in result.outcomes}
    assert (status["box-a"].status, status["box-a"].hits) == (ANSWERED, 3)
    assert (status["box-b"].status, status["box-b"].hits) == (ANSWERED, 3)
    # C holds "vecs" too, made by the Q8_0 file: its scores would not be comparable.
    assert status["box-c"].status == SKIPPED
    assert "fingerprint" in status["box-c"].reason and "raw" in status["box-c"].reason
    assert result.fingerprint is not None and result.fingerprint["model"] == "all-MiniLM-L6-v2"
    assert result.fingerprint == status["box-a"].fingerprint != status["box-c"].fingerprint


def test_raw_merging_includes_every_model(
    fleet: dict[str, tuple[ServerThread, DiscoveredAgent]],
) -> None:
    result = fleet_search(
        "vecs",
        vector=query(),
        k=2,
        agents=agents(fleet, "a", "b", "c"),
        token={"agent-c": TOKEN_C},
        raw=True,
    )
    assert [(hit.agent_id, hit.id) for hit in result.hits] == [("agent-c", "c1"), ("agent-a", "a1")]
    assert {outcome.status for outcome in result.outcomes} == {ANSWERED}
    assert result.raw and result.fingerprint is None


def test_a_pinned_fingerprint_picks_the_minority(
    fleet: dict[str, tuple[ServerThread, DiscoveredAgent]],
) -> None:
    with Client(fleet["c"][0].tcp_address, token=TOKEN_C) as client:
        theirs = next(c["fingerprint"] for c in client.collections() if c["name"] == "vecs")
    result = fleet_search(
        "vecs",
        vector=query(),
        k=10,
        agents=agents(fleet, "a", "b", "c"),
        token={"agent-c": TOKEN_C},
        fingerprint=theirs,
    )
    assert [hit.id for hit in result.hits] == ["c1", "c2"]
    assert [o.status for o in result.outcomes] == [SKIPPED, SKIPPED, ANSWERED]


def test_text_query_equals_merging_each_agents_own_answer(
    fleet: dict[str, tuple[ServerThread, DiscoveredAgent]],
) -> None:
    text = "where is the kitten sleeping?"
    per_agent: list[tuple[DiscoveredAgent, list[SearchHit]]] = []
    for name in ("a", "b"):
        server, agent = fleet[name]
        with Client(server.tcp_address) as client:
            per_agent.append((agent, client.search("docs", text, k=3)))
    expected = merge_hits(per_agent, 3)
    result = fleet_search("docs", text=text, k=3, agents=agents(fleet, "a", "b"))
    assert result.hits == expected
    # Same model, same text: both cats tie up to float rounding and lead the list.
    assert {hit.id for hit in result.hits[:2]} == {"a-cat", "b-cat"}
    assert result.hits[0].score == pytest.approx(result.hits[1].score, abs=1e-4)


def test_every_failure_is_reported_and_none_blocks_the_rest(
    fleet: dict[str, tuple[ServerThread, DiscoveredAgent]],
) -> None:
    # A peer whose kernel completes the handshake but that never answers (a frozen box) ...
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    # ... and a port where nothing listens any more (a dead box).
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    try:
        roster = [
            *agents(fleet, "a", "b", "c"),
            DiscoveredAgent("frozen", "f.local.", silent.getsockname()[1], ("127.0.0.1",), {}),
            DiscoveredAgent("gone", "g.local.", dead_port, ("127.0.0.1",), {"id": "agent-g"}),
            DiscoveredAgent("future", "u.local.", 1, ("127.0.0.1",), {"proto": "2"}),
        ]
        started = time.monotonic()
        # No token for C: it refuses.
        result = fleet_search("only-a", vector=query(), k=5, agents=roster, timeout=1.0)
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    status = {outcome.name: outcome for outcome in result.outcomes}
    assert status["box-a"].status == ANSWERED
    assert [hit.id for hit in result.hits] == ["x"]
    assert status["box-b"].status == NO_COLLECTION
    assert status["box-c"].status == REFUSED and "AUTH" in status["box-c"].reason
    assert status["frozen"].status == TIMED_OUT
    assert status["gone"].status == FAILED and "unreachable" in status["gone"].reason
    assert status["future"].status == SKIPPED and "protocol 2" in status["future"].reason
    # In parallel, each call bounded: the frozen peer costs one timeout, not the sum.
    assert status["frozen"].elapsed_s == pytest.approx(1.0, abs=0.5)
    assert elapsed < 3.0


def test_wrong_token_is_refused(fleet: dict[str, tuple[ServerThread, DiscoveredAgent]]) -> None:
    result = fleet_search(
        "vecs", vector=query(), agents=agents(fleet, "c"), token="wrong-token-0123456789abcdef"
    )
    assert [(o.status, o.reason.split(":")[0]) for o in result.outcomes] == [
        (REFUSED, "AUTH_FAILED")
    ]
    assert result.hits == []


def test_a_query_of_other_dims_is_skipped_not_sent(
    fleet: dict[str, tuple[ServerThread, DiscoveredAgent]],
) -> None:
    result = fleet_search("vecs", vector=np.ones(8), agents=agents(fleet, "a"))
    assert result.outcomes[0].status == SKIPPED
    assert "384 dims, the query has 8" in result.outcomes[0].reason


def test_an_address_that_fails_falls_through_to_the_next(
    fleet: dict[str, tuple[ServerThread, DiscoveredAgent]],
) -> None:
    """Agents announce several addresses (IPv4, IPv6, interfaces); one dead one is not fatal."""
    agent = fleet["a"][1]
    # 127.0.0.2 is loopback too, but the daemon is bound to 127.0.0.1 only: refused there.
    two = DiscoveredAgent(agent.name, agent.host, agent.port, ("127.0.0.2", "127.0.0.1"), agent.txt)
    result = fleet_search("vecs", vector=query(), k=1, agents=[two])
    assert result.outcomes[0].status == ANSWERED
    assert result.outcomes[0].address == f"tcp://127.0.0.1:{agent.port}"


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgument):
        fleet_search("vecs", agents=[])  # neither text nor vector
    with pytest.raises(InvalidArgument):
        fleet_search("vecs", text="x", vector=np.ones(3), agents=[])
    with pytest.raises(InvalidArgument):
        fleet_search("vecs", text="x", k=0, agents=[])

    async def inside_a_loop() -> None:
        fleet_search("vecs", text="x", agents=[])

    with pytest.raises(InvalidArgument, match="async_fleet_search"):
        asyncio.run(inside_a_loop())
    # The async form with no agents is an empty, well-formed result.
    empty = asyncio.run(async_fleet_search("vecs", text="x", agents=[]))
    assert (empty.hits, empty.outcomes, empty.fingerprint) == ([], [], None)


def test_choose_fingerprint_majority_then_stable_tie_break() -> None:
    f32 = {"model": "m", "sha256": "b" * 64, "dims": 4, "pooling": "mean", "dimensions": None}
    q8 = {**f32, "sha256": "a" * 64}
    other = {**f32, "model": "a-model"}
    assert choose_fingerprint([f32, q8, f32]) == f32
    # A tie: the alphabetically first model, then sha256 — whatever order agents answer in.
    assert choose_fingerprint([f32, other]) == choose_fingerprint([other, f32]) == other
    assert choose_fingerprint([f32, q8]) == choose_fingerprint([q8, f32]) == q8
    assert choose_fingerprint([]) is None


def test_merge_ties_are_ordered_by_agent_then_id() -> None:
    b = DiscoveredAgent("b", "b.local.", 1, ("127.0.0.1",), {"id": "agent-b"})
    a = DiscoveredAgent("a", "a.local.", 1, ("127.0.0.1",), {"id": "agent-a"})
    merged = merge_hits(
        [
            (b, [SearchHit("x", 0.5, {}), SearchHit("y", 0.9, {})]),
            (a, [SearchHit("z", 0.5, {}), SearchHit("w", 0.5, {})]),
        ],
        3,
    )
    assert [(hit.agent_id, hit.id) for hit in merged] == [
        ("agent-b", "y"),
        ("agent-a", "w"),
        ("agent-a", "z"),
    ]
