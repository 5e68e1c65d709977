"""Core topology from ``/sys/devices/system/cpu``: physical cores and hybrid core classes.

Standard library only (see cpu.py). Why it matters: llama.cpp's threads synchronise at every
layer, so one thread on a slow efficiency core or on a second hyper-thread of a busy core
holds back all the others. The threads rule therefore counts physical performance cores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Topology", "parse_cpu_list", "read_linux_topology"]

# Cores whose cpu_capacity is at least this share of the fastest count as performance cores:
# phones and RK3588-class boards have a "prime" and a "big" tier that both belong there.
_PERFORMANCE_SHARE = 0.7
_MAX_CPUS = 8192  # bounds a corrupt "0-4294967295" list


@dataclass(frozen=True)
class Topology:
    logical_cpus: int | None = None  # online logical CPUs
    physical_cores: int | None = None
    performance_cores: int | None = None  # physical; None unless the CPU is hybrid
    efficiency_cores: int | None = None  # physical; None unless the CPU is hybrid


def parse_cpu_list(text: str) -> list[int] | None:
    """``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]``; None if malformed."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            return None
        low = int(match.group(1))
        high = int(match.group(2) or low)
        if high < low or high - low >= _MAX_CPUS or len(cpus) + high - low >= _MAX_CPUS:
            return None
        cpus.extend(range(low, high + 1))
    return cpus


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _core_key(cpu_dir: Path) -> str | None:
    """One key per physical core: the list of its hardware threads, else package/core ids."""
    topology = cpu_dir / "topology"
    for name in ("core_cpus_list", "thread_siblings_list"):
        value = _read(topology / name)
        if value:
            return value
    package, core = _read(topology / "physical_package_id"), _read(topology / "core_id")
    if package is not None and core is not None:
        return f"{package}:{core}"
    return None


def _classes(base: Path, online: list[int]) -> tuple[set[int], set[int]] | None:
    """(performance, efficiency) logical CPUs on a hybrid CPU, None on a uniform one."""
    # Intel hybrid parts register one perf PMU per core type.
    core = _read(base / "devices" / "cpu_core" / "cpus")
    atom = _read(base / "devices" / "cpu_atom" / "cpus")
    if core and atom:
        fast, slow = parse_cpu_list(core), parse_cpu_list(atom)
        if fast and slow:
            return set(fast) & set(online), set(slow) & set(online)
    # ARM big.LITTLE: the scheduler's relative capacity per CPU (1024 = the fastest).
    capacities: dict[int, int] = {}
    for cpu in online:
        value = _read(base / "devices" / "system" / "cpu" / f"cpu{cpu}" / "cpu_capacity")
        if value is None or not value.isdigit():
            return None
        capacities[cpu] = int(value)
    if not capacities or len(set(capacities.values())) < 2:
        return None
    top = max(capacities.values())
    fast_set = {cpu for cpu, cap in capacities.items() if cap >= _PERFORMANCE_SHARE * top}
    return fast_set, set(capacities) - fast_set


def read_linux_topology(root: Path = Path("/")) -> Topology:
    """Read ``<root>/sys``. Anything missing is None, never an exception."""
    base = root / "sys"
    cpu_root = base / "devices" / "system" / "cpu"
    online_text = _read(cpu_root / "online")
    online = parse_cpu_list(online_text) if online_text else None
    if not online:
        try:
            online = sorted(
                int(p.name[3:]) for p in cpu_root.glob("cpu[0-9]*") if p.name[3:].isdigit()
            )
        except OSError:
            online = []
    if not online:
        return Topology()
    keys: dict[int, str] = {}
    for cpu in online:
        key = _core_key(cpu_root / f"cpu{cpu}")
        if key is not None:
            keys[cpu] = key
    physical = len(set(keys.values())) if len(keys) == len(online) else None
    performance = efficiency = None
    classes = _classes(base, online)
    if classes is not None and physical is not None:
        fast, slow = classes
        performance = len({keys[cpu] for cpu in fast})
        efficiency = len({keys[cpu] for cpu in slow})
    return Topology(
        logical_cpus=len(online),
        physical_cores=physical,
        performance_cores=performance,
        efficiency_cores=efficiency,
    )
