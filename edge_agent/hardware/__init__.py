"""Hardware probing. Standard library only: it runs before the project's dependencies exist."""

from .build_flags import llama_cmake_args
from .cpu import CpuInfo, probe_cpu, read_linux_cpuinfo, read_macos_sysctl

__all__ = ["CpuInfo", "llama_cmake_args", "probe_cpu", "read_linux_cpuinfo", "read_macos_sysctl"]
