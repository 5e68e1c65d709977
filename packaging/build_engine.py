#!/usr/bin/env python3
"""Build and install the compiled dependencies (llama-cpp-python, hnswlib) for this host.

Standard library only; run with the target virtualenv's interpreter:

    .venv/bin/python packaging/build_engine.py

Both packages are source distributions that compile on install. pip caches built wheels keyed
by the sdist only, not by the build flags, so a plain ``pip install`` can hand back a wheel that
was built for another CPU. We build with ``--no-cache-dir`` into a wheel directory whose name is
a hash of (package, version, flags, interpreter, patches), then install from there: a rebuild
happens exactly when the flags or the patches change.

llama-cpp-python is built from its sdist with packaging/patches/llama-*.patch applied to the
vendored llama.cpp, hnswlib with packaging/patches/hnswlib-*.patch applied to its Python
binding (``-p1`` paths in the unpacked sdist; each patch says why and links the upstream
issue/PR it stands in for). The sdist is fetched with ``pip download``, so the same
package index (or a local mirror) serves it.

Environment:
  EDGE_AGENT_WHEEL_DIR     where built wheels are kept (default: ~/.cache/edge-agent/wheels)
  EDGE_AGENT_CMAKE_ARGS    extra CMake flags appended to the probed ones for llama.cpp
  EDGE_AGENT_HNSWLIB_NATIVE=0   build hnswlib without -march=native (the default is native,
                           keyed by this CPU; EDGE_AGENT_PORTABLE=1 implies portable)
  EDGE_AGENT_PORTABLE=1    baseline-ISA llama.cpp and hnswlib builds (images that move between
                           CPUs)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_agent.hardware import CpuInfo, llama_cmake_args, probe_cpu  # noqa: E402

LLAMA = ("llama-cpp-python", "0.3.36")
HNSWLIB = ("hnswlib", "0.8.0")
PATCHES = REPO / "packaging" / "patches"


def llama_patches() -> list[Path]:
    """The patches applied to llama-cpp-python's sdist, in name order."""
    return sorted(PATCHES.glob("llama-*.patch"))


def hnswlib_patches() -> list[Path]:
    """The patches applied to hnswlib's sdist, in name order."""
    return sorted(PATCHES.glob("hnswlib-*.patch"))


def patches_key(patches: list[Path]) -> dict[str, str]:
    """The patches as wheel-cache key material: name -> sha256 of the file."""
    return {
        f"patch:{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in patches
    }


def portable_cpu(cpu: CpuInfo) -> CpuInfo:
    """The baseline each architecture is guaranteed to have (x86-64-v3 is not: use v2)."""
    baseline = {"x86_64": frozenset({"sse4_2"})}.get(cpu.arch, frozenset())
    return CpuInfo(system=cpu.system, arch=cpu.arch, flags=baseline)


def llama_cmake_flags(portable: bool) -> str:
    """CMAKE_ARGS for llama-cpp-python: this CPU's features, or the architecture's baseline."""
    cpu = probe_cpu()
    if portable:
        cpu = portable_cpu(cpu)
    return " ".join(
        llama_cmake_args(cpu, portable=portable)
        + os.environ.get("EDGE_AGENT_CMAKE_ARGS", "").split()
    )


def hnswlib_env(portable: bool) -> dict[str, str]:
    """hnswlib's build environment. On the host it compiles with -march=native (1.8x faster
    queries and 1.5x faster inserts than the portable build on an AVX-512 x86 box, see
    docs/benchmarks.md); the CPU's identity goes into the environment so that the wheel cache
    keys on it and never hands a native wheel to another CPU. Portable builds (images) and
    EDGE_AGENT_HNSWLIB_NATIVE=0 set HNSWLIB_NO_NATIVE=1."""
    if portable or os.environ.get("EDGE_AGENT_HNSWLIB_NATIVE") == "0":
        return {"HNSWLIB_NO_NATIVE": "1"}
    cpu = probe_cpu()
    identity = "\n".join([cpu.arch, cpu.model_name or "", *sorted(cpu.flags)])
    return {"EDGE_AGENT_HNSWLIB_CPU": hashlib.sha256(identity.encode()).hexdigest()[:16]}


def wheel_dir_for(name: str, version: str, env: dict[str, str]) -> Path:
    root = Path(
        os.environ.get("EDGE_AGENT_WHEEL_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "edge-agent"
        / "wheels"
    )
    key_material = "\n".join(
        [name, version, sys.version, sysconfig.get_platform()]
        + [f"{k}={v}" for k, v in sorted(env.items())]
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
    return root / f"{name}-{version}-{key}"


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, **(env or {})})


def apply_patch(diff: str, root: Path) -> list[Path]:
    """Apply a unified diff (``-p1`` paths) under ``root``; return the files changed.

    Standard library only, so that building needs no ``patch`` program. Each hunk's old lines
    (context and removals) must occur exactly once in the file, else the build stops: a
    patch that no longer fits the vendored source is an error, never a silent partial apply.
    """
    changed: list[Path] = []
    lines = diff.splitlines()
    i = 0
    while i < len(lines):
        if not (lines[i].startswith("--- ") and i + 1 < len(lines)
                and lines[i + 1].startswith("+++ ")):  # fmt: skip
            i += 1
            continue
        target = root / lines[i + 1][4:].split("\t")[0].strip().split("/", 1)[1]
        text = target.read_text(encoding="utf-8")
        i += 2
        while i < len(lines) and lines[i].startswith("@@"):
            i += 1
            old: list[str] = []
            new: list[str] = []
            while i < len(lines) and lines[i][:1] in (" ", "-", "+", ""):
                if lines[i].startswith("--- ") and i + 1 < len(lines) and lines[
                    i + 1
                ].startswith("+++ "):
                    break
                kind, body = lines[i][:1], lines[i][1:]
                if kind in (" ", ""):
                    old.append(body)
                    new.append(body)
                elif kind == "-":
                    old.append(body)
                else:
                    new.append(body)
                i += 1
            before, after = "\n".join(old) + "\n", "\n".join(new) + "\n"
            if text.count(before) != 1:
                raise SystemExit(f"patch does not apply to {target}: hunk not found exactly once")
            text = text.replace(before, after)
        target.write_text(text, encoding="utf-8")
        changed.append(target)
    if not changed:
        raise SystemExit("patch holds no file changes")
    return changed


def build_patched_wheel(
    name: str, version: str, patches: list[Path], wheel_dir: Path, env: dict[str, str]
) -> None:
    """Download the sdist, apply ``patches`` to it, build a wheel into ``wheel_dir``."""
    with tempfile.TemporaryDirectory(prefix="edge-agent-build-") as tmp:
        work = Path(tmp)
        # --no-binary for this package only: its build requirements (numpy for hnswlib) come
        # as wheels, as in a plain `pip wheel`
        pip("download", "--no-deps", "--no-binary", name, "-d", str(work), f"{name}=={version}")
        (sdist,) = work.glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            archive.extractall(work / "src", filter="data")
        (source,) = (work / "src").iterdir()
        for patch in patches:
            print(f"  applying {patch.name}", flush=True)
            apply_patch(patch.read_text(encoding="utf-8"), source)
        pip("wheel", "--no-cache-dir", "--no-deps", "-w", str(wheel_dir), str(source), env=env)


def llama_wheel_dir(portable: bool) -> Path:
    """Where this host's llama-cpp-python wheel (flags + patches) is cached."""
    env = {"CMAKE_ARGS": llama_cmake_flags(portable), **patches_key(llama_patches())}
    return wheel_dir_for(*LLAMA, env)


def hnswlib_wheel_dir(portable: bool) -> Path:
    """Where this host's hnswlib wheel (CPU identity + patches) is cached."""
    return wheel_dir_for(*HNSWLIB, {**hnswlib_env(portable), **patches_key(hnswlib_patches())})


def build_and_install(
    name: str,
    version: str,
    build_env: dict[str, str],
    patches: list[Path] | None = None,
    install: bool = True,
) -> None:
    patches = patches or []
    wheel_dir = wheel_dir_for(name, version, {**build_env, **patches_key(patches)})
    if not any(wheel_dir.glob("*.whl")):
        print(f"building {name} {version} (one time for these flags) into {wheel_dir}", flush=True)
        for key, value in build_env.items():
            print(f"  {key}={value}", flush=True)
        if patches:
            build_patched_wheel(name, version, patches, wheel_dir, build_env)
        else:
            pip(
                "wheel",
                "--no-cache-dir",
                "--no-deps",
                "-w",
                str(wheel_dir),
                f"{name}=={version}",
                env=build_env,
            )
    else:
        print(f"{name} {version}: using the wheel built for these flags in {wheel_dir}", flush=True)
    if not install:
        return
    # --force-reinstall: the same version built with other flags is "already satisfied" to pip,
    # which would keep the old build in the environment.
    pip(
        "install",
        "--force-reinstall",
        "--no-deps",
        "--find-links",
        str(wheel_dir),
        "--no-index",
        f"{name}=={version}",
    )


def main() -> int:
    """``--build-only``: fill the wheel cache, install nothing (a long build can run while
    others use the environment; a second run then only installs)."""
    portable = os.environ.get("EDGE_AGENT_PORTABLE") == "1"
    cmake_args = llama_cmake_flags(portable)
    if "--build-only" in sys.argv[1:]:
        build_and_install(*LLAMA, {"CMAKE_ARGS": cmake_args}, llama_patches(), install=False)
        return 0
    build_and_install(*LLAMA, {"CMAKE_ARGS": cmake_args}, llama_patches())
    hnsw_env = hnswlib_env(portable)
    # hnswlib's setup.py imports numpy and pybind11 at build time.
    pip("install", "numpy>=1.24", "pybind11>=2.10")
    build_and_install(*HNSWLIB, hnsw_env, hnswlib_patches())
    return 0


if __name__ == "__main__":
    sys.exit(main())
