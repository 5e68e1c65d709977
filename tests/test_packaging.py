"""Service files (systemd, launchd), the container build script and the Dockerfile."""

from __future__ import annotations

import os
import plistlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import load_config
from edge_agent.daemon.service_install import (
    LAUNCHD_LABEL,
    apply,
    install_plan,
    launchd_plist,
    system_config,
    systemd_unit,
    sysusers_conf,
    uninstall_plan,
)
from edge_agent.hardware import CpuInfo, llama_cmake_args
from edge_agent.models import DEFAULT_MODEL, ModelStore

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
sys.path.insert(0, str(PACKAGING))
import build_engine  # noqa: E402
import build_portable  # noqa: E402

EXE = str(Path(sys.executable).absolute().parent / "edge-agent")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def sections(dry_run: str) -> dict[str, str]:
    """``==> NAME (...) <==`` headed sections of a dry-run, by NAME."""
    out: dict[str, str] = {}
    name = None
    for line in dry_run.splitlines(keepends=True):
        header = re.match(r"^==> (\S+)(?: \(.*\))? <==$", line.rstrip("\n"))
        if header:
            name = header.group(1)
            out[name] = ""
        elif name is not None:
            out[name] += line
    return out


def unit_settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


# -- systemd ------------------------------------------------------------------------------------


def check_unit_structure(unit: str, executable: str) -> None:
    """What the unit must say, checked without systemd: readiness, watchdog, restart, user,
    the directories systemd creates, the sandbox."""
    s = unit_settings(unit)
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "User": "edge-agent",
        "Group": "edge-agent",
        "StateDirectory": "edge-agent",
        "RuntimeDirectory": "edge-agent",
        "KillMode": "mixed",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
        "WantedBy": "multi-user.target",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], (key, s.get(key))
    assert int(s["WatchdogSec"][0]) >= 10
    assert s["ExecStart"] == [f"{executable} serve"]
    assert s["ProtectHome"][0] in ("yes", "read-only")
    assert "[Unit]" in unit and "[Service]" in unit and "[Install]" in unit


def test_systemd_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    unit = systemd_unit([EXE])
    check_unit_structure(unit, EXE)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        # .ci/run installs the Debian package `systemd`; elsewhere say loudly what was skipped.
        warnings.warn(
            "systemd-analyze not found (apt-get install systemd): the unit was only checked"
            " structurally, not with `systemd-analyze verify`",
            stacklevel=1,
        )
        return
    path = tmp_path / "edge-agent.service"
    path.write_text(unit, encoding="utf-8")
    result = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # verify reports unknown keys and bad values as warnings with exit 0: there must be none.
    assert result.stdout + result.stderr == "", result.stdout + result.stderr
    # ...and it does report them: the check above can fail.
    bad = tmp_path / "bad.service"
    bad.write_text(unit.replace("ProtectSystem=strict", "ProtectSystem=strict\nProtectSytem=1"))
    flagged = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True)
    assert "Unknown key 'ProtectSytem'" in flagged.stdout + flagged.stderr
    # The sandbox keeps the exposure score low (a bare unit scores 9.6 "UNSAFE").
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=30", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert security.returncode == 0, security.stdout[-2000:]
    assert re.search(r"Overall exposure level for edge-agent.service: [0-2]\.\d", security.stdout)


def test_the_units_paths_are_the_ones_the_config_points_at(tmp_path: Path) -> None:
    """The socket lies in the RuntimeDirectory, the data in the StateDirectory: the only
    places ProtectSystem=strict lets the daemon write."""
    settings = unit_settings(systemd_unit([EXE]))
    path = tmp_path / "config.toml"
    path.write_text(system_config(), encoding="utf-8")
    config = load_config({}, {"EDGE_AGENT_HOME": str(tmp_path)}, path)
    runtime = Path("/run") / settings["RuntimeDirectory"][0]
    state = Path("/var/lib") / settings["StateDirectory"][0]
    assert config["socket"].parent == runtime
    assert config["socket_mode"] == "0660"  # group members may connect
    for key in ("models_dir", "index_dir", "state_dir"):
        assert config[key].is_relative_to(state), key
    assert settings["Environment"][0] == "EDGE_AGENT_CONFIG=/etc/edge-agent/config.toml"


def test_an_executable_in_a_home_directory_gets_read_only_homes() -> None:
    assert unit_settings(systemd_unit(["/opt/edge-agent/bin/edge-agent"]))["ProtectHome"] == ["yes"]
    assert unit_settings(systemd_unit(["/home/pi/venv/bin/edge-agent"]))["ProtectHome"] == [
        "read-only"
    ]
    odd = systemd_unit(["/opt/my tools/edge-agent", "--config", "/etc/x%y.toml"])
    assert unit_settings(odd)["ExecStart"] == [
        '"/opt/my tools/edge-agent" --config /etc/x%%y.toml serve'
    ]


def test_install_dry_run_prints_every_file_and_command() -> None:
    result = cli("service", "install", "--dry-run", "--platform", "linux", "--exec", EXE)
    assert result.returncode == 0, result.stderr
    parts = sections(result.stdout)
    assert parts["/etc/systemd/system/edge-agent.service"] == systemd_unit([EXE])
    assert parts["/etc/sysusers.d/edge-agent.conf"] == sysusers_conf()
    assert parts["/etc/edge-agent/config.toml"] == system_config()
    assert parts["commands"].splitlines() == [
        "systemd-sysusers /etc/sysusers.d/edge-agent.conf",
        "systemctl daemon-reload",
        "systemctl enable --now edge-agent.service",
    ]
    removed = cli("service", "uninstall", "--dry-run", "--platform", "linux")
    assert sections(removed.stdout)["remove"].strip() == "/etc/systemd/system/edge-agent.service"


def test_the_shipped_systemd_files_are_what_install_writes() -> None:
    shipped = PACKAGING / "systemd"
    assert (shipped / "edge-agent.service").read_text() == systemd_unit(
        ["/opt/edge-agent/bin/edge-agent"]
    )
    assert (shipped / "edge-agent.sysusers").read_text() == sysusers_conf()
    assert (shipped / "config.toml").read_text() == system_config()


# -- launchd ------------------------------------------------------------------------------------


def test_launchd_dry_run_is_a_plist_that_restarts_on_failure() -> None:
    result = cli("service", "install", "--dry-run", "--platform", "macos", "--exec", EXE)
    assert result.returncode == 0, result.stderr
    parts = sections(result.stdout)
    name = next(k for k in parts if k.endswith(f"{LAUNCHD_LABEL}.plist"))
    assert "/Library/LaunchAgents/" in name
    plist = plistlib.loads(parts[name].encode("utf-8"))
    assert plist["Label"] == LAUNCHD_LABEL
    assert plist["ProgramArguments"] == [EXE, "serve"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["StandardErrorPath"].endswith("/Library/Logs/edge-agent/edge-agent.log")
    assert plist["StandardOutPath"] == plist["StandardErrorPath"]
    assert plist["ExitTimeOut"] >= 30
    assert re.match(r"launchctl bootstrap gui/\d+ ", parts["commands"].splitlines()[1])


def test_launchd_install_and_uninstall_write_and_remove(tmp_path: Path) -> None:
    ran: list[list[str]] = []

    def launchctl(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        ran.append(command)
        # bootout of an agent that is not loaded fails, as launchctl does.
        return subprocess.CompletedProcess(command, 5 if command[1] == "bootout" else 0, "", "")

    plan = install_plan("macos", [EXE], home=tmp_path, uid=501)
    done = apply(plan, run=launchctl)
    plist_path = tmp_path / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    assert plistlib.loads(plist_path.read_bytes()) == plistlib.loads(launchd_plist([EXE], tmp_path))
    assert stat.S_IMODE(plist_path.stat().st_mode) == 0o644
    assert (tmp_path / "Library" / "Logs" / "edge-agent").is_dir()
    assert ran == [
        ["launchctl", "bootout", f"gui/501/{LAUNCHD_LABEL}"],
        ["launchctl", "bootstrap", "gui/501", str(plist_path)],
    ]
    assert f"wrote {plist_path}" in done
    apply(uninstall_plan("macos", home=tmp_path, uid=501), run=launchctl)
    assert not plist_path.exists()

    def failing(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "boom")

    with pytest.raises(subprocess.CalledProcessError):
        apply(install_plan("macos", [EXE], home=tmp_path, uid=501), run=failing)


# -- portable builds and the container ----------------------------------------------------------


def test_portable_engine_flags_have_no_native_detection() -> None:
    x86 = CpuInfo("Linux", "x86_64", flags=frozenset({"sse4_2"}))
    args = llama_cmake_args(x86, portable=True)
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_SSE42=ON" in args
    assert "-DGGML_AVX=OFF" in args and "-DGGML_AVX2=OFF" in args
    arm = CpuInfo("Linux", "aarch64", flags=frozenset({"asimd", "asimddp"}))
    assert llama_cmake_args(arm, portable=True)[:2] == [
        "-DGGML_NATIVE=OFF",
        "-DGGML_CPU_ARM_ARCH=armv8-a",
    ]
    # Native builds are unchanged, so the engine wheel cache keeps its key.
    assert not any(a.startswith(("-DGGML_NATIVE", "-DGGML_CPU_ARM")) for a in llama_cmake_args(arm))


def test_wheels_step_compiles_portable_and_never_from_pip_cache(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(PACKAGING / "build_portable.py"),
            "--dry-run",
            "wheels",
            "--wheel-dir",
            str(tmp_path / "w"),
            "--default-model",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    llama = next(line for line in lines if "llama-cpp-python==" in line)
    assert "--no-cache-dir" in llama and "-DGGML_NATIVE=OFF" in llama
    if build_engine.probe_cpu().arch == "x86_64":
        assert "-DGGML_AVX2=OFF" in llama and "-DGGML_AVX=OFF" in llama
    hnsw = next(line for line in lines if "hnswlib==" in line)
    assert hnsw.startswith("+ HNSWLIB_NO_NATIVE=1 ")
    deps = next(line for line in lines if "--only-binary" in line)
    assert "llama-cpp-python,hnswlib" in deps and deps.endswith("-py3-none-any.whl")
    assert any(build_portable.DEFAULT_MODEL_PACKAGE in line for line in lines)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (PACKAGING / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_non_root_with_volume_and_healthcheck() -> None:
    instructions = dockerfile_instructions()
    stages = [rest for word, rest in instructions if word == "FROM"]
    assert len(stages) == 2 and stages[0].endswith("AS build") and stages[1].endswith("AS runtime")
    runtime = instructions[[i for i, (w, _) in enumerate(instructions) if w == "FROM"][1] :]
    words = dict((w, r) for w, r in runtime if w in ("USER", "VOLUME", "HEALTHCHECK", "ENTRYPOINT"))
    assert words["USER"] == "edge-agent"
    assert words["VOLUME"] == '["/data"]'
    assert words["HEALTHCHECK"].endswith('CMD ["edge-agent", "health"]')
    assert words["ENTRYPOINT"] == '["edge-agent"]'
    envs = " ".join(r for w, r in runtime if w == "ENV")
    assert "EDGE_AGENT_HOME=/data" in envs
    # No compiler reaches the runtime image.
    runtime_runs = " ".join(r for w, r in runtime if w == "RUN")
    assert "build-essential" not in runtime_runs and "cmake" not in runtime_runs


def test_dockerfile_runs_build_portable_steps_that_exist() -> None:
    """Every step the image runs parses with the script's own parser: the Dockerfile and the
    script the tests exercise cannot drift apart."""
    steps: dict[str, Any] = {}
    for word, rest in dockerfile_instructions():
        if word != "RUN":
            continue
        for command in rest.split("&&"):
            argv = shlex.split(command)
            if argv and argv[0] == "python" and argv[1].endswith("build_portable.py"):
                args = build_portable.build_parser().parse_args(argv[2:])
                steps[args.step] = args
    assert set(steps) == {"wheels", "install", "verify"}
    assert steps["wheels"].engine_wheels == []  # the image compiles; only tests reuse wheels
    assert steps["wheels"].default_model and steps["install"].default_model
    assert steps["wheels"].wheel_dir == "/wheels"
    assert steps["verify"].expect_portable and steps["verify"].models_dir


@pytest.mark.slow
def test_build_script_installs_and_verifies_a_clean_virtualenv(
    tmp_path: Path, model_store: ModelStore
) -> None:
    """The image's install and verify steps, for real, into a new virtualenv: engine wheels
    come from this host's build cache (compiling takes minutes; the image compiles)."""
    engine_dirs = [
        build_engine.llama_wheel_dir(False),  # flags + packaging/patches/
        build_engine.hnswlib_wheel_dir(False),  # flags + packaging/patches/hnswlib-*
    ]
    for directory in engine_dirs:
        assert any(directory.glob("*.whl")), (
            f"no engine wheel in {directory}: run `make deps` (packaging/build_engine.py) first"
        )
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    script = [sys.executable, str(PACKAGING / "build_portable.py")]

    def step(*args: str) -> str:
        result = subprocess.run([*script, *args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    step(
        "wheels",
        "--wheel-dir",
        str(wheels),
        *[a for d in engine_dirs for a in ("--engine-wheels", str(d))],
    )
    assert len(list(wheels.glob("edge_agent-*.whl"))) == 1
    step("install", "--wheel-dir", str(wheels), "--venv", str(venv))
    # A clean virtualenv: no access to this test's site-packages.
    config = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in config
    assert model_store.get(DEFAULT_MODEL).files
    out = step("verify", "--venv", str(venv), "--models-dir", str(model_store.root))
    assert re.search(r"^embedded: 384d \[", out, re.M), out
    assert f"verified {venv}" in out
    # The installed command works on its own: no daemon -> `health` exits 1.
    health = subprocess.run(
        [str(venv / "bin" / "edge-agent"), "health"],
        env={"PATH": os.environ["PATH"], "EDGE_AGENT_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert health.returncode == 1 and "unhealthy" in health.stderr


def test_installed_hnswlib_copies_vectors_without_python_floats() -> None:
    """packaging/patches/hnswlib-get-items-numpy.patch is in the hnswlib this venv runs: reading
    1,000 vectors back allocates the result array and not a Python float per component (the
    unpatched binding peaks at ~13 MB here, the patched one at the array's 1.5 MB), and the
    vectors, the dtype and the error for an unknown label are unchanged."""
    import tracemalloc

    import hnswlib
    import numpy as np

    patches = build_engine.hnswlib_patches()
    assert [p.name for p in patches] == ["hnswlib-get-items-numpy.patch"]
    assert "https://github.com/nmslib/hnswlib/issues/223" in patches[0].read_text()
    assert patches[0] not in build_engine.llama_patches()
    dim, count = 384, 1000
    vectors = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=count)
    index.add_items(vectors, np.arange(count))
    tracemalloc.start()
    try:
        back = index.get_items(list(range(count)), return_type="numpy")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert back.dtype == np.float32 and back.shape == (count, dim)
    assert np.array_equal(back, vectors)
    assert peak < 2 * vectors.nbytes, f"get_items peaked at {peak} bytes"
    assert index.get_items([3], return_type="list")[0] == vectors[3].tolist()
    with pytest.raises(RuntimeError, match="Label not found"):
        index.get_items([count + 5])
