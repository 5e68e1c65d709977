"""Fleet search: one query fanned out to every agent on the LAN that has the collection.

Two rounds, each in parallel across agents and each call bounded by ``timeout``:

1. ``collections`` on every discovered agent: which ones hold the collection, and the model
   fingerprint its vectors were made with;
2. ``search`` on the agents whose fingerprint matches the reference one.

Cosine scores are comparable only between vectors of the same model (same weights file, same
pooling, same dimensions), so agents with another fingerprint are skipped with the reason,
unless the caller asks for ``raw`` merging. The reference is the caller's ``fingerprint``, else
the one most agents have (ties: the alphabetically first model, then sha256, so every run picks
the same). Hits are merged by score, best first; every agent's fate is reported: answered,
timed out, refused (auth), skipped, no collection, or failed.

This module holds the algorithm only: it talks to agents through ``connect`` (an
``AsyncClient`` factory handed in by ``edge_agent.client``, whose ``fleet_search`` and
``async_fleet_search`` are the public entry points), so the LAN layer never imports the client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np

from ..errors import CollectionNotFound, EdgeAgentError, InvalidArgument
from ..protocol import (
    PROTOCOL_VERSION,
    AuthFailed,
    AuthRequired,
    ConnectionFailed,
    RequestTimeout,
    SearchHit,
)
from .discovery import DEFAULT_BROWSE_TIMEOUT, DiscoveredAgent, async_browse

__all__ = [
    "AgentConnection",
    "AgentOutcome",
    "Connect",
    "FleetHit",
    "FleetResult",
    "search_fleet",
]

DEFAULT_AGENT_TIMEOUT: Final = 5.0


class AgentConnection(Protocol):
    """What fleet search needs of a connection to one agent (``AsyncClient`` is one)."""

    async def close(self) -> None: ...


# (address, timeout, token) -> an unconnected client for that agent.
Connect = Callable[[str, float, "str | None"], AgentConnection]

# What happened to each agent.
ANSWERED: Final = "answered"
TIMED_OUT: Final = "timed_out"
REFUSED: Final = "refused"  # auth required or the token was wrong
SKIPPED: Final = "skipped"  # not comparable (fingerprint, dims, protocol)
NO_COLLECTION: Final = "no_collection"
FAILED: Final = "failed"  # unreachable, or an error that is none of the above


@dataclass(frozen=True)
class FleetHit:
    """A search hit and the agent it came from (ids are only unique per agent)."""

    agent_id: str | None
    agent: str  # the agent's instance name
    id: str
    score: float
    text: str | None
    metadata: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "agent": self.agent,
            "id": self.id,
            "score": self.score,
            "text": self.text,
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class AgentOutcome:
    name: str
    agent_id: str | None
    address: str | None  # the endpoint that answered (or the last one tried)
    status: str
    reason: str = ""
    hits: int = 0
    elapsed_s: float = 0.0
    fingerprint: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "agent_id": self.agent_id,
            "address": self.address,
            "status": self.status,
            "reason": self.reason,
            "hits": self.hits,
            "elapsed_s": round(self.elapsed_s, 4),
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class FleetResult:
    hits: list[FleetHit]
    outcomes: list[AgentOutcome]
    # The fingerprint hits were required to match; None when nothing held the collection, or
    # with raw merging.
    fingerprint: dict[str, Any] | None = None
    raw: bool = False

    def with_status(self, status: str) -> list[AgentOutcome]:
        return [outcome for outcome in self.outcomes if outcome.status == status]

    @property
    def answered(self) -> list[AgentOutcome]:
        return self.with_status(ANSWERED)

    @property
    def timed_out(self) -> list[AgentOutcome]:
        return self.with_status(TIMED_OUT)

    @property
    def refused(self) -> list[AgentOutcome]:
        return self.with_status(REFUSED)

    @property
    def skipped(self) -> list[AgentOutcome]:
        return self.with_status(SKIPPED)

    @property
    def failed(self) -> list[AgentOutcome]:
        return self.with_status(FAILED)

    def to_json(self) -> dict[str, Any]:
        return {
            "hits": [hit.to_json() for hit in self.hits],
            "agents": [outcome.to_json() for outcome in self.outcomes],
            "fingerprint": self.fingerprint,
            "raw": self.raw,
        }


@dataclass
class _Agent:
    """One agent's state across both rounds."""

    agent: DiscoveredAgent
    token: str | None
    timeout: float
    connect: Connect
    client: AgentConnection | None = None
    address: str | None = None
    info: dict[str, Any] | None = None  # its entry in ``collections``
    started: float = field(default_factory=time.monotonic)

    def outcome(self, status: str, reason: str = "", hits: int = 0) -> AgentOutcome:
        fingerprint = self.info.get("fingerprint") if self.info else None
        return AgentOutcome(
            name=self.agent.name,
            agent_id=self.agent.agent_id,
            address=self.address,
            status=status,
            reason=reason,
            hits=hits,
            elapsed_s=time.monotonic() - self.started,
            fingerprint=fingerprint if isinstance(fingerprint, dict) else None,
        )

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A client method, with the connection opened (trying each address) on first use.

        The whole call, connecting and ``auth`` included, is bounded by ``timeout``: a frozen
        agent whose kernel still accepts connections must not hold up the fleet.
        """
        return await asyncio.wait_for(self._call(method, *args, **kwargs), self.timeout)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.client is not None:
            return await getattr(self.client, method)(*args, **kwargs)
        endpoints = self.agent.endpoints()
        if not endpoints:
            raise ConnectionFailed(f"{self.agent.label()} announced no address")
        last: ConnectionFailed | None = None
        for endpoint in endpoints:
            client = self.connect(endpoint, self.timeout, self.token)
            self.address = endpoint
            try:
                result = await getattr(client, method)(*args, **kwargs)
            except ConnectionFailed as exc:
                # Another announced address (IPv6, another interface) may still work.
                await client.close()
                last = exc
                continue
            except BaseException:
                await client.close()
                raise
            self.client = client
            return result
        assert last is not None
        raise last

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def _classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, (TimeoutError, RequestTimeout)):
        return TIMED_OUT, "no answer in time"
    if isinstance(exc, (AuthRequired, AuthFailed)):
        return REFUSED, f"{exc.code.name}: {exc.message}"
    if isinstance(exc, CollectionNotFound):
        return NO_COLLECTION, exc.message
    if isinstance(exc, ConnectionFailed):
        return FAILED, f"unreachable: {exc.message}"
    if isinstance(exc, EdgeAgentError):
        return FAILED, f"{exc.code.name}: {exc.message}"
    if isinstance(exc, OSError):
        return FAILED, f"unreachable: {exc}"
    raise exc


def _fingerprint_key(fingerprint: Any) -> str:
    return json.dumps(fingerprint, sort_keys=True)


def _vector_dims(fingerprint: Mapping[str, Any]) -> int | None:
    dims = fingerprint.get("dimensions") or fingerprint.get("dims")
    return dims if isinstance(dims, int) else None


def _describe(fingerprint: Mapping[str, Any]) -> str:
    sha = str(fingerprint.get("sha256", ""))[:12]
    return f"{fingerprint.get('model')} ({sha}, {_vector_dims(fingerprint)}d)"


def choose_fingerprint(fingerprints: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The fingerprint most agents share; ties go to the first by (model, sha256)."""
    if not fingerprints:
        return None
    counts = Counter(_fingerprint_key(fp) for fp in fingerprints)
    best = min(
        counts,
        key=lambda key: (-counts[key], str(json.loads(key).get("model")), key),
    )
    return json.loads(best)


def merge_hits(
    per_agent: Sequence[tuple[DiscoveredAgent, Sequence[SearchHit]]], k: int
) -> list[FleetHit]:
    """Top ``k`` of all agents' hits by score; equal scores ordered by agent id, then doc id."""
    merged = [
        FleetHit(agent.agent_id, agent.name, hit.id, hit.score, hit.text, hit.metadata)
        for agent, hits in per_agent
        for hit in hits
    ]
    merged.sort(key=lambda hit: (-hit.score, hit.agent_id or hit.agent, hit.id))
    return merged[:k]


def _token_for(agent: DiscoveredAgent, token: str | Mapping[str, str] | None) -> str | None:
    if token is None or isinstance(token, str):
        return token
    for key in (agent.agent_id, agent.name):
        if key is not None and key in token:
            return token[key]
    return token.get("*")


async def search_fleet(
    collection: str,
    *,
    connect: Connect,
    text: str | None = None,
    vector: Any = None,
    k: int = 10,
    filter: Mapping[str, Any] | None = None,
    ef: int | None = None,
    agents: Sequence[DiscoveredAgent] | None = None,
    browse_timeout: float = DEFAULT_BROWSE_TIMEOUT,
    interfaces: Sequence[str] = (),
    timeout: float = DEFAULT_AGENT_TIMEOUT,
    token: str | Mapping[str, str] | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    raw: bool = False,
) -> FleetResult:
    """Search ``collection`` on every agent (``agents``, else those browsed for
    ``browse_timeout`` seconds) and merge the top ``k``.

    ``token``: one for all agents, or a map by agent id or name (``"*"`` for the rest); None
    uses $EDGE_AGENT_TOKEN. ``timeout`` bounds each call to each agent. ``fingerprint`` pins the
    reference model; ``raw`` merges every agent's hits regardless of model.
    """
    if (text is None) == (vector is None):
        raise InvalidArgument("give exactly one of text or vector")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidArgument(f"k must be a positive integer, got {k!r}")
    if timeout <= 0:
        raise InvalidArgument(f"timeout must be positive, got {timeout!r}")
    query_dims: int | None = None
    if vector is not None:
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        query_dims = int(vector.shape[0])
    if agents is None:
        agents = await async_browse(browse_timeout, interfaces=interfaces)
    states = [_Agent(agent, _token_for(agent, token), timeout, connect) for agent in agents]
    outcomes: dict[int, AgentOutcome] = {}
    try:
        # Round 1: who has the collection, made with which model.
        listed = await asyncio.gather(
            *(_list(state, collection) for state in states), return_exceptions=True
        )
        for index, (state, result) in enumerate(zip(states, listed, strict=True)):
            if isinstance(result, BaseException):
                outcomes[index] = state.outcome(*_classify(result))
            elif result is not None:
                outcomes[index] = result
        holders = [i for i, state in enumerate(states) if i not in outcomes and state.info]
        reference = (
            dict(fingerprint)
            if fingerprint is not None
            else choose_fingerprint([states[i].info["fingerprint"] for i in holders])  # type: ignore[index]
        )
        eligible: list[int] = []
        for index in holders:
            state = states[index]
            theirs = state.info["fingerprint"]  # type: ignore[index]
            if query_dims is not None and _vector_dims(theirs) != query_dims:
                outcomes[index] = state.outcome(
                    SKIPPED,
                    f"its vectors have {_vector_dims(theirs)} dims, the query has {query_dims}",
                )
            elif (
                not raw
                and reference is not None
                and _fingerprint_key(theirs) != _fingerprint_key(reference)
            ):
                outcomes[index] = state.outcome(
                    SKIPPED,
                    f"model fingerprint {_describe(theirs)} differs from {_describe(reference)}:"
                    " scores are not comparable (raw merging includes it)",
                )
            else:
                eligible.append(index)
        # Round 2: the search itself.
        searched = await asyncio.gather(
            *(
                states[index].call(
                    "search", collection, text, vector=vector, k=k, filter=filter, ef=ef
                )
                for index in eligible
            ),
            return_exceptions=True,
        )
        per_agent: list[tuple[DiscoveredAgent, Sequence[SearchHit]]] = []
        for index, result in zip(eligible, searched, strict=True):
            state = states[index]
            if isinstance(result, BaseException):
                outcomes[index] = state.outcome(*_classify(result))
            else:
                outcomes[index] = state.outcome(ANSWERED, hits=len(result))
                per_agent.append((state.agent, result))
    finally:
        await asyncio.gather(*(state.close() for state in states), return_exceptions=True)
    return FleetResult(
        hits=merge_hits(per_agent, k),
        outcomes=[outcomes[index] for index in range(len(states))],
        fingerprint=None if raw else reference,
        raw=raw,
    )


async def _list(state: _Agent, collection: str) -> AgentOutcome | None:
    """Round 1 for one agent: an outcome if it is out, None if it holds the collection."""
    agent = state.agent
    if agent.protocol is not None and agent.protocol != PROTOCOL_VERSION:
        return state.outcome(
            SKIPPED, f"speaks protocol {agent.protocol}, this client {PROTOCOL_VERSION}"
        )
    collections = await state.call("collections")
    for entry in collections:
        if isinstance(entry, dict) and entry.get("name") == collection:
            if not isinstance(entry.get("fingerprint"), dict):
                return state.outcome(FAILED, "its collection list has no fingerprint")
            state.info = entry
            return None
    return state.outcome(NO_COLLECTION, f"no collection {collection!r}")
