"""CPU feature probe, standard library only.

This module must import and run before anything else is installed (the Makefile calls it to
choose llama.cpp's build flags), so it uses nothing outside the standard library. Every reader
takes a ``root`` so tests can replay captured ``/proc`` trees.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CpuInfo", "probe_cpu", "read_linux_cpuinfo", "read_macos_sysctl"]


@dataclass(frozen=True)
class CpuInfo:
    """What the build and the runtime need to know about the processor."""

    system: str  # "Linux", "Darwin", ...
    arch: str  # normalised: "x86_64", "aarch64", "armv7l", ...
    model_name: str | None = None
    flags: frozenset[str] = field(default_factory=frozenset)
    logical_cores: int | None = None

    def has(self, *names: str) -> bool:
        return all(name in self.flags for name in names)


# Intel Macs spell a few features differently from Linux's /proc/cpuinfo.
_MACOS_X86_ALIASES = {"avx1_0": "avx", "sse4_2": "sse4_2"}

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def normalise_arch(machine: str) -> str:
    machine = machine.strip().lower()
    return _ARCH_ALIASES.get(machine, machine)


def read_linux_cpuinfo(root: Path = Path("/"), machine: str | None = None) -> CpuInfo:
    """Parse ``<root>/proc/cpuinfo``. Missing files or fields give ``None``/empty, never raise."""
    arch = normalise_arch(machine or platform.machine())
    try:
        text = (root / "proc" / "cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CpuInfo(system="Linux", arch=arch)
    model_name: str | None = None
    flags: set[str] = set()
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        value = value.strip()
        if key == "processor":
            processors += 1
        elif key in ("model name", "cpu model", "hardware") and model_name is None and value:
            model_name = value
        elif key in ("flags", "features") and not flags:
            # x86 says "flags", ARM says "Features"; the first CPU is representative.
            flags = set(value.split())
    return CpuInfo(
        system="Linux",
        arch=arch,
        model_name=model_name,
        flags=frozenset(flags),
        logical_cores=processors or None,
    )


def _sysctl(name: str) -> str | None:
    try:
        result = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


def read_macos_sysctl(values: dict[str, str | None] | None = None) -> CpuInfo:
    """Read the CPU from sysctl. ``values`` replays captured output in tests."""

    def get(name: str) -> str | None:
        return values.get(name) if values is not None else _sysctl(name)

    arm64 = get("hw.optional.arm64") == "1"
    flags: set[str] = set()
    if arm64:
        flags.add("neon")
        for key, flag in (
            ("hw.optional.arm.FEAT_DotProd", "dotprod"),
            ("hw.optional.arm.FEAT_I8MM", "i8mm"),
            ("hw.optional.arm.FEAT_BF16", "bf16"),
        ):
            if get(key) == "1":
                flags.add(flag)
    else:
        for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
            for flag in (get(key) or "").split():
                flag = flag.lower().replace(".", "_")
                flags.add(_MACOS_X86_ALIASES.get(flag, flag))
    cores = get("hw.logicalcpu")
    return CpuInfo(
        system="Darwin",
        arch="aarch64" if arm64 else "x86_64",
        model_name=get("machdep.cpu.brand_string"),
        flags=frozenset(flags),
        logical_cores=int(cores) if cores and cores.isdigit() else None,
    )


def probe_cpu(root: Path = Path("/")) -> CpuInfo:
    system = platform.system()
    if system == "Darwin":
        return read_macos_sysctl()
    if system == "Linux":
        return read_linux_cpuinfo(root)
    return CpuInfo(system=system, arch=normalise_arch(platform.machine()))
