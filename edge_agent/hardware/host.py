"""The whole-host probe: CPU, core topology, board, memory and container limits.

Standard library only (see cpu.py). Every reader takes an injectable root (Linux) or sysctl
values (macOS), so tests replay captured hosts; anything unknown is None, never an exception.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UnsupportedPlatform
from .board import board_family, read_board_model
from .cgroup import CgroupLimits, read_cgroup_limits
from .cpu import CpuInfo, _sysctl, normalise_arch, read_linux_cpuinfo, read_macos_sysctl
from .memory import read_meminfo
from .topology import read_linux_topology

__all__ = [
    "MACOS_SYSCTL_KEYS",
    "HostInfo",
    "UnsupportedPlatform",
    "describe_host",
    "parse_sysctl_output",
    "probe_host",
    "read_linux_host",
    "read_macos_host",
]


@dataclass(frozen=True)
class HostInfo:
    cpu: CpuInfo
    logical_cores: int | None = None  # online logical CPUs
    physical_cores: int | None = None
    performance_cores: int | None = None  # physical; None unless hybrid
    efficiency_cores: int | None = None  # physical; None unless hybrid
    board: str | None = None
    mem_total: int | None = None  # bytes
    mem_available: int | None = None  # bytes
    cgroup: CgroupLimits = field(default_factory=CgroupLimits)
    affinity_cpus: int | None = None  # sched_getaffinity, live probes only

    @property
    def system(self) -> str:
        return self.cpu.system

    @property
    def arch(self) -> str:
        return self.cpu.arch

    @property
    def features(self) -> frozenset[str]:
        return self.cpu.features

    @property
    def hybrid(self) -> bool:
        return bool(self.efficiency_cores) and bool(self.performance_cores)

    @property
    def board_family(self) -> str | None:
        return board_family(self.board)

    @property
    def cpu_limit(self) -> int | None:
        """Whole CPUs this process may keep busy: cpuset, affinity and quota (rounded down,
        because a thread that is throttled mid-layer stalls every other thread)."""
        limits = [v for v in (self.cgroup.cpuset_cpus, self.affinity_cpus) if v]
        if self.cgroup.cpu_quota is not None:
            limits.append(max(1, math.floor(self.cgroup.cpu_quota + 1e-9)))
        return min(limits) if limits else None

    @property
    def memory_limit(self) -> int | None:
        """The RAM this process can ever have: physical RAM or the cgroup limit if lower."""
        known = [v for v in (self.mem_total, self.cgroup.memory_limit) if v]
        return min(known) if known else None

    @property
    def cpu_id(self) -> str:
        """Identifies the CPU for measurement and self-test records: same id, same results."""
        model = self.cpu.model_name or "unknown"
        return f"{self.arch} {model} [{' '.join(sorted(self.features))}]"

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "arch": self.arch,
            "model_name": self.cpu.model_name,
            "flags": sorted(self.cpu.flags),
            "features": sorted(self.features),
            "logical_cores": self.logical_cores,
            "physical_cores": self.physical_cores,
            "performance_cores": self.performance_cores,
            "efficiency_cores": self.efficiency_cores,
            "board": self.board,
            "board_family": self.board_family,
            "mem_total": self.mem_total,
            "mem_available": self.mem_available,
            "cgroup": {
                "version": self.cgroup.version,
                "path": self.cgroup.path,
                "cpu_quota": self.cgroup.cpu_quota,
                "cpuset_cpus": self.cgroup.cpuset_cpus,
                "memory_limit": self.cgroup.memory_limit,
            },
            "affinity_cpus": self.affinity_cpus,
            "cpu_limit": self.cpu_limit,
            "memory_limit": self.memory_limit,
            "cpu_id": self.cpu_id,
        }


def _machine_for(root: Path, machine: str | None) -> str | None:
    if machine:
        return machine
    try:
        # The kernel's own answer (Linux >= 5.x), present in captured trees too.
        arch = (root / "proc" / "sys" / "kernel" / "arch").read_text(encoding="utf-8").strip()
    except OSError:
        arch = ""
    if arch:
        return arch
    if root == Path("/"):
        return platform.machine()
    return None


def _guess_arch(cpu: CpuInfo) -> str:
    """A captured tree without kernel/arch: infer from the flag vocabulary."""
    if "sse2" in cpu.flags or "lm" in cpu.flags:
        return "x86_64"
    if "asimd" in cpu.flags:
        return "aarch64"
    if "neon" in cpu.flags or "vfp" in cpu.flags:
        return "armv7l"
    return "unknown"


def _affinity() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def read_linux_host(root: Path = Path("/"), machine: str | None = None) -> HostInfo:
    """Probe a Linux host under ``root`` (``/`` for this one, a captured tree in tests)."""
    found = _machine_for(root, machine)
    cpu = read_linux_cpuinfo(root, found or "unknown")
    if found is None:
        cpu = CpuInfo(
            system=cpu.system,
            arch=_guess_arch(cpu),
            model_name=cpu.model_name,
            flags=cpu.flags,
            logical_cores=cpu.logical_cores,
        )
    topology = read_linux_topology(root)
    total, available = read_meminfo(root)
    return HostInfo(
        cpu=cpu,
        logical_cores=topology.logical_cpus or cpu.logical_cores,
        physical_cores=topology.physical_cores,
        performance_cores=topology.performance_cores,
        efficiency_cores=topology.efficiency_cores,
        board=read_board_model(root),
        mem_total=total,
        mem_available=available,
        cgroup=read_cgroup_limits(root),
        affinity_cpus=_affinity() if root == Path("/") else None,
    )


# What read_macos_host asks sysctl for (the keys a captured fixture should hold).
MACOS_SYSCTL_KEYS = (
    "hw.optional.arm64",
    "hw.optional.arm.FEAT_DotProd",
    "hw.optional.arm.FEAT_I8MM",
    "hw.optional.arm.FEAT_BF16",
    "hw.optional.arm.FEAT_FP16",
    "hw.logicalcpu",
    "hw.physicalcpu",
    "hw.nperflevels",
    "hw.perflevel0.physicalcpu",
    "hw.perflevel1.physicalcpu",
    "hw.memsize",
    "hw.model",
    "machdep.cpu.brand_string",
    "machdep.cpu.features",
    "machdep.cpu.leaf7_features",
)


def parse_sysctl_output(text: str) -> dict[str, str]:
    """``sysctl -a`` / ``sysctl name ...`` output ("name: value" lines) as a dict."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() and " " not in name.strip():
            values[name.strip()] = value.strip()
    return values


def _int(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def read_macos_host(values: Mapping[str, str | None] | None = None) -> HostInfo:
    """Probe macOS through sysctl; ``values`` replays captured output."""
    get: Callable[[str], str | None]
    if values is None:
        cache: dict[str, str | None] = {}

        def get(name: str) -> str | None:
            if name not in cache:
                cache[name] = _sysctl(name)
            return cache[name]

    else:
        get = values.get
    cpu = read_macos_sysctl({key: get(key) for key in MACOS_SYSCTL_KEYS})
    if get("hw.optional.arm.FEAT_FP16") == "1":
        cpu = CpuInfo(
            system=cpu.system,
            arch=cpu.arch,
            model_name=cpu.model_name,
            flags=cpu.flags | {"fp16"},
            logical_cores=cpu.logical_cores,
        )
    levels = _int(get("hw.nperflevels")) or 0
    performance = efficiency = None
    if levels >= 2:
        # perflevel0 is the fastest class on Apple silicon.
        performance = _int(get("hw.perflevel0.physicalcpu"))
        efficiency = _int(get("hw.perflevel1.physicalcpu"))
    return HostInfo(
        cpu=cpu,
        logical_cores=cpu.logical_cores,
        physical_cores=_int(get("hw.physicalcpu")),
        performance_cores=performance,
        efficiency_cores=efficiency,
        board=get("hw.model"),
        mem_total=_int(get("hw.memsize")),
        # macOS keeps most "free" memory as compressible cache; sysctl has no honest
        # MemAvailable, so it stays unknown and selection budgets from the total.
        mem_available=None,
        affinity_cpus=None,
    )


def probe_host(
    root: Path = Path("/"),
    *,
    system: str | None = None,
    machine: str | None = None,
    sysctl: Mapping[str, str | None] | None = None,
) -> HostInfo:
    """Probe this host (or replay one: ``root`` for Linux trees, ``sysctl`` for macOS).

    Raises UnsupportedPlatform on Windows and other systems the probe cannot read.
    """
    system = system or platform.system()
    if system == "Linux":
        return read_linux_host(root, machine)
    if system == "Darwin":
        return read_macos_host(sysctl)
    hint = " (use WSL2)" if system == "Windows" else ""
    raise UnsupportedPlatform(
        f"edge-agent runs on Linux and macOS; {system or 'this system'} is not supported{hint}",
        system=system,
        machine=normalise_arch(machine or platform.machine()),
    )


def _size(value: int | None) -> str:
    return f"{value / (1 << 30):.1f} GiB" if value else "unknown"


def describe_host(host: HostInfo) -> str:
    """A few human lines for ``edge-agent probe``."""
    cores = [f"{host.logical_cores or '?'} logical", f"{host.physical_cores or '?'} physical"]
    if host.hybrid:
        cores.append(f"{host.performance_cores} performance + {host.efficiency_cores} efficiency")
    quota = host.cgroup.cpu_quota
    limits = []
    if host.cgroup.version is not None:
        limits.append(f"cgroup v{host.cgroup.version}")
    limits.append(f"CPU quota {quota:g}" if quota is not None else "no CPU quota")
    if host.cgroup.cpuset_cpus:
        limits.append(f"cpuset {host.cgroup.cpuset_cpus} CPUs")
    limit = host.cgroup.memory_limit
    limits.append(f"memory limit {_size(limit)}" if limit else "no memory limit")
    lines = [
        f"system    {host.system} {host.arch}",
        f"cpu       {host.cpu.model_name or 'unknown'} ({', '.join(cores)})",
        f"features  {' '.join(sorted(host.features)) or 'none known'}",
        f"board     {host.board or '-'}",
        f"memory    {_size(host.mem_total)} total, {_size(host.mem_available)} available",
        f"limits    {', '.join(limits)}",
    ]
    return "\n".join(lines)
