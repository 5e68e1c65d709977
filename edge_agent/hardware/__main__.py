"""``python -m edge_agent.hardware [--cmake-args | --json]``, standard library only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .build_flags import llama_cmake_args
from .cpu import probe_cpu
from .host import UnsupportedPlatform, describe_host, probe_host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_agent.hardware")
    parser.add_argument("--root", type=Path, default=Path("/"), help="replay a captured tree")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cmake-args", action="store_true", help="llama.cpp CMake flags")
    group.add_argument("--json", action="store_true", help="the whole host probe as JSON")
    options = parser.parse_args(argv)
    if options.cmake_args:
        # The build only needs the CPU, which is also known on systems probe_host refuses.
        print(" ".join(llama_cmake_args(probe_cpu(options.root))))
        return 0
    try:
        host = probe_host(options.root)
    except UnsupportedPlatform as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(host.to_json(), indent=2))
    else:
        print(describe_host(host))
        print("llama.cpp flags:", " ".join(llama_cmake_args(host.cpu)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
