"""llama.cpp build flags that follow the host's real CPU features.

Why not ``GGML_NATIVE``: a native build on a CPU with AMX enables llama.cpp's AMX backend,
which segfaults on Q8_0 and K-quant models (llama.cpp issue #20824). So on x86-64 we turn
native detection off and enable exactly the SIMD extensions the CPU reports, never AMX.
"""

from __future__ import annotations

from .cpu import CpuInfo

__all__ = ["X86_FEATURE_OPTIONS", "llama_cmake_args"]

# GGML option -> the /proc/cpuinfo flags that must all be present to turn it on.
X86_FEATURE_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd")),
    ("GGML_AVX512_VBMI", ("avx512f", "avx512vbmi")),  # sic: Linux spells it so
    ("GGML_AVX512_VNNI", ("avx512f", "avx512_vnni")),
    ("GGML_AVX512_BF16", ("avx512f", "avx512_bf16")),
)

_ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")

# Parts of the llama-cpp-python build an embedding agent never loads: skipping them shortens
# the compile on small machines.
_SLIM_BUILD = ("-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")


# Portable ARM builds target the first 64-bit ARM ISA (Raspberry Pi 3/4's Cortex-A53/A72): with
# native detection, an image built on a Pi 5, a Graviton or under QEMU would use dot-product or
# SVE instructions that crash older boards with SIGILL.
_ARM_BASELINE = {"aarch64": "armv8-a"}


def llama_cmake_args(cpu: CpuInfo, portable: bool = False) -> list[str]:
    """CMake arguments for building llama-cpp-python on ``cpu``.

    ``portable``: the build must run on any CPU of this architecture (container images), so
    native detection is off everywhere; x86-64 gets the features ``cpu`` lists (pass the
    baseline, see packaging/build_engine.py's portable_cpu), ARM its baseline ISA.
    """
    args: list[str] = []
    if portable and cpu.arch != "x86_64":
        args.append("-DGGML_NATIVE=OFF")
        if cpu.arch in _ARM_BASELINE:
            args.append(f"-DGGML_CPU_ARM_ARCH={_ARM_BASELINE[cpu.arch]}")
    elif cpu.system == "Darwin" and cpu.arch == "aarch64":
        args.append("-DGGML_METAL=ON")
    elif cpu.arch == "x86_64":
        args.append("-DGGML_NATIVE=OFF")
        for option, needed in X86_FEATURE_OPTIONS:
            args.append(f"-D{option}={'ON' if cpu.has(*needed) else 'OFF'}")
        args.extend(f"-D{option}=OFF" for option in _ALWAYS_OFF)
    # ARM and anything else: llama.cpp's own native detection is correct there.
    args.extend(_SLIM_BUILD)
    return args
