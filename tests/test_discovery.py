"""LAN discovery: the TXT record, parsing untrusted answers, and real mDNS between hosts.

The network tests run every node in its own network namespace on a bridge (tests/lan.py), so
multicast crosses real, separate network stacks and nothing reaches this machine's links. Where
namespaces are unavailable they fall back to loopback multicast and say so in the output.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lan import Host, Lan, Proc, namespaces_available
from zeroconf import ServiceInfo

from edge_agent.errors import AgentNotFound, DiscoveryError, ErrorCode, InvalidArgument
from edge_agent.lan.discovery import (
    SERVICE_TYPE,
    AgentInfo,
    DiscoveredAgent,
    announce_addresses,
    browse,
    match_agent,
    resolve_interfaces,
)
from edge_agent.models import ModelStore

TXT_KEYS = {"txtvers", "proto", "id", "model", "dims", "quant", "auth"}


# -- the record, without a network ----------------------------------------------------------------


def test_txt_has_only_what_a_client_needs_to_choose() -> None:
    txt = AgentInfo("a1b2c3d4", "all-MiniLM-L6-v2", 384, "Q8_0", auth=True).txt()
    assert txt == {
        "txtvers": "1",
        "proto": "1",
        "id": "a1b2c3d4",
        "model": "all-MiniLM-L6-v2",
        "dims": "384",
        "quant": "Q8_0",
        "auth": "1",
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"agent_id": "has space"},
        {"agent_id": ""},
        {"agent_id": "x" * 65},
        {"dims": 0},
        {"dims": True},
        {"model": ""},
        {"model": "m" * 241},
        {"quant": ""},
    ],
)
def test_agent_info_refuses_what_cannot_be_announced(fields: dict[str, object]) -> None:
    base: dict[str, object] = {
        "agent_id": "abcd",
        "model": "m",
        "dims": 8,
        "quant": "F32",
        "auth": False,
    }
    with pytest.raises(InvalidArgument):
        AgentInfo(**{**base, **fields})  # type: ignore[arg-type]


def _info(properties: dict[str, str], addresses: list[str], port: int | None = 7878) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        f"box.{SERVICE_TYPE}",
        port=port,
        properties=properties,
        server="box-1234.local.",
        parsed_addresses=addresses,
    )


def test_odd_txt_values_read_as_none_not_errors() -> None:
    """Any host on the link can answer: a malformed record must not break a browse."""
    agent = DiscoveredAgent.from_service_info(
        _info(
            {"id": "not an id!", "dims": "12x", "auth": "maybe", "proto": "-1", "model": ""},
            ["10.0.0.5"],
        )
    )
    assert agent is not None
    assert (agent.agent_id, agent.dims, agent.auth_required, agent.protocol, agent.model) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert not agent.compatible
    assert agent.txt["dims"] == "12x"  # kept for whoever wants to look


def test_records_without_port_or_address_are_dropped() -> None:
    assert DiscoveredAgent.from_service_info(_info({"id": "abcd"}, [], port=7878)) is None
    assert DiscoveredAgent.from_service_info(_info({"id": "abcd"}, ["10.0.0.5"], port=0)) is None


def test_addresses_ipv4_first_then_ipv6_and_unscoped_link_local_dropped() -> None:
    agent = DiscoveredAgent.from_service_info(
        _info({"id": "abcd"}, ["fe80::1", "fd77::9", "10.0.0.5"], port=7878)
    )
    assert agent is not None
    # fe80::1 came without an interface: nothing could connect to it.
    assert agent.addresses == ("10.0.0.5", "fd77::9")
    assert agent.endpoints() == ["tcp://10.0.0.5:7878", "tcp://[fd77::9]:7878"]


def _agent(name: str, agent_id: str) -> DiscoveredAgent:
    return DiscoveredAgent(name, f"{name}.local.", 7878, ("10.0.0.1",), {"id": agent_id})


def test_match_agent_by_id_name_and_unique_prefix() -> None:
    agents = [
        _agent("Kitchen", "7f3a9c01"),
        _agent("garage", "7f3b0000"),
        _agent("attic", "c0ffee"),
    ]
    assert match_agent(agents, "c0ffee").name == "attic"  # type: ignore[union-attr]
    assert match_agent(agents, "kitchen").agent_id == "7f3a9c01"  # type: ignore[union-attr]
    assert match_agent(agents, "7f3b").name == "garage"  # type: ignore[union-attr]
    assert match_agent(agents, "7f3") is None  # prefixes need 4 characters
    assert match_agent(agents, "nowhere") is None
    with pytest.raises(AgentNotFound) as excinfo:
        match_agent([*agents, _agent("shed", "7f3b1111")], "7f3b")
    assert excinfo.value.code == ErrorCode.AGENT_NOT_FOUND


def test_match_agent_by_host_name_unless_several_share_it() -> None:
    """Identical boxes often share a host name: the id part keeps their names apart, and the
    bare host name still finds an agent when it is the only one on that host name."""
    agents = [
        _agent("pi-7f3a9c", "7f3a9c01"),
        _agent("pi-0b1c2d", "0b1c2d03"),
        _agent("nas-c0ffee", "c0ffee99"),
    ]
    assert match_agent(agents, "NAS").agent_id == "c0ffee99"  # type: ignore[union-attr]
    assert match_agent(agents, "pi-0b1c2d").agent_id == "0b1c2d03"  # type: ignore[union-attr]
    with pytest.raises(AgentNotFound, match="several agents"):
        match_agent(agents, "pi")


def test_announce_addresses_follow_the_bind() -> None:
    interfaces = [
        ("lo", "127.0.0.1"),
        ("lo", "::1"),
        ("eth0", "10.0.0.5"),
        ("eth0", "fd77::5"),
        ("eth0", "fe80::5%2"),
    ]
    assert announce_addresses(["0.0.0.0"], interfaces) == ["10.0.0.5"]
    assert announce_addresses(["::"], interfaces) == ["fd77::5", "fe80::5%2"]
    assert announce_addresses(["10.0.0.5"], interfaces) == ["10.0.0.5"]
    # Loopback is announced only when it is all there is (found from this host only).
    assert announce_addresses(["127.0.0.1"], interfaces) == ["127.0.0.1"]
    assert announce_addresses(["0.0.0.0"], [("lo", "127.0.0.1")]) == ["127.0.0.1"]


def test_unknown_interface_is_a_typed_error() -> None:
    with pytest.raises(DiscoveryError) as excinfo:
        resolve_interfaces(["no-such-if0"])
    assert excinfo.value.code == ErrorCode.DISCOVERY_ERROR
    assert "no-such-if0" in excinfo.value.message


def test_blocking_browse_refuses_a_running_loop() -> None:
    async def inside_a_loop() -> None:
        browse(0.1)

    with pytest.raises(InvalidArgument, match="async_"):
        asyncio.run(inside_a_loop())


# -- real mDNS between hosts ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lan]:
    available, reason = namespaces_available()
    network = Lan(tmp_path_factory.mktemp("lan"), available, reason)
    try:
        for name in ("boxa", "boxb", "watcher"):
            network.add_host(name)
        yield network
    finally:
        network.close()


def hosts(lan: Lan) -> tuple[Host, Host, Host]:
    boxa, boxb, watcher = lan.hosts
    return boxa, boxb, watcher


def advertise(host: Host, agent_id: str, *args: str) -> Proc:
    proc = host.spawn("advertise", "--id", agent_id, *args)
    proc.expect("ready")
    return proc


def discover(host: Host, *args: str, timeout: float = 2.0) -> list[dict[str, object]]:
    result = host.run(
        sys.executable, "-m", "edge_agent", "discover", "--json", "--timeout", str(timeout),
        *host.interface_args, *args,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_browse_finds_agents_with_their_txt_and_addresses(lan: Lan) -> None:
    boxa, boxb, watcher = hosts(lan)
    wildcard = ["--bind", "0.0.0.0"] + (["--bind", "::"] if lan.use_namespaces else [])
    a = advertise(boxa, "aaaa0001", *wildcard, "--port", "7878")
    b = advertise(
        boxb, "bbbb0002", "--bind", boxb.ipv4, "--port", "7979", "--quant", "Q8_0", "--auth"
    )
    try:
        found = {agent["agent_id"]: agent for agent in discover(watcher)}
        assert set(found) == {"aaaa0001", "bbbb0002"}
        agent_a, agent_b = found["aaaa0001"], found["bbbb0002"]
        assert set(agent_a["txt"]) == TXT_KEYS  # type: ignore[arg-type]
        # Instance names: the host name, made unique by the id's first characters.
        assert (agent_a["name"], agent_a["port"], agent_a["auth_required"]) == (
            "boxa-aaaa00",
            7878,
            False,
        )
        assert (agent_b["name"], agent_b["port"], agent_b["auth_required"]) == (
            "boxb-bbbb00",
            7979,
            True,
        )
        assert (agent_b["model"], agent_b["dims"], agent_b["quant"], agent_b["protocol"]) == (
            "all-MiniLM-L6-v2",
            384,
            "Q8_0",
            1,
        )
        # A specific bind announces only itself; a wildcard every address of its families.
        assert agent_b["addresses"] == [boxb.ipv4]
        # (On the loopback fallback the wildcard's only address is lo's own 127.0.0.1.)
        wildcard_v4 = boxa.ipv4 if lan.use_namespaces else "127.0.0.1"
        assert agent_a["addresses"][0] == wildcard_v4  # type: ignore[index]
        if lan.use_namespaces:
            assert boxa.ipv6 in agent_a["addresses"]  # type: ignore[operator]
        # The table form names both.
        table = watcher.run(
            sys.executable, "-m", "edge_agent", "discover", "--timeout", "3",
            *watcher.interface_args,
        )  # fmt: skip
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:3] == ["NAME", "AGENT", "ID"]
        assert any(
            line.startswith("boxb-bbbb00 ") and f"{boxb.ipv4}:7979" in line for line in lines
        )
    finally:
        a.send(cmd="close")
        b.send(cmd="close")
        a.wait(20)
        b.wait(20)


def test_update_is_seen_and_goodbye_removes_at_once(lan: Lan) -> None:
    boxa, _, watcher = hosts(lan)
    watch = watcher.spawn("watch")
    watch.expect("ready")
    a = advertise(boxa, "aaaa0003", "--bind", boxa.ipv4, "--port", "7878")
    added = watch.expect("added", timeout=10)
    assert added["agent"]["txt"]["quant"] == "F32"
    # The model changes: the TXT record is re-announced and browsers see it.
    changed_at = time.monotonic()
    a.send(cmd="update", quant="Q4_K_M", model="other-model", dims=256)
    updated = watch.expect("updated", timeout=10)
    assert (updated["agent"]["model"], updated["agent"]["dims"], updated["agent"]["quant"]) == (
        "other-model",
        256,
        "Q4_K_M",
    )
    assert updated["agent"]["agent_id"] == "aaaa0003"
    assert updated["t"] - changed_at < 5
    # The daemon's way: nobody calls update(); the advertiser follows what it announces.
    changed_at = time.monotonic()
    a.send(cmd="set", quant="Q8_0")
    followed = watch.expect("updated", timeout=10)
    assert (followed["agent"]["model"], followed["agent"]["quant"]) == ("other-model", "Q8_0")
    assert followed["t"] - changed_at < 5
    # A clean stop sends goodbyes: browsers drop the agent now, not when its TTL (120 s) ends.
    closed_at = time.monotonic()
    a.send(cmd="close")
    removed = watch.expect("removed", timeout=10)
    assert removed["agent"]["agent_id"] == "aaaa0003"
    assert removed["t"] - closed_at < 3
    assert a.wait(20) == 0
    watch.send(cmd="close")
    watch.wait(20)


def test_a_killed_agent_is_not_found_by_a_new_browse(lan: Lan) -> None:
    boxa, boxb, watcher = hosts(lan)
    a = advertise(boxa, "aaaa0004", "--bind", boxa.ipv4, "--port", "7878")
    b = advertise(boxb, "bbbb0005", "--bind", boxb.ipv4, "--port", "7878")
    assert {agent["agent_id"] for agent in discover(watcher)} == {"aaaa0004", "bbbb0005"}
    a.signal(9)  # no goodbye: only answers to fresh queries can tell
    a.wait(10)
    assert [agent["agent_id"] for agent in discover(watcher)] == ["bbbb0005"]
    b.send(cmd="close")
    b.wait(20)


@pytest.mark.skipif(not namespaces_available()[0], reason="needs separate network stacks")
def test_interface_restriction(lan: Lan) -> None:
    """Announcing on lo only reaches the host itself; naming eth0 (or its address) reaches the
    LAN. Browsing can be restricted the same way."""
    boxa, boxb, watcher = hosts(lan)
    local = advertise(boxa, "aaaa0006", "--bind", "0.0.0.0", "--port", "7878",
                      "--interface", "lo")  # fmt: skip
    named = advertise(boxb, "bbbb0007", "--bind", "0.0.0.0", "--port", "7878",
                      "--interface", "eth0")  # fmt: skip
    try:
        assert [agent["agent_id"] for agent in discover(watcher)] == ["bbbb0007"]
        on_boxa = discover(boxa, "--interface", "lo")
        assert [agent["agent_id"] for agent in on_boxa] == ["aaaa0006"]
        assert on_boxa[0]["addresses"] == ["127.0.0.1"]
        by_address = discover(watcher, "--interface", watcher.ipv4)
        assert [agent["agent_id"] for agent in by_address] == ["bbbb0007"]
        assert by_address[0]["addresses"] == [boxb.ipv4]
    finally:
        for proc in (local, named):
            proc.send(cmd="close")
            proc.wait(20)


def test_discover_with_an_unknown_interface_fails_clearly(lan: Lan) -> None:
    _, _, watcher = hosts(lan)
    result = watcher.run(
        sys.executable, "-m", "edge_agent", "discover", "--interface", "nosuch0", "--timeout", "1"
    )
    assert result.returncode == 2
    assert "DISCOVERY_ERROR" in result.stderr and "nosuch0" in result.stderr


def test_lan_fallback_is_announced(lan: Lan, capsys: pytest.CaptureFixture[str]) -> None:
    """Never silently: the run says which kind of LAN it used."""
    kind = "network namespaces" if lan.use_namespaces else f"loopback fallback ({lan.reason})"
    with capsys.disabled():
        print(f"\n[discovery tests ran on {kind}]", file=sys.stderr)
    assert lan.use_namespaces or lan.reason


# -- real daemons on the LAN ----------------------------------------------------------------------

FLEET_TOKEN = "lan-fleet-token-0123456789abcdef"


def unit_vector(score: float, axis: int, dims: int = 384) -> list[float]:
    """Cosine ``score`` with e0; the rest of its length along ``axis``."""
    vector = [0.0] * dims
    vector[0] = score
    vector[axis] = (1 - score * score) ** 0.5
    return vector


def test_daemons_are_discovered_searched_as_a_fleet_and_survive_losses(
    lan: Lan, model_store: ModelStore, tmp_path: Path
) -> None:
    """Three real daemons (A and B the F32 file, C the Q8_0 one), a client on a fourth host."""
    boxa, boxb, watcher = hosts(lan)
    boxc = lan.hosts[3] if len(lan.hosts) > 3 else lan.add_host("boxc")
    # A listens on IPv6 only, so everything about it goes over IPv6 (where available).
    listens = {
        boxa: "[::]:7878" if lan.use_namespaces else f"{boxa.ipv4}:0",
        boxb: "0.0.0.0:7878" if lan.use_namespaces else f"{boxb.ipv4}:0",
        boxc: "0.0.0.0:7878" if lan.use_namespaces else f"{boxc.ipv4}:0",
    }
    quants = {boxa: "F32", boxb: "F32", boxc: "Q8_0"}
    watch = watcher.spawn("watch")
    watch.expect("ready")
    daemons = {
        host: host.spawn(
            "agent",
            "--models-dir",
            str(model_store.root),
            "--data",
            str(tmp_path / host.name),
            "--quant",
            quants[host],
            "--listen",
            listens[host],
            "--token",
            FLEET_TOKEN,
        )
        for host in (boxa, boxb, boxc)
    }
    for proc in daemons.values():
        proc.expect("ready", timeout=60)
        proc.expect("ready", timeout=30)  # the second ready: the TCP address
    client = watcher.spawn("client", env={"EDGE_AGENT_TOKEN": FLEET_TOKEN})

    # Discovery: three agents, their TXT as announced, A only over IPv6.
    client.send(cmd="browse", timeout=3.0)
    browsed = client.expect("browsed")["agents"]
    # Which host each instance name is, by the addresses it announced (on the loopback
    # fallback every daemon has this machine's host name, so names cannot tell).
    names = {
        agent["name"]: host.name
        for agent in browsed
        for host in (boxa, boxb, boxc)
        if {host.ipv4, host.ipv6} & set(agent["addresses"])
    }
    seen = {names[agent["name"]]: agent for agent in browsed}
    assert sorted(names.values()) == ["boxa", "boxb", "boxc"]
    if lan.use_namespaces:  # each box its own host name
        assert all(name.startswith(f"{host}-") for name, host in names.items())

    def host_of(instance: str) -> str:
        return names[instance]

    for host in (boxa, boxb, boxc):
        agent = seen[host.name]
        assert set(agent["txt"]) == TXT_KEYS
        assert (agent["model"], agent["quant"], agent["dims"]) == (
            "all-MiniLM-L6-v2",
            quants[host],
            384,
        )
        assert agent["auth_required"] is True and agent["protocol"] == 1
    assert len({agent["agent_id"] for agent in seen.values()}) == 3
    if lan.use_namespaces:
        assert seen["boxa"]["addresses"][0] == boxa.ipv6
        assert all(":" in address for address in seen["boxa"]["addresses"])
        assert seen["boxb"]["addresses"] == [boxb.ipv4]

    # Connect by host name and by id: hello over TCP (with the token) names the same agent.
    client.send(cmd="hello", agent="boxa" if lan.use_namespaces else seen["boxa"]["agent_id"])
    hello = client.expect("hello")
    if lan.use_namespaces:
        assert hello["address"] == f"[{boxa.ipv6}]:7878"
    if "agent_id" in hello["hello"]:
        assert hello["hello"]["agent_id"] == seen["boxa"]["agent_id"]
    client.send(cmd="hello", agent=seen["boxb"]["agent_id"])
    assert client.expect("hello")["hello"]["quant"] == "F32"

    # Documents with known cosines to the query e0.
    docs = {boxa: {"a1": 0.95, "a2": 0.80}, boxb: {"b1": 0.90, "b2": 0.85}, boxc: {"c1": 0.99}}
    for host, scores in docs.items():
        client.send(
            cmd="add_vectors",
            agent=seen[host.name]["agent_id"],
            collection="vecs",
            ids=list(scores),
            vectors=[unit_vector(score, 2 + i) for i, score in enumerate(scores.values())],
        )
        client.expect("added")
    query = unit_vector(1.0, 1)

    def fleet(**kwargs: object) -> dict[str, Any]:
        client.send(cmd="fleet", collection="vecs", vector=query, **kwargs)
        return client.expect("fleet", timeout=60)["result"]

    def outcomes(result: dict[str, Any]) -> dict[str, str]:
        return {host_of(agent["name"]): agent["status"] for agent in result["agents"]}

    # Everything up: A and B merge by score; C (another model file) is skipped.
    result = fleet(k=3, timeout=5.0, browse_timeout=3.0)
    assert [(host_of(hit["agent"]), hit["id"]) for hit in result["hits"]] == [
        ("boxa", "a1"),
        ("boxb", "b1"),
        ("boxb", "b2"),
    ]
    assert [hit["score"] for hit in result["hits"]] == pytest.approx([0.95, 0.90, 0.85], abs=1e-5)
    assert outcomes(result) == {"boxa": "answered", "boxb": "answered", "boxc": "skipped"}
    raw = fleet(k=1, timeout=5.0, browse_timeout=3.0, raw=True)
    assert [(host_of(hit["agent"]), hit["id"]) for hit in raw["hits"]] == [("boxc", "c1")]

    # The same from the command line (a text query: each agent embeds it itself).
    def cli_search(collection: str) -> subprocess.CompletedProcess[str]:
        return watcher.run(
            sys.executable, "-m", "edge_agent", "search", collection, "any", "query",
            "--fleet", "--json", "-k", "2", "--browse-timeout", "3", *watcher.interface_args,
            env={"EDGE_AGENT_TOKEN": FLEET_TOKEN},
        )  # fmt: skip

    searched = cli_search("vecs")
    assert searched.returncode == 0, searched.stderr
    cli_result = json.loads(searched.stdout)
    assert outcomes(cli_result) == {"boxa": "answered", "boxb": "answered", "boxc": "skipped"}
    assert len(cli_result["hits"]) == 2
    assert {host_of(hit["agent"]) for hit in cli_result["hits"]} <= {"boxa", "boxb"}
    nowhere = cli_search("no-such-collection")
    assert nowhere.returncode == 1  # no agent answered
    assert set(outcomes(json.loads(nowhere.stdout)).values()) == {"no_collection"}

    # B is killed (no goodbye) and C frozen, after the client's last browse: the fleet search
    # still answers from A, and says what happened to the others.
    client.send(cmd="browse", timeout=3.0)
    assert len(client.expect("browsed")["agents"]) == 3
    daemons[boxb].signal(signal.SIGKILL)
    daemons[boxb].wait(20)
    daemons[boxc].signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = fleet(k=3, timeout=2.0, cached=True)
        elapsed = time.monotonic() - started
    finally:
        daemons[boxc].signal(signal.SIGCONT)
    assert [(host_of(hit["agent"]), hit["id"]) for hit in result["hits"]] == [
        ("boxa", "a1"),
        ("boxa", "a2"),
    ]
    assert outcomes(result) == {"boxa": "answered", "boxb": "failed", "boxc": "timed_out"}
    lost = next(a for a in result["agents"] if host_of(a["name"]) == "boxb")
    assert "unreachable" in lost["reason"]
    assert elapsed < 10

    # A clean stop (SIGTERM) says goodbye: the watcher drops C at once, not after the TTL.
    stopped_at = time.monotonic()
    daemons[boxc].signal(signal.SIGTERM)
    removed = watch.expect("removed", timeout=20)
    while host_of(removed["agent"]["name"]) != "boxc":  # B's records only expire with their TTL
        removed = watch.expect("removed", timeout=20)
    assert removed["t"] - stopped_at < 5
    assert daemons[boxc].wait(30) == 0
    daemons[boxa].signal(signal.SIGTERM)
    assert daemons[boxa].wait(30) == 0
    client.send(cmd="browse", timeout=2.0)
    assert client.expect("browsed")["agents"] == []
