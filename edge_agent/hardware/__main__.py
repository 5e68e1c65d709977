"""``python -m edge_agent.hardware [--cmake-args | --json]``, standard library only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .build_flags import llama_cmake_args
from .cpu import probe_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_agent.hardware")
    parser.add_argument("--root", type=Path, default=Path("/"), help="replay a captured tree")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cmake-args", action="store_true", help="llama.cpp CMake flags")
    group.add_argument("--json", action="store_true", help="the probe as JSON")
    options = parser.parse_args(argv)
    cpu = probe_cpu(options.root)
    if options.cmake_args:
        print(" ".join(llama_cmake_args(cpu)))
    elif options.json:
        print(
            json.dumps(
                {
                    "system": cpu.system,
                    "arch": cpu.arch,
                    "model_name": cpu.model_name,
                    "logical_cores": cpu.logical_cores,
                    "flags": sorted(cpu.flags),
                },
                indent=2,
            )
        )
    else:
        print(f"{cpu.system} {cpu.arch} {cpu.model_name or 'unknown CPU'}")
        print("llama.cpp flags:", " ".join(llama_cmake_args(cpu)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
