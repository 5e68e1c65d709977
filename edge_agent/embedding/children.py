"""How engine child processes are started: the environment they get.

Shared by the self-test and tuning children and the daemon's engine child
(edge_agent.embedding.worker), which run llama.cpp in processes of their own so that an abort
costs a child, not the caller.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["child_environment"]


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
