"""The host probe, replayed on captured trees (tests/fixtures/hosts/<name>/): every field exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import EdgeAgentError
from edge_agent.hardware import (
    HostInfo,
    UnsupportedPlatform,
    describe_host,
    parse_sysctl_output,
    probe_host,
    read_cgroup_limits,
    read_linux_topology,
    read_meminfo,
)

REPO = Path(__file__).resolve().parent.parent
HOSTS = Path(__file__).parent / "fixtures" / "hosts"
KIB = 1024
MIB = 1 << 20
GIB = 1 << 30


def load_host(name: str) -> HostInfo:
    """A captured host: a Linux tree, or ``sysctl.txt`` for a Mac."""
    root = HOSTS / name
    sysctl = root / "sysctl.txt"
    if sysctl.is_file():
        return probe_host(system="Darwin", sysctl=parse_sysctl_output(sysctl.read_text()))
    return probe_host(root, system="Linux")


def fields(host: HostInfo) -> dict[str, Any]:
    return {
        "system": host.system,
        "arch": host.arch,
        "model": host.cpu.model_name,
        "features": set(host.features),
        "logical": host.logical_cores,
        "physical": host.physical_cores,
        "performance": host.performance_cores,
        "efficiency": host.efficiency_cores,
        "board": host.board,
        "mem_total": host.mem_total,
        "mem_available": host.mem_available,
        "cgroup": host.cgroup.version,
        "quota": host.cgroup.cpu_quota,
        "cpuset": host.cgroup.cpuset_cpus,
        "memory_limit": host.cgroup.memory_limit,
    }


AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16"}
X86_AVX2 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}

EXPECTED: dict[str, dict[str, Any]] = {
    "rpi3b-1gb": {
        "system": "Linux",
        "arch": "armv7l",
        "model": "ARM Cortex-A53",
        "features": {"neon"},
        "logical": 4,
        "physical": 4,
        "performance": None,
        "efficiency": None,
        "board": "Raspberry Pi 3 Model B Rev 1.2",
        "mem_total": 948280 * KIB,
        "mem_available": 712344 * KIB,
        "cgroup": 2,
        "quota": None,
        "cpuset": None,
        "memory_limit": None,
    },
    "rpi4-4gb": {
        "system": "Linux",
        "arch": "aarch64",
        "model": "ARM Cortex-A72",
        "features": {"neon"},
        "logical": 4,
        "physical": 4,
        "performance": None,
        "efficiency": None,
        "board": "Raspberry Pi 4 Model B Rev 1.4",
        "mem_total": 3882580 * KIB,
        "mem_available": 3402112 * KIB,
        "cgroup": 2,
        "quota": None,
        "cpuset": 4,
        "memory_limit": None,
    },
    "rpi5-8gb": {
        "system": "Linux",
        "arch": "aarch64",
        "model": "ARM Cortex-A76",
        "features": {"neon", "dotprod", "fp16"},
        "logical": 4,
        "physical": 4,
        "performance": None,
        "efficiency": None,
        "board": "Raspberry Pi 5 Model B Rev 1.0",  # from /sys/firmware/devicetree only
        "mem_total": 8245568 * KIB,
        "mem_available": 7751200 * KIB,
        "cgroup": 2,
        "quota": None,
        "cpuset": None,
        "memory_limit": None,
    },
    "apple-m2-8gb": {
        "system": "Darwin",
        "arch": "aarch64",
        "model": "Apple M2",
        "features": {"neon", "dotprod", "i8mm", "bf16", "fp16"},
        "logical": 8,
        "physical": 8,
        "performance": 4,
        "efficiency": 4,
        "board": "Mac14,2",
        "mem_total": 8 * GIB,
        "mem_available": None,  # sysctl has no honest figure
        "cgroup": None,
        "quota": None,
        "cpuset": None,
        "memory_limit": None,
    },
    "x86-avx2-laptop": {
        "system": "Linux",
        "arch": "x86_64",
        "model": "12th Gen Intel(R) Core(TM) i7-1260P",
        "features": X86_AVX2 | {"avx_vnni"},
        "logical": 16,
        "physical": 12,  # 4 P-cores with two threads each, 8 single-thread E-cores
        "performance": 4,
        "efficiency": 8,
        "board": None,
        "mem_total": 16043284 * KIB,
        "mem_available": 11234560 * KIB,
        "cgroup": 2,
        "quota": None,
        "cpuset": None,
        "memory_limit": None,
    },
    "x86-avx512-amx-server": {
        "system": "Linux",
        "arch": "x86_64",
        "model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
        "features": X86_AVX2 | AVX512 | {"avx_vnni", "amx", "amx_tile", "amx_int8", "amx_bf16"},
        "logical": 8,
        "physical": 4,
        "performance": None,
        "efficiency": None,
        "board": None,
        "mem_total": 32873772 * KIB,
        "mem_available": 31190236 * KIB,
        "cgroup": 2,
        "quota": None,  # cpu.max "max 100000"
        "cpuset": 8,
        "memory_limit": None,
    },
    "x86-old-no-avx2": {
        "system": "Linux",
        "arch": "x86_64",
        "model": "Intel(R) Core(TM) i5-2500 CPU @ 3.30GHz",
        "features": {"sse4_2", "avx"},
        "logical": 4,
        "physical": 4,
        "performance": None,
        "efficiency": None,
        "board": None,
        "mem_total": 8052788 * KIB,
        "mem_available": 6011340 * KIB,
        "cgroup": 1,  # v1 controllers, an empty v2 tree beside them ("hybrid")
        "quota": None,  # cfs_quota_us -1
        "cpuset": 4,
        "memory_limit": None,  # 9223372036854771712 = unlimited
    },
    "container-1.5cpu-512mb": {
        "system": "Linux",
        "arch": "x86_64",
        "model": "AMD EPYC 7B13",
        "features": X86_AVX2,
        "logical": 8,
        "physical": 4,
        "performance": None,
        "efficiency": None,
        "board": None,
        "mem_total": 32880412 * KIB,  # the host's: /proc/meminfo is not namespaced
        "mem_available": 29876540 * KIB,
        "cgroup": 2,
        "quota": 1.5,
        "cpuset": 8,
        "memory_limit": 512 * MIB,
    },
    "container-v1-2cpu-2gb": {
        "system": "Linux",
        "arch": "x86_64",
        "model": "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz",
        "features": X86_AVX2,
        "logical": 8,
        "physical": 4,
        "performance": None,
        "efficiency": None,
        "board": None,
        "mem_total": 16397396 * KIB,
        "mem_available": 13020112 * KIB,
        "cgroup": 1,
        "quota": 2.0,
        "cpuset": 8,
        "memory_limit": 2 * GIB,
    },
}


def test_every_fixture_has_expectations() -> None:
    assert sorted(p.name for p in HOSTS.iterdir() if p.is_dir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_probe_replays_captured_host_exactly(name: str) -> None:
    assert fields(load_host(name)) == EXPECTED[name]


def test_derived_limits_of_the_container() -> None:
    host = load_host("container-1.5cpu-512mb")
    assert host.cpu_limit == 1  # floor(1.5): a throttled thread stalls all the others
    assert host.memory_limit == 512 * MIB  # the cgroup limit, not the host's 32 GB
    text = describe_host(host)
    assert "CPU quota 1.5" in text and "memory limit 0.5 GiB" in text


def test_cpu_id_distinguishes_cpus_and_ignores_the_rest() -> None:
    laptop, server = load_host("x86-avx2-laptop"), load_host("x86-avx512-amx-server")
    assert laptop.cpu_id != server.cpu_id
    assert "amx" in server.cpu_id and "i7-1260P" in laptop.cpu_id
    json.dumps(server.to_json())  # serialisable as is


def test_windows_is_a_clear_typed_error() -> None:
    with pytest.raises(UnsupportedPlatform) as caught:
        probe_host(system="Windows", machine="AMD64")
    assert isinstance(caught.value, EdgeAgentError)
    assert "Windows is not supported" in caught.value.message and "WSL2" in caught.value.message
    assert caught.value.data["machine"] == "x86_64"


def test_empty_tree_is_all_unknown_not_a_crash(tmp_path: Path) -> None:
    host = probe_host(tmp_path, system="Linux", machine="aarch64")
    assert host.arch == "aarch64"
    assert (host.logical_cores, host.physical_cores, host.board) == (None, None, None)
    assert (host.mem_total, host.mem_available) == (None, None)
    assert host.cgroup.version is None and host.cpu_limit is None and host.memory_limit is None
    describe_host(host)  # renders unknowns


def test_garbage_files_are_unknown_not_a_crash(tmp_path: Path) -> None:
    for rel, text in {
        "proc/meminfo": "MemTotal: lots\nMemAvailable:\n",
        "proc/self/cgroup": "nonsense\n0::/a\n",
        "proc/self/mountinfo": "1 2 3\n36 25 0:31 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        "sys/fs/cgroup/a/cpu.max": "fast 100000\n",
        "sys/fs/cgroup/a/memory.max": "-5\n",
        "sys/devices/system/cpu/online": "0-4294967295\n",
        "sys/devices/system/cpu/cpu0/topology/core_id": "x\n",
    }.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert read_meminfo(tmp_path) == (None, None)
    limits = read_cgroup_limits(tmp_path)
    assert (limits.version, limits.cpu_quota, limits.memory_limit) == (2, None, None)
    topology = read_linux_topology(tmp_path)
    assert topology.logical_cpus == 1 and topology.physical_cores is None


def test_old_kernel_without_memavailable(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text(
        "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n"
    )
    assert read_meminfo(tmp_path) == (1000 * KIB, 420 * KIB)


def test_big_little_arm_counts_performance_cores_by_capacity(tmp_path: Path) -> None:
    """RK3588-style: 4x Cortex-A55 (capacity 414) + 4x Cortex-A76 (1024)."""
    cpu = tmp_path / "sys" / "devices" / "system" / "cpu"
    (cpu).mkdir(parents=True)
    (cpu / "online").write_text("0-7\n")
    for n in range(8):
        (cpu / f"cpu{n}" / "topology").mkdir(parents=True)
        (cpu / f"cpu{n}" / "topology" / "core_cpus_list").write_text(f"{n}\n")
        (cpu / f"cpu{n}" / "cpu_capacity").write_text("414\n" if n < 4 else "1024\n")
    topology = read_linux_topology(tmp_path)
    assert (topology.physical_cores, topology.performance_cores, topology.efficiency_cores) == (
        8,
        4,
        4,
    )


def test_cgroup_v2_nested_limit_applies_from_the_parent(tmp_path: Path) -> None:
    """The tightest limit between the process's cgroup and the mount point wins."""
    base = tmp_path / "sys" / "fs" / "cgroup"
    (base / "pod" / "app").mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpu memory\n")
    (base / "pod" / "cpu.max").write_text("50000 100000\n")
    (base / "pod" / "memory.max").write_text("268435456\n")
    (base / "pod" / "app" / "cpu.max").write_text("max 100000\n")
    (base / "pod" / "app" / "memory.max").write_text("max\n")
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "cgroup").write_text("0::/pod/app\n")
    (tmp_path / "proc" / "self" / "mountinfo").write_text(
        "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
    )
    limits = read_cgroup_limits(tmp_path)
    assert (limits.cpu_quota, limits.memory_limit, limits.path) == (0.5, 256 * MIB, "/pod/app")


def test_probe_json_runs_with_the_standard_library_only() -> None:
    """The Makefile runs the probe before dependencies exist: -S hides site-packages."""
    root = HOSTS / "container-1.5cpu-512mb"
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.argv = ['x', '--json',"
        f" '--root', {str(root)!r}]; import runpy; runpy.run_module('edge_agent.hardware',"
        " run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cgroup"]["cpu_quota"] == 1.5 and data["memory_limit"] == 512 * MIB
    assert data["physical_cores"] == 4 and data["cpu_limit"] == 1


@pytest.mark.skipif(sys.platform != "linux", reason="reads this Linux host")
def test_this_host_probe_is_consistent() -> None:
    host = probe_host()
    assert host.logical_cores and host.logical_cores >= (host.physical_cores or 1)
    assert host.mem_total and host.mem_available and host.mem_available <= host.mem_total
