"""The ``edge-agent`` command line (developers: the only module that exits the process).

The commands live in ``edge_agent._cli``, one module per group (models, serving, documents,
operations; ``common`` holds what they share); this module builds the parser from them and
runs the command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._cli.common import prepare
from ._cli.documents import add_add_parser, add_collection_parsers, add_search_parser
from ._cli.models import add_models_parser
from ._cli.operations import (
    add_config_parser,
    add_discover_parser,
    add_index_parser,
    add_service_parser,
    add_status_parsers,
)
from ._cli.serving import add_embed_parser, add_host_parsers, add_serve_parser
from .errors import EdgeAgentError
from .paths import default_paths

__all__ = ["main"]

DESCRIPTION = """\
edge-agent turns text into embedding vectors on this machine and keeps them searchable.
It runs a small llama.cpp model locally (no cloud), stores vectors in on-disk collections,
and serves both over a local socket (and optionally TCP, found on the LAN by mDNS).

  edge-agent serve                      start the daemon
  edge-agent embed "some text"          print a vector
  edge-agent add notes file.txt         index documents; then: edge-agent search notes "query"
"""


def build_parser() -> argparse.ArgumentParser:
    paths = default_paths()
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Defaults of None are filled from the configuration (flag > env > config file > default)
    # by _cli.common.prepare before a command runs: see `edge-agent config show`.
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (env EDGE_AGENT_CONFIG; default: `edge-agent config path`)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        help=f"model store (default {paths.models_dir}; env EDGE_AGENT_MODELS_DIR)",
    )
    parser.add_argument("--log-level", help="debug, info (default), warning, error")
    parser.add_argument("--log-format", help="kv (key=value lines, default) or json")
    commands = parser.add_subparsers(dest="command", required=True)

    # The commands in the order --help lists them.
    add_models_parser(commands)
    add_serve_parser(commands, paths)
    add_index_parser(commands, paths)
    add_host_parsers(commands)
    add_add_parser(commands)
    add_search_parser(commands)
    add_collection_parsers(commands)
    add_status_parsers(commands)
    add_embed_parser(commands)
    add_discover_parser(commands)
    add_config_parser(commands)
    add_service_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prepare(args)
        code = args.func(args)
    except EdgeAgentError as exc:
        print(f"edge-agent: error {int(exc.code)} {exc.code.name}: {exc.message}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except OSError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
