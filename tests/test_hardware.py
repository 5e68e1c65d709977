"""The build-flag probe, replayed on captured /proc/cpuinfo trees and sysctl outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.hardware import CpuInfo, llama_cmake_args, read_linux_cpuinfo, read_macos_sysctl

REPO = Path(__file__).resolve().parent.parent

SAPPHIRE_RAPIDS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse"
    " sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc"
    " cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt"
    " aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch bmi1 avx2 smep bmi2 erms"
    " invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw"
    " avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd arat avx512vbmi umip"
    " pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg"
    " avx512_vpopcntdq rdpid cldemote movdiri movdir64b md_clear serialize tsxldtrk amx_bf16"
    " avx512_fp16 amx_tile amx_int8 arch_capabilities"
)
ZEN3 = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse"
    " sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl pni"
    " pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand"
    " hypervisor lahf_lm cmp_legacy abm sse4a misalignsse 3dnowprefetch bmi1 avx2 smep bmi2 erms"
    " invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves vaes"
    " vpclmulqdq rdpid fsrm"
)
SANDY_BRIDGE = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx"
    " fxsr sse sse2 ss ht tm pbe syscall nx rdtscp lm constant_tsc pni pclmulqdq ssse3 cx16"
    " sse4_1 sse4_2 x2apic popcnt aes xsave avx lahf_lm"
)
PI4 = "fp asimd evtstrm crc32 cpuid"


def write_cpuinfo(
    root: Path, model: str, flags: str, processors: int, flag_key: str = "flags"
) -> Path:
    blocks = [
        f"processor\t: {i}\nmodel name\t: {model}\n{flag_key}\t\t: {flags}\n"
        for i in range(processors)
    ]
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "cpuinfo").write_text("\n".join(blocks))
    return root


def flags_of(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("-D").split("=", 1) for a in args if a.startswith("-DGGML_"))


def test_amx_server_gets_avx512_but_never_amx(tmp_path: Path) -> None:
    cpu = read_linux_cpuinfo(
        write_cpuinfo(tmp_path, "Intel Xeon Platinum 8481C", SAPPHIRE_RAPIDS, 4), "x86_64"
    )
    assert cpu.logical_cores == 4 and "amx_tile" in cpu.flags
    flags = flags_of(llama_cmake_args(cpu))
    assert flags["GGML_NATIVE"] == "OFF"  # native would switch AMX on (llama.cpp #20824)
    assert flags["GGML_AMX_TILE"] == flags["GGML_AMX_INT8"] == flags["GGML_AMX_BF16"] == "OFF"
    for option in (
        "GGML_AVX512",
        "GGML_AVX512_VNNI",
        "GGML_AVX512_VBMI",
        "GGML_AVX512_BF16",
        "GGML_AVX_VNNI",
        "GGML_AVX2",
        "GGML_FMA",
        "GGML_F16C",
        "GGML_BMI2",
    ):
        assert flags[option] == "ON", option


def test_avx2_server_without_avx512(tmp_path: Path) -> None:
    cpu = read_linux_cpuinfo(write_cpuinfo(tmp_path, "AMD EPYC", ZEN3, 2), "x86_64")
    flags = flags_of(llama_cmake_args(cpu))
    assert flags["GGML_AVX2"] == flags["GGML_FMA"] == flags["GGML_F16C"] == "ON"
    assert flags["GGML_AVX512"] == flags["GGML_AVX_VNNI"] == "OFF"


def test_old_x86_without_avx2_does_not_get_avx2(tmp_path: Path) -> None:
    cpu = read_linux_cpuinfo(
        write_cpuinfo(tmp_path, "Intel Core i7-2600", SANDY_BRIDGE, 8), "x86_64"
    )
    flags = flags_of(llama_cmake_args(cpu))
    assert flags["GGML_AVX"] == "ON"
    assert (
        flags["GGML_AVX2"] == flags["GGML_FMA"] == flags["GGML_F16C"] == flags["GGML_BMI2"] == "OFF"
    )


def test_raspberry_pi_lets_llama_cpp_detect(tmp_path: Path) -> None:
    root = write_cpuinfo(tmp_path, "", PI4, 4, flag_key="Features")
    cpu = read_linux_cpuinfo(root, "aarch64")
    assert "asimd" in cpu.flags
    args = llama_cmake_args(cpu)
    assert not any(a.startswith("-DGGML_NATIVE") or "AVX" in a or "METAL" in a for a in args)


def test_apple_silicon_enables_metal() -> None:
    cpu = read_macos_sysctl(
        {
            "hw.optional.arm64": "1",
            "hw.optional.arm.FEAT_DotProd": "1",
            "hw.optional.arm.FEAT_I8MM": "1",
            "hw.logicalcpu": "8",
            "machdep.cpu.brand_string": "Apple M2",
        }
    )
    assert cpu.arch == "aarch64" and cpu.model_name == "Apple M2" and cpu.logical_cores == 8
    assert {"neon", "dotprod", "i8mm"} <= cpu.flags
    assert "-DGGML_METAL=ON" in llama_cmake_args(cpu)


def test_missing_cpuinfo_is_unknown_not_a_crash(tmp_path: Path) -> None:
    cpu = read_linux_cpuinfo(tmp_path, "x86_64")
    assert cpu == CpuInfo(system="Linux", arch="x86_64")
    # With nothing known, nothing beyond the baseline is switched on.
    assert all(v == "OFF" for v in flags_of(llama_cmake_args(cpu)).values())


def test_cli_runs_with_the_standard_library_only(tmp_path: Path) -> None:
    """The Makefile runs this before any dependency is installed: -S hides site-packages."""
    root = write_cpuinfo(tmp_path, "Intel Xeon", SAPPHIRE_RAPIDS, 2)
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.argv = ['x', '--cmake-args',"
        f" '--root', {str(root)!r}]; import runpy; runpy.run_module('edge_agent.hardware',"
        " run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    if sys.platform == "linux" and __import__("platform").machine() == "x86_64":
        assert "-DGGML_AVX512=ON" in result.stdout and "-DGGML_AMX_TILE=OFF" in result.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="reads this Linux host's /proc")
def test_this_host_probe_matches_its_cpuinfo() -> None:
    cpu = read_linux_cpuinfo()
    text = Path("/proc/cpuinfo").read_text()
    assert ("avx2" in text.split()) == ("avx2" in cpu.flags)
