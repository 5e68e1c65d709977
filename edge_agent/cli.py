"""The ``edge-agent`` command. The only module that exits the process."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .errors import EdgeAgentError, InvalidArgument
from .paths import default_paths

__all__ = ["main"]

log = logging.getLogger("edge_agent.cli")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )


def _store(args: argparse.Namespace) -> Any:
    from .models import ModelStore

    return ModelStore(args.models_dir)


def _parse_dims_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


# -- models -------------------------------------------------------------------------------------


def cmd_models_prepare_default(args: argparse.Namespace) -> int:
    from .models import prepare_default

    store = _store(args)
    manifest = prepare_default(store)
    print(f"{manifest.name}: {len(manifest.files)} files in {store.model_dir(manifest.name)}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    manifests = _store(args).list()
    if args.json:
        print(json.dumps([m.to_json() for m in manifests], indent=2))
        return 0
    if not manifests:
        print(f"no models in {args.models_dir} (run: edge-agent models prepare-default)")
        return 0
    print(f"{'model':<28} {'arch':<10} {'dims':>5} {'pool':<5} {'max tok':>7}  quants (MB)")
    for m in manifests:
        quants = ", ".join(f"{q} {f.size / 1e6:.1f}" for q, f in m.files.items())
        print(
            f"{m.name:<28} {m.architecture:<10} {m.dims:>5} {m.pooling:<5}"
            f" {m.max_tokens:>7}  {quants}"
        )
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    manifest = _store(args).import_gguf(
        Path(args.path),
        name=args.name,
        query_template=args.query_template,
        document_template=args.document_template,
        matryoshka_dims=args.matryoshka_dims,
    )
    print(
        f"imported {args.path} as {manifest.name} ({manifest.architecture}, {manifest.dims} dims,"
        f" {manifest.pooling} pooling, quants: {', '.join(manifest.files)})"
    )
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from .models.pull import pull_gguf

    manifest = pull_gguf(_store(args), args.url, args.sha256, name=args.name)
    print(f"pulled {manifest.name} (quants: {', '.join(manifest.files)})")
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    results = _store(args).verify_all(args.name)
    for quant, status in results.items():
        print(f"{quant:<8} {status}")
    return 0 if all(status == "ok" for status in results.values()) else 1


# -- serve / embed ------------------------------------------------------------------------------


def _embedder_config(args: argparse.Namespace) -> Any:
    from .embedder import EmbedderConfig

    return EmbedderConfig(threads=args.threads)


def _state_dir() -> Path:
    return default_paths().data_dir / "hardware"


def _override(args: argparse.Namespace) -> Any:
    from .selection import override_from

    flags = {
        "quant": getattr(args, "quant", None),
        "threads": getattr(args, "threads", None),
        "profile": getattr(args, "profile", None),
    }
    return override_from(flags=flags, environ=os.environ)


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import ServeOptions, serve
    from .embedder import EmbedderConfig

    serve(
        ServeOptions(
            socket_path=Path(args.socket),
            models_dir=args.models_dir,
            model=args.model,
            embedder=EmbedderConfig(),
            override=_override(args),
            state_dir=_state_dir(),
            tune_budget_s=None if args.no_tune else args.tune_budget,
        )
    )
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from .hardware import describe_host, probe_host

    host = probe_host()
    if not args.explain:
        print(json.dumps(host.to_json(), indent=2) if args.json else describe_host(host))
        return 0
    from .selection import explain
    from .selftest import plan

    selection = plan(_store(args), args.model, state_dir=_state_dir(), override=_override(args))
    print(json.dumps(selection.to_json(), indent=2) if args.json else explain(selection))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .tuning import tune

    result = tune(
        _store(args),
        args.model,
        state_dir=_state_dir(),
        budget_s=args.budget,
        override=_override(args),
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
        from .embedder import Embedder

        with Embedder.open(
            _store(args), args.model, args.quant, _embedder_config(args)
        ) as embedder:
            result = embedder.embed(texts, **options)
    else:
        from .client import Client

        with Client(Path(args.socket)) as client:
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


# -- index --------------------------------------------------------------------------------------


def _collection_path(args: argparse.Namespace) -> Path:
    """A collection by name (under the index root) or by path."""
    given = Path(args.collection)
    if given.is_dir() or "/" in args.collection:
        return given
    return args.index_dir / args.collection


def cmd_index_check(args: argparse.Namespace) -> int:
    from .index import check_collection

    report = check_collection(_collection_path(args))
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


def cmd_index_repair(args: argparse.Namespace) -> int:
    from .index import repair_collection

    report = repair_collection(_collection_path(args))
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .models.default import DEFAULT_MODEL

    paths = default_paths()
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=paths.models_dir,
        help=f"model store (default {paths.models_dir}; env EDGE_AGENT_MODELS_DIR)",
    )
    parser.add_argument("--log-level", default=os.environ.get("EDGE_AGENT_LOG_LEVEL", "info"))
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="manage the model store")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    p = model_commands.add_parser("prepare-default", help="build the default model (idempotent)")
    p.set_defaults(func=cmd_models_prepare_default)
    p = model_commands.add_parser("list", help="models, their quants and sizes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_list)
    p = model_commands.add_parser("import", help="register a GGUF file")
    p.add_argument("path")
    p.add_argument("--name")
    p.add_argument("--query-template", help='e.g. "Instruct: {task}\\nQuery:{text}"')
    p.add_argument("--document-template")
    p.add_argument("--matryoshka-dims", type=_parse_dims_list, help="e.g. 64,128,256")
    p.set_defaults(func=cmd_models_import)
    p = model_commands.add_parser("pull", help="download a GGUF, verify it, register it")
    p.add_argument("url")
    p.add_argument("--sha256", required=True)
    p.add_argument("--name")
    p.set_defaults(func=cmd_models_pull)
    p = model_commands.add_parser("verify", help="re-hash every file of a model")
    p.add_argument("name")
    p.set_defaults(func=cmd_models_verify)

    def add_model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=os.environ.get("EDGE_AGENT_MODEL", DEFAULT_MODEL))
        # None = not given: selection then takes env EDGE_AGENT_QUANT/THREADS, then profiles.
        p.add_argument("--quant", help="pin a quantization (env EDGE_AGENT_QUANT)")
        p.add_argument("--threads", type=int, help="pin the thread count (env EDGE_AGENT_THREADS)")
        p.add_argument("--profile", help="force a hardware profile (env EDGE_AGENT_PROFILE)")

    socket_default = os.environ.get("EDGE_AGENT_SOCKET", str(paths.default_socket))
    p = commands.add_parser("serve", help="run the daemon in the foreground")
    p.add_argument(
        "--socket", default=socket_default, help="Unix socket path (env EDGE_AGENT_SOCKET)"
    )
    add_model_options(p)
    p.add_argument(
        "--tune-budget",
        type=float,
        default=20.0,
        help="seconds of measurement on first start (default 20)",
    )
    p.add_argument("--no-tune", action="store_true", help="use the profile rules only")
    p.set_defaults(func=cmd_serve)

    index = commands.add_parser("index", help="check or repair a collection on disk")
    index.add_argument(
        "--index-dir",
        type=Path,
        default=paths.data_dir / "index",
        help=f"collections root (default {paths.data_dir / 'index'})",
    )
    index_commands = index.add_subparsers(dest="index_command", required=True)
    p = index_commands.add_parser("check", help="validate every file; exit 1 if damaged")
    p.add_argument("collection", help="collection name or directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_index_check)
    p = index_commands.add_parser(
        "repair", help="rebuild from what is intact; damaged files are set aside, never deleted"
    )
    p.add_argument("collection", help="collection name or directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_index_repair)

    p = commands.add_parser("probe", help="what this host is, and which model file it would use")
    p.add_argument("--json", action="store_true")
    p.add_argument("--explain", action="store_true", help="the model selection and its reasons")
    add_model_options(p)
    p.set_defaults(func=cmd_probe)

    p = commands.add_parser("tune", help="measure quants/threads/batch sizes on this host")
    p.add_argument("--budget", type=float, default=20.0, help="seconds (default 20)")
    add_model_options(p)
    p.set_defaults(func=cmd_tune)

    p = commands.add_parser("embed", help="embed texts (arguments, or stdin lines)")
    p.add_argument("texts", nargs="*")
    p.add_argument("--socket", default=socket_default)
    p.add_argument("--local", action="store_true", help="load the model in this process")
    p.add_argument("--kind", choices=("document", "query"), default="document")
    p.add_argument("--instruction")
    p.add_argument("--dimensions", type=int)
    p.add_argument("--long-text", choices=("truncate", "chunk", "error"), default="truncate")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    add_model_options(p)
    p.set_defaults(func=cmd_embed)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
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
