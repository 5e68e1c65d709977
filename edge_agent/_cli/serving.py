"""``serve``, ``probe``, ``tune`` and ``embed``: the engine on this host."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgument
from .common import (
    SOCKET_DEFAULT,
    add_model_options,
    effective_config,
    embedder_config,
    model_store,
    selection_override,
    state_dir_of,
)

if TYPE_CHECKING:
    from ..embedding.embedder import Embeddings
    from ..paths import Paths
    from ..protocol import EmbedResult


def cmd_serve(args: argparse.Namespace) -> int:
    from ..daemon.app import serve

    # Flags, environment, config file and the hardware profile, validated once (config.py).
    serve(effective_config(args, with_profile=True).serve_options())
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from ..hardware import describe_host, probe_host

    host = probe_host()
    if not args.explain:
        print(json.dumps(host.to_json(), indent=2) if args.json else describe_host(host))
        return 0
    from ..selection.choose import explain
    from ..selection.selftest import plan

    selection = plan(
        model_store(args),
        args.model,
        state_dir=state_dir_of(args),
        override=selection_override(args),
    )
    print(json.dumps(selection.to_json(), indent=2) if args.json else explain(selection))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from ..selection.tuning import tune

    result = tune(
        model_store(args),
        args.model,
        state_dir=state_dir_of(args),
        budget_s=args.budget,
        override=selection_override(args),
    )
    print(result.table())
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise InvalidArgument("no texts given (pass them as arguments or on stdin, one per line)")
    options = {
        "kind": args.kind,
        "instruction": args.instruction,
        "dimensions": args.dimensions,
        "long_text": args.long_text,
    }
    if args.local:
        from ..embedding.embedder import Embedder

        with Embedder.open(
            model_store(args), args.model, args.quant, embedder_config(args)
        ) as embedder:
            result: Embeddings | EmbedResult = embedder.embed(texts, **options)
    else:
        from ..client import Client

        with Client(args.socket) as client:
            result = client.embed(texts, **options)
    for index, text in enumerate(texts):
        vector = result.vectors[index]
        if args.json:
            print(
                json.dumps(
                    {
                        "text": text,
                        "tokens": result.token_counts[index],
                        "truncated": result.truncated[index],
                        "vector": [round(float(x), 7) for x in vector],
                    }
                )
            )
        else:
            head = " ".join(f"{x:+.4f}" for x in vector[:6])
            print(
                f"{len(vector)}d [{head} ...] tokens={result.token_counts[index]}"
                f"{' (truncated)' if result.truncated[index] else ''}  {text[:60]!r}"
            )
    return 0


def add_serve_parser(commands: Any, paths: Paths) -> None:
    """``serve``."""
    p = commands.add_parser("serve", help="run the daemon in the foreground")
    p.add_argument(
        "--socket", default=SOCKET_DEFAULT, help="Unix socket path (env EDGE_AGENT_SOCKET)"
    )
    add_model_options(p)
    p.add_argument(
        "--tune-budget",
        type=float,
        help="seconds of measurement on first start (default 20)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464)",
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve OpenAI-compatible embeddings, a REST API and a search page over HTTP"
        " (e.g. 127.0.0.1:8080; other addresses need a token)",
    )
    p.add_argument("--no-tune", action="store_true", help="use the profile rules only")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="also serve TCP (127.0.0.1:7878; other addresses need a token)",
    )
    p.add_argument("--token-file", help="TCP auth token file, mode 0600 (or env EDGE_AGENT_TOKEN)")
    p.add_argument(
        "--index-dir", type=Path, help=f"collections root (default {paths.data_dir / 'index'})"
    )
    p.add_argument(
        "--advertise",
        action="store_true",
        help="announce the TCP endpoint on the LAN with mDNS (needs --listen)",
    )
    p.add_argument(
        "--advertise-interface",
        action="append",
        metavar="NAME|ADDRESS",
        help="announce only on this interface or address (repeatable; default all)",
    )
    p.set_defaults(func=cmd_serve)


def add_host_parsers(commands: Any) -> None:
    """``probe`` and ``tune``."""
    p = commands.add_parser("probe", help="what this host is, and which model file it would use")
    p.add_argument("--json", action="store_true")
    p.add_argument("--explain", action="store_true", help="the model selection and its reasons")
    add_model_options(p)
    p.set_defaults(func=cmd_probe)

    p = commands.add_parser("tune", help="measure quants/threads/batch sizes on this host")
    p.add_argument("--budget", type=float, default=20.0, help="seconds (default 20)")
    add_model_options(p)
    p.set_defaults(func=cmd_tune)


def add_embed_parser(commands: Any) -> None:
    """``embed``."""
    p = commands.add_parser("embed", help="embed texts (arguments, or stdin lines)")
    p.add_argument("texts", nargs="*")
    p.add_argument("--socket", default=SOCKET_DEFAULT)
    p.add_argument("--local", action="store_true", help="load the model in this process")
    p.add_argument("--kind", choices=("document", "query"), default="document")
    p.add_argument("--instruction")
    p.add_argument("--dimensions", type=int)
    p.add_argument("--long-text", choices=("truncate", "chunk", "error"), default="truncate")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    add_model_options(p)
    p.set_defaults(func=cmd_embed)
