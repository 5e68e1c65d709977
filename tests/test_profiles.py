"""Profiles: the shipped data files load and validate; each captured host gets its class."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_probe import load_host

from edge_agent.hardware import CpuInfo, HostInfo
from edge_agent.selection.profiles import (
    GENERIC,
    PROFILES_ENV,
    ProfileError,
    default_profiles_dir,
    load_profile,
    load_profiles,
    match_profile,
    threads_for,
)

REPO = Path(__file__).resolve().parent.parent

# host fixture -> (profile, threads, why the threads)
EXPECTED = {
    "rpi3b-1gb": ("raspberry-pi-3", 3, "one core left for the server"),
    "rpi4-4gb": ("raspberry-pi-4", 3, "one core left for the server"),
    "rpi5-8gb": ("raspberry-pi-5", 3, "one core left for the server"),
    "apple-m2-8gb": ("apple-silicon", 4, "the server runs on an efficiency core"),
    "x86-avx2-laptop": ("x86-avx2", 4, "4 performance cores"),
    "x86-avx512-amx-server": ("x86-amx", 3, "one core left for the server"),
    "x86-old-no-avx2": ("x86-legacy", 3, "one core left for the server"),
    "container-1.5cpu-512mb": ("x86-small-memory", 1, "capped at 1 by CPU quota 1.5"),
    "container-v1-2cpu-2gb": ("x86-avx2", 2, "capped at 2 by CPU quota 2"),
}


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


def test_shipped_profiles_load_from_the_checkout(profiles) -> None:
    assert default_profiles_dir({}) == REPO / "profiles"
    names = {p.name for p in profiles}
    assert GENERIC in names and len(names) == len(list((REPO / "profiles").glob("*.toml")))
    for profile in profiles:
        assert profile.quants, profile.name
        assert profile.path is not None and profile.path.stem == profile.name
    pi3 = next(p for p in profiles if p.name == "raspberry-pi-3")
    assert (pi3.index.m, pi3.index.ef_construction, pi3.index.ef_search) == (12, 80, 40)
    assert (pi3.batch_tokens, pi3.max_sequences, pi3.max_context) == (256, 16, 512)
    assert pi3.memory_headroom == 192 << 20 and pi3.mlock is False


def test_env_overrides_the_profiles_dir(tmp_path: Path) -> None:
    assert default_profiles_dir({PROFILES_ENV: str(tmp_path)}) == tmp_path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_host_class_gets_its_profile_and_threads(profiles, name: str) -> None:
    profile_name, threads, why = EXPECTED[name]
    host = load_host(name)
    matched = match_profile(host, profiles)
    assert matched.profile.name == profile_name, matched.reasons
    assert matched.reasons[0].startswith(f"profile {profile_name} ")
    count, reasons = threads_for(host, matched.profile.threads)
    assert count == threads and any(why in r for r in reasons), reasons


def test_jetson_board_matches_its_profile(profiles) -> None:
    host = HostInfo(
        cpu=CpuInfo("Linux", "aarch64", "ARM Cortex-A78AE", frozenset({"asimd", "asimddp"})),
        logical_cores=6,
        physical_cores=6,
        board="NVIDIA Jetson Orin Nano Developer Kit",
        mem_total=8 << 30,
    )
    assert match_profile(host, profiles).profile.name == "jetson"


def test_unknown_host_falls_back_to_generic(profiles) -> None:
    host = HostInfo(cpu=CpuInfo("Linux", "riscv64"))
    matched = match_profile(host, profiles)
    assert matched.profile.name == GENERIC
    assert threads_for(host, matched.profile.threads) == (1, ["core count unknown, assuming 1"])


def test_ram_range_uses_the_cgroup_limit_not_physical_ram(profiles) -> None:
    host = load_host("container-1.5cpu-512mb")
    assert match_profile(host, profiles).profile.name == "x86-small-memory"
    roomy = dataclasses.replace(host, cgroup=dataclasses.replace(host.cgroup, memory_limit=None))
    assert match_profile(roomy, profiles).profile.name == "x86-avx2"


def test_named_profile_is_used_and_unknown_name_is_an_error(profiles) -> None:
    host = load_host("rpi4-4gb")
    assert match_profile(host, profiles, "generic").profile.name == "generic"
    with pytest.raises(ProfileError, match=r"no profile 'pi9'"):
        match_profile(host, profiles, "pi9")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


VALID = """
name = "{name}"
priority = 10
[match]
arch = ["x86_64"]
[settings]
quants = ["Q8_0", "F32"]
"""


def test_minimal_profile_gets_defaults(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path / "mini.toml", VALID.format(name="mini")))
    assert profile.quants == ("Q8_0", "F32") and profile.threads.base == "physical_cores"
    assert profile.memory_headroom == 256 << 20 and profile.flash_attention is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (VALID.format(name="other"), "must match the file name"),
        (VALID.format(name="bad") + "typo = 1\n", "unknown key(s) typo"),
        (VALID.format(name="bad").replace('["Q8_0", "F32"]', "[]"), "must not be empty"),
        (VALID.format(name="bad").replace('"F32"]', '"Q8_0"]'), "duplicates"),
        (VALID.format(name="bad") + "batch_tokens = 7\n", "settings.batch_tokens"),
        (VALID.format(name="bad") + "[settings.threads]\nbase = 'all'\n", "must be one of"),
        (VALID.format(name="bad") + "mlock = 'yes'\n", "true or false"),
        ("name = 'bad'\n[settings\n", "cannot read profile"),
    ],
)
def test_malformed_profiles_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert message in caught.value.message and str(path) in caught.value.message


def test_a_profiles_dir_without_generic_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "mini.toml", VALID.format(name="mini"))
    with pytest.raises(ProfileError, match=r"no generic\.toml"):
        load_profiles(tmp_path)
