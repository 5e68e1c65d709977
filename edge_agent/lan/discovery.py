"""LAN discovery: the daemon announces its TCP endpoint with DNS-SD over mDNS, clients browse.

Service type ``_edge-embed._tcp.local.`` (python-zeroconf, async API). The TXT record carries
only what a client needs to choose an agent (docs/discovery.md): protocol version, model, dims,
quant, whether auth is required, and the stable agent id. Never the token, paths, user names or
document counts: anyone on the link can read it.

Everything received from the network is untrusted: TXT values that do not parse are kept in
``DiscoveredAgent.txt`` but read as None, never raised on, so one odd responder cannot break a
browse of the whole LAN.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import ifaddr
from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..errors import AgentNotFound, DiscoveryError, EdgeAgentError, InvalidArgument
from ..logs import kv
from ..protocol import PROTOCOL_VERSION
from .identity import _AGENT_ID, agent_id_for

__all__ = [
    "SERVICE_TYPE",
    "Advertiser",
    "AgentBrowser",
    "AgentInfo",
    "BrowseEvent",
    "DiscoveredAgent",
    "agent_id_for",
    "announce_addresses",
    "async_browse",
    "async_find_agent",
    "bound_addresses",
    "browse",
    "find_agent",
    "match_agent",
    "resolve_interfaces",
]

log = logging.getLogger("edge_agent.discovery")

SERVICE_TYPE: Final = "_edge-embed._tcp.local."
# RFC 6763 §6.7: a version for the TXT layout itself, so it can change compatibly later.
TXT_VERSION: Final = "1"
DEFAULT_BROWSE_TIMEOUT: Final = 3.0
# How long one agent's SRV/TXT/address lookup may take once its PTR record is seen. Responders
# usually send all of them together, so this is only waited on for lossy links.
_RESOLVE_TIMEOUT_MS: Final = 3000
# A TXT entry is at most 255 bytes including "key="; the longest key is 7 bytes.
_MAX_TXT_VALUE: Final = 240


def _label(text: str, limit: int = 40) -> str:
    """A DNS label from a host name: lower-case letters, digits and hyphens."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.split(".")[0].lower()).strip("-")[:limit].strip("-")
    return label or "edge-agent"


# -- what is announced ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentInfo:
    """The announced facts about one daemon (the TXT record)."""

    agent_id: str
    model: str
    dims: int
    quant: str
    auth: bool  # whether a client must call ``auth`` first
    protocol: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.agent_id, str) or not _AGENT_ID.match(self.agent_id):
            raise InvalidArgument(
                f"agent id must be 1-64 letters, digits, '-' or '_', got {self.agent_id!r}"
            )
        for name in ("model", "quant"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value.encode()) > _MAX_TXT_VALUE:
                raise InvalidArgument(
                    f"{name} must be a non-empty string of at most {_MAX_TXT_VALUE} bytes"
                )
        if isinstance(self.dims, bool) or not isinstance(self.dims, int) or self.dims < 1:
            raise InvalidArgument(f"dims must be a positive integer, got {self.dims!r}")

    def txt(self) -> dict[str, str]:
        return {
            "txtvers": TXT_VERSION,
            "proto": str(self.protocol),
            "id": self.agent_id,
            "model": self.model,
            "dims": str(self.dims),
            "quant": self.quant,
            "auth": "1" if self.auth else "0",
        }


def resolve_interfaces(
    choice: Sequence[str], adapters: Sequence[ifaddr.Adapter] | None = None
) -> list[tuple[str, str]]:
    """(interface name, address) pairs for interface names or addresses; () means all.

    Raises DiscoveryError naming what does not exist on this host, so a typo in
    ``--advertise-interface`` fails at start instead of announcing nowhere.
    """
    adapters = list(ifaddr.get_adapters()) if adapters is None else list(adapters)
    pairs: list[tuple[str, str]] = []
    for adapter in adapters:
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            if isinstance(ip.ip, tuple) and ipaddress.ip_address(address).is_link_local:
                # Scope it: a link-local address means nothing without its interface.
                address = f"{address}%{adapter.index}"
            pairs.append((adapter.name, address))
    if not choice:
        return pairs
    chosen: list[tuple[str, str]] = []
    for wanted in choice:
        found = [
            (name, address)
            for name, address in pairs
            if name == wanted or _same_address(address, wanted)
        ]
        if not found:
            known = sorted({name for name, _ in pairs})
            raise DiscoveryError(
                f"no interface or address {wanted!r} on this host (interfaces: {', '.join(known)})",
                interface=wanted,
            )
        chosen.extend(pair for pair in found if pair not in chosen)
    return chosen


def _same_address(address: str, wanted: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]) == ipaddress.ip_address(
            wanted.split("%")[0]
        )
    except ValueError:
        return False


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def announce_addresses(
    bound_hosts: Sequence[str], interfaces: Sequence[tuple[str, str]]
) -> list[str]:
    """Which addresses to put in A/AAAA records, given what the TCP server is bound to.

    A wildcard bind (``0.0.0.0``, ``::``) is reachable on every address of its family on the
    chosen interfaces; a specific bind only on itself. Loopback addresses are announced only
    when nothing else is (a daemon bound to loopback can only be found from the same host).
    """
    candidates: list[str] = []
    for host in bound_hosts:
        ip = ipaddress.ip_address(host.split("%")[0])
        if ip.is_unspecified:
            candidates += [
                address
                for _, address in interfaces
                if ipaddress.ip_address(address.split("%")[0]).version == ip.version
            ]
        else:
            candidates.append(host)
    unique = list(dict.fromkeys(candidates))
    routable = [address for address in unique if not _is_loopback(address)]
    return routable or unique


def _zeroconf_interfaces(
    pairs: Sequence[tuple[str, str]], all_interfaces: bool
) -> tuple[InterfaceChoice | list[str | int], IPVersion]:
    """python-zeroconf's interface argument: IPv4 addresses, IPv6 as interface indexes."""
    if all_interfaces:
        return InterfaceChoice.All, IPVersion.All
    indexes = {adapter.name: adapter.index for adapter in ifaddr.get_adapters()}
    chosen: list[str | int] = []
    versions: set[int] = set()
    for name, address in pairs:
        ip = ipaddress.ip_address(address.split("%")[0])
        if ip.version == 6 and ip.is_loopback:
            # IPv6 multicast cannot leave through lo (sends fail: network unreachable); IPv4
            # multicast on lo works and is enough for a loopback-only daemon.
            continue
        versions.add(ip.version)
        if ip.version == 4:
            entry: str | int = address
        else:
            # IPV6_JOIN_GROUP takes an interface index, and one per interface is enough.
            index = indexes.get(name)
            if index is None:
                continue
            entry = index
        if entry not in chosen:
            chosen.append(entry)
    if not chosen:
        raise DiscoveryError("no interface to multicast on among the chosen ones (IPv6 on lo?)")
    if versions == {4, 6}:
        return chosen, IPVersion.All
    return chosen, IPVersion.V6Only if 6 in versions else IPVersion.V4Only


def bound_addresses(host: str) -> list[str]:
    """The addresses a TCP server bound to ``host`` listens on (a name resolves to several)."""
    try:
        ipaddress.ip_address(host.split("%")[0])
        return [host]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise DiscoveryError(f"cannot resolve the listen host {host!r}: {exc}") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Advertiser:
    """Registers one daemon's ``_edge-embed._tcp`` service; ``update`` and ``close`` it later.

    ``bound_hosts`` are the addresses the TCP server listens on (wildcards allowed);
    ``interfaces`` restricts announcing to those interface names or addresses (() = all).
    The instance name is ``<host>-<id[:6]>``: the host name for people, the id so it is unique
    by construction. Fleets of identical boxes often share a host name ("raspberrypi") and boot
    together; mDNS probing does not settle simultaneous claims reliably (python-zeroconf renames
    only against answers it already cached), and two agents under one name would shadow each
    other. python-zeroconf still probes and renames (``-2``) on a true conflict. The SRV target
    is ``<host>-<id[:8]>.local.``, a name of our own, so our address records never fight with
    those of the host's own mDNS responder (avahi) or of a second daemon on the same host.
    """

    def __init__(
        self,
        info: AgentInfo,
        port: int,
        *,
        bound_hosts: Sequence[str],
        interfaces: Sequence[str] = (),
        hostname: str | None = None,
        follow: Callable[[], AgentInfo] | None = None,
        refresh_s: float = 2.0,
    ) -> None:
        if not 0 < port < 65536:
            raise InvalidArgument(f"port must be in 1..65535, got {port}")
        self.port = port
        self._info = info
        # ``follow`` is read every ``refresh_s`` and re-announced when it changed (the daemon's
        # model was swapped): cheaper and harder to miss than a callback from every layer
        # that could swap it.
        self._follow = follow
        self._refresh_s = refresh_s
        self._follower: asyncio.Task[None] | None = None
        self._bound_hosts = tuple(bound_hosts)
        self._interfaces = tuple(interfaces)
        host = _label(hostname or socket.gethostname())
        self.instance = f"{host}-{_label(info.agent_id, 6)}"
        self.server = f"{host}-{_label(info.agent_id, 8)}.local."
        self._zc: AsyncZeroconf | None = None
        self._service: ServiceInfo | None = None
        self.addresses: list[str] = []

    @property
    def name(self) -> str:
        """The registered instance name (after any conflict renaming), without the type."""
        if self._service is None:
            return self.instance
        return self._service.name[: -len(SERVICE_TYPE) - 1]

    @property
    def info(self) -> AgentInfo:
        return self._info

    def _service_info(self, name: str) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            name,
            port=self.port,
            properties=self._info.txt(),
            server=self.server,
            # zeroconf wants bare addresses; the scope is implied by the interface it sends on.
            parsed_addresses=[address.split("%")[0] for address in self.addresses],
        )

    async def start(self) -> None:
        """Probe for the name and announce. Raises DiscoveryError if mDNS cannot start."""
        pairs = resolve_interfaces(self._interfaces)
        self.addresses = announce_addresses(self._bound_hosts, pairs)
        if not self.addresses:
            raise DiscoveryError(
                "nothing to announce: the TCP address is not on any chosen interface"
                f" (bound to {', '.join(self._bound_hosts)})"
            )
        wildcard = any(
            ipaddress.ip_address(host.split("%")[0]).is_unspecified for host in self._bound_hosts
        )
        if self._interfaces or wildcard:
            all_interfaces = not self._interfaces
        else:
            # Bound to specific addresses (loopback included): announce only on the interfaces
            # that hold them, the only links from which the daemon can be reached.
            owners = {name for name, address in pairs if address in self.addresses}
            pairs = [(name, address) for name, address in pairs if name in owners]
            all_interfaces = False
        interfaces, ip_version = _zeroconf_interfaces(pairs, all_interfaces)
        try:
            self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=ip_version)
        except OSError as exc:
            raise DiscoveryError(f"cannot open mDNS sockets: {exc}") from exc
        try:
            self._service = self._service_info(f"{self.instance}.{SERVICE_TYPE}")
            await self._zc.async_register_service(self._service, allow_name_change=True)
        except (NonUniqueNameException, BadTypeInNameException, OSError) as exc:
            await self._close_zeroconf()
            raise DiscoveryError(f"cannot register the mDNS service: {exc}") from exc
        except BaseException:
            await self._close_zeroconf()
            raise
        log.info(
            "%s",
            kv(
                event="advertising",
                name=self.name,
                port=self.port,
                addresses=",".join(self.addresses),
            ),
        )
        if self._follow is not None:
            self._follower = asyncio.get_running_loop().create_task(self._follow_loop())

    async def _follow_loop(self) -> None:
        assert self._follow is not None
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.update(self._follow())
            except (OSError, EdgeAgentError) as exc:
                # Announcing is best effort; serving goes on. The next round retries.
                log.warning("%s", kv(event="advertisement_update_failed", error=str(exc)))

    async def update(self, info: AgentInfo) -> None:
        """Re-announce with new TXT (e.g. the model changed); a no-op when nothing changed."""
        if info == self._info:
            return
        self._info = info
        if self._zc is None or self._service is None:
            return
        self._service = self._service_info(self._service.name)
        # The returned task sends the announcements; wait so a caller knows they went out.
        await await_or_none(await self._zc.async_update_service(self._service))
        log.info(
            "%s",
            kv(event="advertisement_updated", name=self.name, model=info.model, quant=info.quant),
        )

    async def close(self) -> None:
        """Send goodbye packets (TTL 0) so browsers drop us at once, then close the sockets."""
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
            self._follower = None
        if self._zc is None:
            return
        try:
            if self._service is not None:
                with contextlib.suppress(OSError):
                    await await_or_none(await self._zc.async_unregister_service(self._service))
        finally:
            self._service = None
            await self._close_zeroconf()

    async def _close_zeroconf(self) -> None:
        zc, self._zc = self._zc, None
        if zc is not None:
            with contextlib.suppress(OSError):
                await zc.async_close()


async def await_or_none(awaitable: Any) -> None:
    if awaitable is not None:
        await awaitable


# -- what is found --------------------------------------------------------------------------------


def _int_or_none(value: str | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 9:
        return None
    return int(value)


def _address_rank(address: str) -> tuple[int, int]:
    """Try IPv4 first, then global/ULA IPv6, link-local IPv6 (needs a scope) last."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.is_loopback:
        return (3, ip.version)
    if ip.version == 4:
        return (0, 4)
    return (2, 6) if ip.is_link_local else (1, 6)


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True)
class DiscoveredAgent:
    """One agent seen on the LAN. Fields read from TXT are None when absent or malformed."""

    name: str  # DNS-SD instance name, without the service type
    host: str  # SRV target
    port: int
    addresses: tuple[str, ...]  # best first; link-local IPv6 carries "%<interface index>"
    txt: Mapping[str, str] = field(default_factory=dict)

    @property
    def agent_id(self) -> str | None:
        value = self.txt.get("id")
        return value if value and _AGENT_ID.match(value) else None

    @property
    def protocol(self) -> int | None:
        return _int_or_none(self.txt.get("proto"))

    @property
    def model(self) -> str | None:
        return self.txt.get("model") or None

    @property
    def dims(self) -> int | None:
        return _int_or_none(self.txt.get("dims"))

    @property
    def quant(self) -> str | None:
        return self.txt.get("quant") or None

    @property
    def auth_required(self) -> bool | None:
        return {"1": True, "0": False}.get(self.txt.get("auth", ""))

    @property
    def compatible(self) -> bool:
        """Whether this client speaks the agent's protocol version."""
        return self.protocol == PROTOCOL_VERSION

    def endpoints(self) -> list[str]:
        """``tcp://HOST:PORT`` for each address, in the order to try them."""
        return [f"tcp://{_host_port(address, self.port)}" for address in self.addresses]

    @property
    def endpoint(self) -> str:
        if not self.addresses:
            raise AgentNotFound(f"agent {self.name!r} announced no address", agent=self.name)
        return self.endpoints()[0]

    def label(self) -> str:
        return f"{self.name} ({self.agent_id or 'no id'})"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "agent_id": self.agent_id,
            "host": self.host,
            "port": self.port,
            "addresses": list(self.addresses),
            "protocol": self.protocol,
            "model": self.model,
            "dims": self.dims,
            "quant": self.quant,
            "auth_required": self.auth_required,
            "txt": dict(self.txt),
        }

    @classmethod
    def from_service_info(cls, info: ServiceInfo) -> DiscoveredAgent | None:
        """None for a record that cannot be used (no port, no address)."""
        if not info.port or not info.name.endswith("." + SERVICE_TYPE):
            return None
        addresses = sorted(
            (
                address
                for address in dict.fromkeys(info.parsed_scoped_addresses())
                # A link-local address without its interface cannot be connected to.
                if "%" in address or not ipaddress.ip_address(address).is_link_local
            ),
            key=_address_rank,
        )
        if not addresses:
            return None
        txt = {
            key: value
            for key, value in info.decoded_properties.items()
            if isinstance(key, str) and isinstance(value, str)
        }
        return cls(
            name=info.name[: -len(SERVICE_TYPE) - 1],
            host=info.server or "",
            port=info.port,
            addresses=tuple(addresses),
            txt=txt,
        )


@dataclass(frozen=True)
class BrowseEvent:
    kind: str  # "added" | "updated" | "removed"
    agent: DiscoveredAgent
    at: float  # time.monotonic()


class AgentBrowser:
    """A live view of the agents on the LAN: ``agents()`` now, ``events`` as they change.

    Resolving an agent (SRV, TXT, addresses) runs as its own task so one slow responder does not
    hold up the others. A changed TXT record (``Advertiser.update``) yields an "updated" event,
    a goodbye packet a "removed" event.
    """

    def __init__(
        self,
        interfaces: Sequence[str] = (),
        on_event: Callable[[BrowseEvent], None] | None = None,
    ) -> None:
        self._interfaces = tuple(interfaces)
        self._on_event = on_event
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._agents: dict[str, DiscoveredAgent] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self.events: asyncio.Queue[BrowseEvent] = asyncio.Queue(maxsize=4096)

    async def __aenter__(self) -> AgentBrowser:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._interfaces:
            pairs = resolve_interfaces(self._interfaces)
            interfaces, ip_version = _zeroconf_interfaces(pairs, all_interfaces=False)
        else:
            interfaces, ip_version = InterfaceChoice.All, IPVersion.All
        try:
            self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=ip_version)
        except OSError as exc:
            raise DiscoveryError(f"cannot open mDNS sockets: {exc}") from exc
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change]
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            await self._zc.async_close()
            self._zc = None

    def agents(self) -> list[DiscoveredAgent]:
        return sorted(self._agents.values(), key=lambda agent: (agent.name, agent.agent_id or ""))

    async def wait_for(
        self, predicate: Callable[[list[DiscoveredAgent]], bool], timeout: float
    ) -> bool:
        """Wait until ``predicate(agents())`` holds; False if ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while not predicate(self.agents()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Called on the event loop by python-zeroconf; resolving is async, so hand it to a task.
        if state_change is ServiceStateChange.Removed:
            agent = self._agents.pop(name.lower(), None)
            if agent is not None:
                self._emit("removed", agent)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            found = await info.async_request(zeroconf, _RESOLVE_TIMEOUT_MS)
        except (OSError, BadTypeInNameException) as exc:
            log.debug("%s", kv(event="resolve_failed", name=name, error=str(exc)))
            return
        agent = DiscoveredAgent.from_service_info(info) if found else None
        if agent is None:
            return
        previous = self._agents.get(name.lower())
        if previous == agent:
            return
        self._agents[name.lower()] = agent
        self._emit("added" if previous is None else "updated", agent)

    def _emit(self, kind: str, agent: DiscoveredAgent) -> None:
        event = BrowseEvent(kind, agent, time.monotonic())
        with contextlib.suppress(asyncio.QueueFull):  # nobody reads: the snapshot still works
            self.events.put_nowait(event)
        self._changed.set()
        if self._on_event is not None:
            self._on_event(event)


async def async_browse(
    timeout: float = DEFAULT_BROWSE_TIMEOUT, *, interfaces: Sequence[str] = ()
) -> list[DiscoveredAgent]:
    """Every agent that answers within ``timeout`` seconds (mDNS has no "done" signal)."""
    async with AgentBrowser(interfaces) as browser:
        await asyncio.sleep(timeout)
        return browser.agents()


def _host_part(agent: DiscoveredAgent) -> str:
    """The host name in an instance name ``<host>-<id[:6]>`` (the whole name otherwise)."""
    head, _, tail = agent.name.rpartition("-")
    if head and agent.agent_id and _label(agent.agent_id, 6) == tail:
        return head
    return agent.name


def match_agent(agents: Iterable[DiscoveredAgent], key: str) -> DiscoveredAgent | None:
    """The agent whose id or instance name is ``key`` (names case-insensitive); else the one
    whose host name is ``key``, or whose id starts with ``key`` (4+ characters). AgentNotFound
    when those match several agents."""
    agents = list(agents)
    for agent in agents:
        if agent.agent_id == key or agent.name.lower() == key.lower():
            return agent
    candidates = [a for a in agents if _host_part(a).lower() == key.lower()]
    if not candidates and len(key) >= 4:
        candidates = [a for a in agents if a.agent_id and a.agent_id.startswith(key)]
    if len(candidates) > 1:
        raise AgentNotFound(
            f"{key!r} matches several agents: {', '.join(a.label() for a in candidates)}",
            agent=key,
        )
    return candidates[0] if candidates else None


async def async_find_agent(
    key: str, timeout: float = DEFAULT_BROWSE_TIMEOUT, *, interfaces: Sequence[str] = ()
) -> DiscoveredAgent:
    """The agent with this id or name, as soon as it answers; AgentNotFound after ``timeout``."""
    found: list[DiscoveredAgent] = []

    def matches(agents: list[DiscoveredAgent]) -> bool:
        agent = match_agent(agents, key)
        if agent is not None:
            found.append(agent)
        return agent is not None

    async with AgentBrowser(interfaces) as browser:
        if not await browser.wait_for(matches, timeout):
            seen = ", ".join(agent.label() for agent in browser.agents()) or "none"
            raise AgentNotFound(
                f"no agent with id or name {key!r} answered within {timeout:g}s (seen: {seen})",
                agent=key,
            )
    return found[-1]


def _run(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise InvalidArgument("called from a running event loop: use the async_ variant")


def browse(
    timeout: float = DEFAULT_BROWSE_TIMEOUT, *, interfaces: Sequence[str] = ()
) -> list[DiscoveredAgent]:
    """Blocking ``async_browse``."""
    return _run(async_browse(timeout, interfaces=interfaces))


def find_agent(
    key: str, timeout: float = DEFAULT_BROWSE_TIMEOUT, *, interfaces: Sequence[str] = ()
) -> DiscoveredAgent:
    """Blocking ``async_find_agent``."""
    return _run(async_find_agent(key, timeout, interfaces=interfaces))
