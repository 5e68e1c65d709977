"""How engine child processes are started: the environment they get.

Shared by the self-test and tuning children and the daemon's engine child
(edge_agent.embedding.worker), which run llama.cpp in processes of their own so that an abort
costs a child, not the caller.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["child_environment", "import_engine_bindings"]


def child_environment() -> dict[str, str]:
    """The environment for engine child processes: this package importable, no gdb, one
    OpenBLAS thread.

    ggml prints a backtrace on abort by attaching gdb when it is installed, which takes
    seconds and floods stderr; GGML_NO_BACKTRACE turns that off.
    """
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding edge_agent/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["GGML_NO_BACKTRACE"] = "1"
    # numpy's OpenBLAS starts a thread per core that spins after each call; an engine child
    # only normalises a few vectors with numpy, and those threads would compete with
    # llama.cpp's for the same cores (seen at 2% of a profile).
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def import_engine_bindings() -> None:
    """Import ``llama_cpp`` as its ctypes bindings only, for the daemon's engine child.

    The engine calls nothing but the low-level API (``llama_cpp.llama_cpp``, which the package
    re-exports); the package's ``__init__`` also imports the high-level ``Llama`` class and
    with it jinja2, diskcache (sqlite3), the chat formats and the grammar code: ~11 MB of the
    engine child's RSS for code it never runs (docs/benchmarks.md, "Session 2026-12-04").
    This registers the package without running its ``__init__``, imports the bindings module
    and puts its public names on the package, as ``from .llama_cpp import *`` does, so
    ``llama_cpp.llama_decode`` and friends resolve as usual. Only for a fresh interpreter that
    runs nothing else (``Llama`` and ``__version__`` are not there); a no-op when
    ``llama_cpp`` is already imported, and a missing package is left for the ordinary import
    to report.
    """
    if "llama_cpp" in sys.modules:
        return
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)
    sys.modules["llama_cpp"] = package
    try:
        bindings = importlib.import_module("llama_cpp.llama_cpp")
    except BaseException:
        sys.modules.pop("llama_cpp", None)
        sys.modules.pop("llama_cpp.llama_cpp", None)
        raise
    for name, value in vars(bindings).items():
        if not name.startswith("_"):
            setattr(package, name, value)
