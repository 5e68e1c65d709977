"""Hardware profiles: data files (``profiles/*.toml``) that map a class of host to settings.

A profile says which hosts it is for (system, architecture, ISA features, board, RAM range)
and what to run there: quant preference order, the threads rule, batch sizes, context cap,
mlock, the memory headroom and the vector index parameters. The most specific matching
profile (highest ``priority``) wins; ``generic`` matches everything and always loses.

Standard library only, like the probe: nothing here needs the engine.
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ProfileError
from ..hardware.host import HostInfo

__all__ = [
    "GENERIC",
    "PROFILES_ENV",
    "THREAD_BASES",
    "IndexParams",
    "MatchRules",
    "Profile",
    "ProfileError",
    "ProfileMatch",
    "ThreadsRule",
    "default_profiles_dir",
    "load_profile",
    "load_profiles",
    "match_profile",
    "threads_for",
]

GENERIC = "generic"
PROFILES_ENV = "EDGE_AGENT_PROFILES_DIR"
THREAD_BASES = ("performance_cores", "physical_cores", "logical_cores")
MIB = 1 << 20


@dataclass(frozen=True)
class MatchRules:
    systems: tuple[str, ...] = ()  # empty = any
    arches: tuple[str, ...] = ()
    boards: tuple[str, ...] = ()  # fnmatch patterns on the board model
    features: tuple[str, ...] = ()  # all required
    without_features: tuple[str, ...] = ()  # none may be present
    ram_min_mib: int = 0  # on the effective RAM: min(physical, cgroup limit)
    ram_max_mib: int = 0  # 0 = no upper bound


@dataclass(frozen=True)
class ThreadsRule:
    base: str = "physical_cores"
    # Keep one core for the socket server and the OS when at least this many are left
    # (0 = never). Skipped on hybrid CPUs: the server's light work runs on an efficiency core.
    reserve_for_server_from: int = 4
    max: int = 0  # 0 = no cap


@dataclass(frozen=True)
class IndexParams:
    """hnswlib parameters: graph degree, build-time and query-time candidate lists.

    Same names and ranges as edge_agent.index's IndexConfig, which takes them as they are.
    """

    m: int = 16
    ef_construction: int = 200
    ef_search: int = 64


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    priority: int
    match: MatchRules
    quants: tuple[str, ...]  # preference order, best first
    threads: ThreadsRule
    batch_tokens: int
    max_sequences: int
    max_context: int
    flash_attention: bool | None
    mlock: bool
    memory_headroom: int  # bytes kept free for the runtime, the index and the OS
    min_cosine: float  # measured quality floor: quants below it are used last
    index: IndexParams = field(default_factory=IndexParams)
    path: Path | None = None

    def matches(self, host: HostInfo) -> tuple[bool, str]:
        """Whether this profile is for ``host``, and why (or why not)."""
        rules = self.match
        if rules.systems and host.system not in rules.systems:
            return False, f"system {host.system} not in {list(rules.systems)}"
        if rules.arches and host.arch not in rules.arches:
            return False, f"arch {host.arch} not in {list(rules.arches)}"
        if rules.boards and not any(
            host.board and fnmatch.fnmatchcase(host.board, pattern) for pattern in rules.boards
        ):
            return False, f"board {host.board or 'unknown'} not in {list(rules.boards)}"
        missing = [f for f in rules.features if f not in host.features]
        if missing:
            return False, f"lacks {', '.join(missing)}"
        present = [f for f in rules.without_features if f in host.features]
        if present:
            return False, f"has {', '.join(present)}"
        why = []
        if rules.systems:
            why.append(f"system {host.system}")
        if rules.arches:
            why.append(f"arch {host.arch}")
        if rules.boards:
            why.append(f"board {host.board}")
        if rules.features:
            why.append(f"has {' '.join(rules.features)}")
        if rules.without_features:
            why.append(f"lacks {' '.join(rules.without_features)}")
        if rules.ram_min_mib or rules.ram_max_mib:
            ram = host.memory_limit
            if ram is None:
                return False, "RAM unknown"
            mib = ram / MIB
            if mib < rules.ram_min_mib or (rules.ram_max_mib and mib > rules.ram_max_mib):
                upper = rules.ram_max_mib or "any"
                return False, f"RAM {mib:.0f} MiB outside [{rules.ram_min_mib}, {upper}] MiB"
            why.append(f"RAM {mib:.0f} MiB")
        return True, ", ".join(why) or "matches any host"


@dataclass(frozen=True)
class ProfileMatch:
    profile: Profile
    reasons: tuple[str, ...]


# -- loading ------------------------------------------------------------------------------------


def default_profiles_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$EDGE_AGENT_PROFILES_DIR``, else the profiles shipped with the package.

    Installed, they live in the ``edge_agent._profiles`` package (see pyproject's
    package-dir mapping); in a source checkout, in the repository's top-level ``profiles/``.
    """
    env = os.environ if environ is None else environ
    if env.get(PROFILES_ENV):
        return Path(env[PROFILES_ENV]).expanduser()
    package = Path(__file__).resolve().parent.parent  # edge_agent/
    installed = package / "_profiles"
    if (installed / f"{GENERIC}.toml").is_file():
        return installed
    checkout = package.parent / "profiles"
    # Only trust a sibling "profiles" folder in a source checkout: installed into
    # site-packages, some other distribution could own a folder of that name.
    if (package.parent / "pyproject.toml").is_file() and (checkout / f"{GENERIC}.toml").is_file():
        return checkout
    return installed


_TOP_KEYS = {"name", "description", "priority", "match", "settings"}
_MATCH_KEYS = {
    "system",
    "arch",
    "board",
    "features",
    "without_features",
    "ram_min_mib",
    "ram_max_mib",
}
_SETTINGS_KEYS = {
    "quants",
    "threads",
    "batch_tokens",
    "max_sequences",
    "max_context",
    "flash_attention",
    "mlock",
    "memory_headroom_mib",
    "min_cosine",
    "index",
}
_THREADS_KEYS = {"base", "reserve_for_server_from", "max"}
_INDEX_KEYS = {"m", "ef_construction", "ef_search"}


class _Reader:
    """Typed access to one TOML table, naming file and key in every error."""

    def __init__(self, path: Path, table: Mapping[str, Any], where: str, allowed: set[str]):
        self.path, self.table, self.where = path, table, where
        unknown = sorted(set(table) - allowed)
        if unknown:
            self.fail(f"unknown key(s) {', '.join(unknown)}")

    def fail(self, message: str, key: str | None = None) -> None:
        at = f"{self.where}.{key}" if key else self.where
        raise ProfileError(f"{self.path}: [{at}] {message}", path=str(self.path))

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            self.fail(f"must be an integer in [{low}, {high}], got {value!r}", key)
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.table.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.fail(f"must be a number, got {value!r}", key)
        if not low <= value <= high:
            self.fail(f"must be in [{low}, {high}], got {value!r}", key)
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            self.fail(f"must be true or false, got {value!r}", key)
        return value

    def text(self, key: str, default: str | None = None) -> str:
        value = self.table.get(key, default)
        if not isinstance(value, str) or not value:
            self.fail(f"must be a non-empty string, got {value!r}", key)
        return value

    def strings(self, key: str, required: bool = False) -> tuple[str, ...]:
        value = self.table.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(f"must be a list of non-empty strings, got {value!r}", key)
        if required and not value:
            self.fail("must not be empty", key)
        if len(set(value)) != len(value):
            self.fail(f"has duplicates: {value!r}", key)
        return tuple(value)

    def sub(self, key: str, allowed: set[str]) -> _Reader:
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            self.fail("must be a table", key)
        return _Reader(self.path, value, f"{self.where}.{key}", allowed)


def load_profile(path: Path) -> Profile:
    """Parse and validate one profile file (ProfileError names the file and the key)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}", path=str(path)) from exc
    top = _Reader(path, data, "profile", _TOP_KEYS)
    name = top.text("name")
    if name != path.stem:
        top.fail(f"name {name!r} must match the file name {path.stem!r}", "name")
    match = top.sub("match", _MATCH_KEYS)
    settings = top.sub("settings", _SETTINGS_KEYS)
    threads = settings.sub("threads", _THREADS_KEYS)
    index = settings.sub("index", _INDEX_KEYS)
    base = threads.text("base", "physical_cores")
    if base not in THREAD_BASES:
        threads.fail(f"must be one of {THREAD_BASES}, got {base!r}", "base")
    flash = settings.table.get("flash_attention", "auto")
    if flash not in (True, False, "auto"):
        settings.fail(f'must be true, false or "auto", got {flash!r}', "flash_attention")
    ram_min = match.integer("ram_min_mib", 0, 0, 1 << 30)
    ram_max = match.integer("ram_max_mib", 0, 0, 1 << 30)
    if ram_max and ram_max < ram_min:
        match.fail(f"ram_max_mib {ram_max} is below ram_min_mib {ram_min}", "ram_max_mib")
    return Profile(
        name=name,
        description=top.text("description", name),
        priority=top.integer("priority", 0, 0, 1000),
        match=MatchRules(
            systems=match.strings("system"),
            arches=match.strings("arch"),
            boards=match.strings("board"),
            features=match.strings("features"),
            without_features=match.strings("without_features"),
            ram_min_mib=ram_min,
            ram_max_mib=ram_max,
        ),
        quants=settings.strings("quants", required=True),
        threads=ThreadsRule(
            base=base,
            reserve_for_server_from=threads.integer("reserve_for_server_from", 4, 0, 4096),
            max=threads.integer("max", 0, 0, 512),
        ),
        batch_tokens=settings.integer("batch_tokens", 512, 32, 8192),
        max_sequences=settings.integer("max_sequences", 64, 1, 256),
        max_context=settings.integer("max_context", 2048, 16, 32768),
        flash_attention=None if flash == "auto" else bool(flash),
        mlock=settings.boolean("mlock", False),
        memory_headroom=settings.integer("memory_headroom_mib", 256, 0, 1 << 20) * MIB,
        min_cosine=settings.number("min_cosine", 0.98, 0.0, 1.0),
        index=IndexParams(
            m=index.integer("m", 16, 2, 128),
            ef_construction=index.integer("ef_construction", 200, 8, 4096),
            ef_search=index.integer("ef_search", 64, 1, 65536),
        ),
        path=path,
    )


def load_profiles(directory: Path | None = None) -> tuple[Profile, ...]:
    """Every ``*.toml`` in ``directory`` (default: default_profiles_dir()), generic included."""
    directory = Path(directory) if directory is not None else default_profiles_dir()
    try:
        paths = sorted(directory.glob("*.toml"))
    except OSError as exc:
        raise ProfileError(f"cannot list profiles in {directory}: {exc}") from exc
    profiles = tuple(load_profile(path) for path in paths)
    if not any(p.name == GENERIC for p in profiles):
        raise ProfileError(
            f"no {GENERIC}.toml in {directory}: the fallback profile is required"
            f" (set {PROFILES_ENV} to a folder of profiles)",
            path=str(directory),
        )
    return profiles


# -- matching and rules -------------------------------------------------------------------------


def match_profile(
    host: HostInfo, profiles: Sequence[Profile], name: str | None = None
) -> ProfileMatch:
    """The profile for ``host``: the named one, else the highest-priority match.

    Ties go to the alphabetically first name, so the choice never depends on file order.
    """
    by_name = {p.name: p for p in profiles}
    if name is not None:
        if name not in by_name:
            raise ProfileError(
                f"no profile {name!r} (known: {', '.join(sorted(by_name))})", profile=name
            )
        return ProfileMatch(by_name[name], (f"profile {name} chosen by override",))
    matched: list[tuple[Profile, str]] = []
    for profile in profiles:
        ok, why = profile.matches(host)
        if ok:
            matched.append((profile, why))
    if not matched:
        raise ProfileError("no profile matches this host, not even generic")
    matched.sort(key=lambda item: (-item[0].priority, item[0].name))
    chosen, why = matched[0]
    reasons = [f"profile {chosen.name} (priority {chosen.priority}): {why}"]
    others = [p.name for p, _ in matched[1:]]
    if others:
        reasons.append(f"also matched, lower priority: {', '.join(others)}")
    return ProfileMatch(chosen, tuple(reasons))


def threads_for(host: HostInfo, rule: ThreadsRule) -> tuple[int, list[str]]:
    """Threads for llama.cpp on ``host`` under ``rule``, with how the number came about."""
    reasons: list[str] = []
    base: int | None
    if rule.base == "performance_cores" and host.hybrid:
        base, what = host.performance_cores, "performance cores"
    elif rule.base in ("performance_cores", "physical_cores") and host.physical_cores:
        base, what = host.physical_cores, "physical cores"
    else:
        base, what = host.logical_cores, "logical cores"
    if not base:
        base, what = 1, "core count unknown, assuming 1"
    reasons.append(f"{base} {what}" if base != 1 or "unknown" not in what else what)
    threads = base
    cap = host.cpu_limit
    if cap is not None and cap < threads:
        threads = cap
        quota = host.cgroup.cpu_quota
        source = f"CPU quota {quota:g}" if quota is not None else f"{cap} usable CPUs"
        reasons.append(f"capped at {cap} by {source}")
    if rule.reserve_for_server_from and threads >= rule.reserve_for_server_from:
        if host.hybrid:
            reasons.append("no core reserved: the server runs on an efficiency core")
        else:
            threads -= 1
            reasons.append("one core left for the server")
    if rule.max and threads > rule.max:
        threads = rule.max
        reasons.append(f"profile cap {rule.max}")
    return max(1, threads), reasons
