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

__all__ = [
    "FEATURES",
    "CpuInfo",
    "canonical_features",
    "normalise_arch",
    "probe_cpu",
    "read_linux_cpuinfo",
    "read_macos_sysctl",
]


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

    @property
    def features(self) -> frozenset[str]:
        """The ISA features that matter to llama.cpp, under one spelling for every OS."""
        return canonical_features(self.flags)


# The features profiles may name. Linux, macOS and 32/64-bit ARM spell several of them
# differently; _FEATURE_ALIASES folds every spelling onto these.
FEATURES = (
    # x86
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16",
    "amx_tile", "amx_int8", "amx_bf16", "amx",
    # ARM
    "neon", "dotprod", "i8mm", "sve", "sve2", "fp16", "bf16",
)  # fmt: skip

_FEATURE_ALIASES = {
    "asimd": "neon",  # aarch64 Linux
    "asimddp": "dotprod",  # aarch64 Linux
    "asimdhp": "fp16",  # aarch64 Linux: half-precision SIMD arithmetic
    "avx512vnni": "avx512_vnni",  # macOS
    "avx512bf16": "avx512_bf16",  # macOS
    "avxvnni": "avx_vnni",  # macOS
}


def canonical_features(flags: frozenset[str] | set[str]) -> frozenset[str]:
    out = {_FEATURE_ALIASES.get(flag, flag) for flag in flags}
    if "amx_tile" in out:
        out.add("amx")  # llama.cpp's AMX backend needs the tile unit; the umbrella name
    return frozenset(out & set(FEATURES))


# ARM's "CPU part" numbers (implementer 0x41) for the cores found on the boards we profile:
# aarch64 kernels print no "model name", and 32-bit ones print only "ARMv7 Processor".
_ARM_PARTS = {
    0xD03: "Cortex-A53",
    0xD04: "Cortex-A35",
    0xD05: "Cortex-A55",
    0xD07: "Cortex-A57",
    0xD08: "Cortex-A72",
    0xD09: "Cortex-A73",
    0xD0A: "Cortex-A75",
    0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1",
    0xD0D: "Cortex-A77",
    0xD40: "Neoverse-V1",
    0xD41: "Cortex-A78",
    0xD42: "Cortex-A78AE",
    0xD44: "Cortex-X1",
    0xD46: "Cortex-A510",
    0xD47: "Cortex-A710",
    0xD48: "Cortex-X2",
    0xD49: "Neoverse-N2",
    0xD4B: "Cortex-A78C",
    0xD4F: "Neoverse-V2",
}


def _arm_core_name(implementer: str | None, part: str | None) -> str | None:
    if implementer is None or part is None:
        return None
    try:
        implementer_id, part_id = int(implementer, 0), int(part, 0)
    except ValueError:
        return None
    if implementer_id == 0x41 and part_id in _ARM_PARTS:
        return f"ARM {_ARM_PARTS[part_id]}"
    return None


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
    implementer: str | None = None
    part: str | None = None
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
        elif key == "cpu implementer" and implementer is None:
            implementer = value
        elif key == "cpu part" and part is None:
            part = value
    # On ARM the core's name beats "ARMv7 Processor rev 4 (v7l)" or the SoC's "BCM2835".
    model_name = _arm_core_name(implementer, part) or model_name
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
