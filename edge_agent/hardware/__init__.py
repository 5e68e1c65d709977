"""Hardware probing. Standard library only: it runs before the project's dependencies exist."""

from .board import read_board_model
from .build_flags import llama_cmake_args
from .cgroup import CgroupLimits, read_cgroup_limits
from .cpu import FEATURES, CpuInfo, probe_cpu, read_linux_cpuinfo, read_macos_sysctl
from .host import (
    HostInfo,
    UnsupportedPlatform,
    describe_host,
    parse_sysctl_output,
    probe_host,
    read_linux_host,
    read_macos_host,
)
from .memory import read_meminfo
from .topology import Topology, read_linux_topology

__all__ = [
    "FEATURES",
    "CgroupLimits",
    "CpuInfo",
    "HostInfo",
    "Topology",
    "UnsupportedPlatform",
    "describe_host",
    "llama_cmake_args",
    "parse_sysctl_output",
    "probe_cpu",
    "probe_host",
    "read_board_model",
    "read_cgroup_limits",
    "read_linux_cpuinfo",
    "read_linux_host",
    "read_linux_topology",
    "read_macos_host",
    "read_macos_sysctl",
    "read_meminfo",
]
