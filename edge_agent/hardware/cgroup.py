"""The CPU quota, cpuset and memory limit of this process's cgroup (v1 or v2).

Standard library only (see cpu.py). A container sees the host's /proc/cpuinfo and
/proc/meminfo, so without this a 1.5-CPU, 512 MB container would run 32 threads and load a
model that gets it OOM-killed.

The cgroup of the process comes from ``/proc/self/cgroup``, where each hierarchy is mounted
from ``/proc/self/mountinfo``. Limits nest, so the tightest one on the way from the process's
cgroup up to the mount point applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .topology import parse_cpu_list

__all__ = ["CgroupLimits", "read_cgroup_limits"]

# cgroup v1 writes "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB pages).
_UNLIMITED_BYTES = 1 << 60
_MAX_DEPTH = 64  # bounds the walk up a (possibly corrupt) path


@dataclass(frozen=True)
class CgroupLimits:
    version: int | None = None  # 1, 2, or None where no cgroup filesystem was found
    cpu_quota: float | None = None  # CPUs' worth of time per period; None = unlimited
    cpuset_cpus: int | None = None  # CPUs the cpuset allows; None = unknown
    memory_limit: int | None = None  # bytes; None = unlimited
    path: str | None = None  # the process's cgroup, for the explanation


@dataclass(frozen=True)
class _Mount:
    root: str  # the part of the hierarchy mounted there
    point: Path  # where, inside the probed root
    fstype: str
    options: frozenset[str]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _mounts(root: Path) -> list[_Mount]:
    text = _read(root / "proc" / "self" / "mountinfo")
    if not text:
        return []
    mounts = []
    for line in text.splitlines():
        # "36 25 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct"
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(after) < 3:
            continue
        if after[0] not in ("cgroup", "cgroup2"):
            continue
        point = root / fields[4].lstrip("/")
        mounts.append(_Mount(fields[3], point, after[0], frozenset(after[2].split(","))))
    return mounts


def _memberships(root: Path) -> dict[str, str]:
    """Controller (or "" for v2) -> the process's cgroup path."""
    text = _read(root / "proc" / "self" / "cgroup")
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            out[""] = path
        for controller in controllers.split(","):
            if controller:
                out[controller] = path
    return out


def _chain(mount: _Mount, cgroup_path: str) -> list[Path]:
    """The process's cgroup directory and its ancestors up to the mount point, innermost first.

    With a cgroup namespace (or a bind-mounted subtree) the path in /proc/self/cgroup may not
    lie under the mount's root; then only the mount point itself is known to apply.
    """
    mount_root = mount.root.rstrip("/")
    if cgroup_path == mount_root or cgroup_path.startswith(mount_root + "/"):
        relative = cgroup_path[len(mount_root) :].strip("/")
    else:
        relative = ""
    parts = [p for p in relative.split("/") if p][:_MAX_DEPTH]
    chain = [mount.point.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    existing = [p for p in chain if p.is_dir()]
    return existing or [mount.point]


def _v2_cpu_quota(value: str | None) -> float | None:
    if not value:
        return None
    quota, _, period = value.partition(" ")
    if quota == "max":
        return None
    try:
        q, p = int(quota), int(period or "100000")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _v1_cpu_quota(quota: str | None, period: str | None) -> float | None:
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None  # -1 = no quota


def _bytes(value: str | None) -> int | None:
    if not value or value == "max":
        return None
    try:
        limit = int(value)
    except ValueError:
        return None
    return limit if 0 < limit < _UNLIMITED_BYTES else None


def _cpuset(value: str | None) -> int | None:
    cpus = parse_cpu_list(value) if value else None
    return len(cpus) if cpus else None


_Number = TypeVar("_Number", int, float)


def _tightest(values: list[_Number | None]) -> _Number | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def _v1_mount(mounts: list[_Mount], controller: str) -> _Mount | None:
    return next((m for m in mounts if m.fstype == "cgroup" and controller in m.options), None)


def _fallback_mounts(root: Path) -> list[_Mount]:
    """No mountinfo (a bare captured tree): the conventional /sys/fs/cgroup layout."""
    base = root / "sys" / "fs" / "cgroup"
    if (base / "cgroup.controllers").is_file():
        return [_Mount("/", base, "cgroup2", frozenset())]
    mounts = []
    for name, controllers in (
        ("cpu", {"cpu"}),
        ("cpu,cpuacct", {"cpu", "cpuacct"}),
        ("memory", {"memory"}),
        ("cpuset", {"cpuset"}),
    ):
        if (base / name).is_dir():
            mounts.append(_Mount("/", base / name, "cgroup", frozenset(controllers)))
    return mounts


def read_cgroup_limits(root: Path = Path("/")) -> CgroupLimits:
    """The limits that apply to this process, read under ``root``. Never raises."""
    mounts = _mounts(root) or _fallback_mounts(root)
    if not mounts:
        return CgroupLimits()
    member = _memberships(root)
    quota = memory = cpuset = None
    v2_controllers: set[str] = set()
    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if v2 is not None:
        chain = _chain(v2, member.get("", "/"))
        # On a "hybrid" host the v2 tree is mounted with no controllers (they live in v1):
        # only controllers enabled there count.
        v2_controllers = set((_read(chain[-1] / "cgroup.controllers") or "").split())
        v2_controllers |= {
            name
            for name, file in (("cpu", "cpu.max"), ("memory", "memory.max"))
            if any((d / file).is_file() for d in chain)
        }
        if "cpu" in v2_controllers:
            quota = _tightest([_v2_cpu_quota(_read(d / "cpu.max")) for d in chain])
        if "memory" in v2_controllers:
            memory = _tightest([_bytes(_read(d / "memory.max")) for d in chain])
        if "cpuset" in v2_controllers:
            cpuset = _cpuset(_read(chain[0] / "cpuset.cpus.effective"))
    v1_used = False
    v1_cpu = _v1_mount(mounts, "cpu")
    if v1_cpu is not None and "cpu" not in v2_controllers:
        v1_used = True
        quota = _tightest(
            [
                _v1_cpu_quota(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us"))
                for d in _chain(v1_cpu, member.get("cpu", "/"))
            ]
        )
    v1_memory = _v1_mount(mounts, "memory")
    if v1_memory is not None and "memory" not in v2_controllers:
        v1_used = True
        memory = _tightest(
            [
                _bytes(_read(d / "memory.limit_in_bytes"))
                for d in _chain(v1_memory, member.get("memory", "/"))
            ]
        )
    v1_cpuset = _v1_mount(mounts, "cpuset")
    if v1_cpuset is not None and "cpuset" not in v2_controllers:
        v1_used = True
        innermost = _chain(v1_cpuset, member.get("cpuset", "/"))[0]
        cpuset = _cpuset(
            _read(innermost / "cpuset.effective_cpus") or _read(innermost / "cpuset.cpus")
        )
    if quota is not None and not math.isfinite(quota):
        quota = None
    version = 1 if v1_used else 2 if v2 is not None else None
    path = member.get("cpu") or member.get("memory") if version == 1 else member.get("")
    return CgroupLimits(
        version=version,
        cpu_quota=quota,
        cpuset_cpus=cpuset,
        memory_limit=memory,
        path=path,
    )
