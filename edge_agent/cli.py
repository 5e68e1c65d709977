"""The ``edge-agent`` command line (developers: the only module that exits the process)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EdgeAgentError, InvalidArgument
from .paths import default_paths

if TYPE_CHECKING:
    from .embedding.embedder import Embeddings
    from .protocol import EmbedResult

__all__ = ["main"]

log = logging.getLogger("edge_agent.cli")

DESCRIPTION = """\
edge-agent turns text into embedding vectors on this machine and keeps them searchable.
It runs a small llama.cpp model locally (no cloud), stores vectors in on-disk collections,
and serves both over a local socket (and optionally TCP, found on the LAN by mDNS).

  edge-agent serve                      start the daemon
  edge-agent embed "some text"          print a vector
  edge-agent add notes file.txt         index documents; then: edge-agent search notes "query"
"""


# -- configuration ------------------------------------------------------------------------------


def _config(args: argparse.Namespace, with_profile: bool = False) -> Any:
    """The effective configuration (flag > env > config file > hardware profile), loaded once
    per command; ``with_profile`` also probes the host for the profile's values."""
    from .config import load_config

    cache = vars(args).setdefault("_configs", {})
    if with_profile not in cache:
        cache[with_profile] = load_config(
            args._flags, os.environ, getattr(args, "config", None), with_profile=with_profile
        )
    return cache[with_profile]


# Options whose default comes from the configuration: (argparse dest, setting key).
_CONFIGURED_OPTIONS = (
    ("socket", "socket"),
    ("connect", "socket"),
    ("index_dir", "index_dir"),
    ("model", "model"),
)


def _prepare(args: argparse.Namespace) -> None:
    """Set logging up and fill the options the user left out from the configuration, so that
    every command uses the daemon's socket, model store and index."""
    from .config import Flag, flags_from_args
    from .logs import setup_logging

    # What the user typed, before the defaults below are filled in.
    args._flags = flags_from_args(args)
    if getattr(args, "no_tune", False):
        args._flags["tune_budget"] = Flag(0.0, "--no-tune")
    if getattr(args, "without_config", False):
        # `config path` / `config init` must work whatever the file holds.
        setup_logging(args.log_level or "info", args.log_format or "kv")
        return
    config = _config(args)
    setup_logging(config["log.level"], config["log.format"])
    args.models_dir = Path(config["models_dir"])
    for dest, key in _CONFIGURED_OPTIONS:
        if dest in vars(args) and getattr(args, dest) is None:
            value = config[key]
            setattr(args, dest, str(value) if dest in ("socket", "connect") else value)


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
    from .embedding.embedder import EmbedderConfig

    return EmbedderConfig(threads=args.threads)


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(_config(args)["state_dir"])


def _override(args: argparse.Namespace) -> Any:
    """What the user pinned for model selection: flags, environment and the config file."""
    return _config(args).override()


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon.app import serve

    # Flags, environment, config file and the hardware profile, validated once (config.py).
    serve(_config(args, with_profile=True).serve_options())
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from .hardware import describe_host, probe_host

    host = probe_host()
    if not args.explain:
        print(json.dumps(host.to_json(), indent=2) if args.json else describe_host(host))
        return 0
    from .selection.choose import explain
    from .selection.selftest import plan

    selection = plan(_store(args), args.model, state_dir=_state_dir(args), override=_override(args))
    print(json.dumps(selection.to_json(), indent=2) if args.json else explain(selection))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .selection.tuning import tune

    result = tune(
        _store(args),
        args.model,
        state_dir=_state_dir(args),
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
        from .embedding.embedder import Embedder

        with Embedder.open(
            _store(args), args.model, args.quant, _embedder_config(args)
        ) as embedder:
            result: Embeddings | EmbedResult = embedder.embed(texts, **options)
    else:
        from .client import Client

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


# -- discovery ----------------------------------------------------------------------------------


def _agent_table(agents: list[Any]) -> str:
    rows = [("NAME", "AGENT ID", "ADDRESS", "MODEL", "QUANT", "DIMS", "AUTH", "PROTO")]
    for agent in agents:
        rows.append(
            (
                agent.name,
                agent.agent_id or "?",
                agent.endpoint.removeprefix("tcp://"),
                agent.model or "?",
                agent.quant or "?",
                str(agent.dims or "?"),
                {True: "yes", False: "no", None: "?"}[agent.auth_required],
                str(agent.protocol or "?"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def cmd_discover(args: argparse.Namespace) -> int:
    from .lan.discovery import browse

    agents = browse(args.timeout, interfaces=tuple(args.interface))
    if args.json:
        print(json.dumps([agent.to_json() for agent in agents], indent=2))
    elif agents:
        print(_agent_table(agents))
    else:
        print(f"no agents answered within {args.timeout:g}s", file=sys.stderr)
    return 0


# -- the daemon's index and status (client side) --------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from .client import Client

    token = None
    if getattr(args, "token_file", None):
        token = Path(args.token_file).expanduser().read_text(encoding="utf-8").strip()
    return Client(args.connect, timeout=args.timeout, token=token)


def cmd_add(args: argparse.Namespace) -> int:
    from .ingest import read_sources
    from .progress import Progress

    added = truncated = 0
    with _client(args) as client, Progress(f"add to {args.collection}", None, " docs") as bar:
        chunk_chars = args.chunk_chars
        if chunk_chars is None:
            # ~3 characters a token keeps most chunks inside the model's window (prose runs
            # ~4, code and markup fewer); what still overflows follows --long-text.
            chunk_chars = max(200, 3 * int(client.hello().get("max_tokens", 256)))
        docs = read_sources(args.files, sys.stdin, jsonl=args.jsonl, chunk_chars=chunk_chars)
        batch: list[Any] = []

        def flush() -> None:
            nonlocal added, truncated
            result = client.add(
                args.collection,
                [doc.to_wire() for doc in batch],
                long_text=args.long_text,
                store_text=not args.no_text,
            )
            added += result["added"]
            truncated += len(result["truncated"])
            bar.advance(len(batch))
            batch.clear()

        for doc in docs:
            batch.append(doc)
            if len(batch) >= args.batch:
                flush()
        if batch:
            flush()
    note = f" ({truncated} truncated to the model's window)" if truncated else ""
    print(f"added {added} documents to {args.collection}{note}")
    return 0


def _parse_filter(items: list[str]) -> dict[str, Any]:
    """``key=value`` (equality) or ``key=a|b|c`` (any of); numbers and true/false are typed."""
    where: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--filter takes KEY=VALUE or KEY=A|B, got {item!r}")
        values = [json.loads(v) if _is_json_scalar(v) else v for v in value.split("|")]
        where[key] = values[0] if len(values) == 1 else {"in": values}
    return where


def _is_json_scalar(text: str) -> bool:
    try:
        return isinstance(json.loads(text), (int, float, bool))
    except ValueError:
        return False


def cmd_search(args: argparse.Namespace) -> int:
    if args.fleet:
        return _fleet_search(args)
    query = " ".join(args.query)
    where = _parse_filter(args.filter)
    if args.where:
        try:
            extra = json.loads(args.where)
        except ValueError as exc:
            raise InvalidArgument(f"--where takes a JSON object: {exc}") from exc
        if not isinstance(extra, dict):
            raise InvalidArgument("--where takes a JSON object, e.g. '{\"year\": {\"gte\": 2020}}'")
        where.update(extra)
    with _client(args) as client:
        hits = client.search(
            args.collection,
            query,
            k=args.k,
            filter=where,
            ef=args.ef,
            mode=args.mode,
            fusion=args.fusion,
            weight=args.weight,
            explain=args.explain,
        )
    if args.json:
        for hit in hits:
            record = {"id": hit.id, "score": hit.score, "text": hit.text, "metadata": hit.metadata}
            if args.explain:
                record.update(dense_score=hit.dense_score, keyword_score=hit.keyword_score)
            print(json.dumps(record))
        return 0
    if not hits:
        print("no matches")
    for rank, hit in enumerate(hits, 1):
        text = " ".join((hit.text or "").split())
        parts = ""
        if args.explain:
            dense = "-" if hit.dense_score is None else f"{hit.dense_score:.3f}"
            keyword = "-" if hit.keyword_score is None else f"{hit.keyword_score:.2f}"
            parts = f" (dense {dense}, keyword {keyword})"
        print(f"{rank:>3}. {hit.score:.4f}{parts}  {hit.id}  {text[:80]}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        deleted = client.delete(args.collection, args.ids)
    print(f"deleted {deleted} of {len(args.ids)} ids from {args.collection}")
    return 0


def cmd_collections(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            listed = client.collections()
            if args.json:
                print(json.dumps(listed, indent=2))
            elif not listed:
                print("no collections")
            for item in listed if not args.json else []:
                if item.get("state") != "ok":
                    print(f"{item['name']:<24} UNAVAILABLE  {item.get('error', '')}")
                    continue
                fp = item["fingerprint"]
                print(
                    f"{item['name']:<24} {item['count']:>9} docs  {item['dims']}d"
                    f"  {fp['model']} ({fp['sha256'][:12]})"
                )
            return 0
        if not args.name:
            raise InvalidArgument(f"collections {args.action} needs a NAME")
        if args.action == "create":
            result = client.create_collection(args.name, args.dimensions)
        elif args.action == "drop":
            if not args.yes:
                raise InvalidArgument(
                    f"dropping deletes every document of {args.name!r}: add --yes to confirm"
                )
            client.drop_collection(args.name)
            result = {"dropped": args.name}
        else:
            result = client.collection_info(args.name)
    print(json.dumps(result, indent=2))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.stats(), indent=2))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the daemon answers and reports ok, 1 otherwise (for HEALTHCHECK/scripts)."""
    from .protocol import ProtocolError

    try:
        with _client(args) as client:
            health = client.health()
    except ProtocolError as exc:
        print(f"unhealthy: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(health, indent=2) if args.json else health.get("status", "unknown"))
    return 0 if health.get("status") == "ok" else 1


def cmd_token(args: argparse.Namespace) -> int:
    import secrets

    # 32 random bytes: 43 URL-safe characters, well over MIN_TOKEN_CHARS.
    print(secrets.token_urlsafe(32))
    return 0


# -- config / service ---------------------------------------------------------------------------


def cmd_config_show(args: argparse.Namespace) -> int:
    config = _config(args, with_profile=True)
    print(json.dumps(config.to_json(), indent=2) if args.json else config.table())
    return 0


def cmd_config_path(args: argparse.Namespace) -> int:
    from .config import resolve_config_path

    path, _how = resolve_config_path(args.config, os.environ)
    print(path)
    return 0


def cmd_config_init(args: argparse.Namespace) -> int:
    from .config import config_template, resolve_config_path

    path, _how = resolve_config_path(args.config, os.environ)
    if path.exists() and not args.force:
        raise InvalidArgument(f"{path} exists; add --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_template(), encoding="utf-8")
    print(f"wrote {path} (every key commented out at its default)")
    return 0


def cmd_service_install(args: argparse.Namespace) -> int:
    from .daemon.service_install import install_plan

    executable = [str(Path(args.executable).absolute())] if args.executable else None
    return _run_plan(install_plan(args.platform, executable, start=not args.no_start), args)


def cmd_service_uninstall(args: argparse.Namespace) -> int:
    from .daemon.service_install import uninstall_plan

    return _run_plan(uninstall_plan(args.platform), args)


def _run_plan(plan: Any, args: argparse.Namespace) -> int:
    """Print the plan (--dry-run) or apply it, then its notes."""
    from .daemon.service_install import apply

    if args.dry_run:
        print(plan.render(), end="")
        return 0
    for line in apply(plan):
        print(line)
    for note in plan.notes:
        print(note)
    return 0


def _fleet_search(args: argparse.Namespace) -> int:
    """``search --fleet``: every agent on the LAN; exit 1 when none answered."""
    from .client import fleet_search

    token = None
    if args.token_file:
        token = Path(args.token_file).expanduser().read_text(encoding="utf-8").strip()
    result = fleet_search(
        args.collection,
        text=" ".join(args.query),
        k=args.k,
        filter=_parse_filter(args.filter),
        ef=args.ef,
        browse_timeout=args.browse_timeout,
        interfaces=tuple(args.interface),
        timeout=args.agent_timeout,
        token=token,
        raw=args.raw,
    )
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        if not result.hits:
            print("no matches")
        for rank, hit in enumerate(result.hits, 1):
            text = " ".join((hit.text or "").split())
            print(f"{rank:>3}. {hit.score:.4f}  {hit.agent}  {hit.id}  {text[:60]}")
        for outcome in result.outcomes:
            detail = f"{outcome.hits} hits" if outcome.status == "answered" else outcome.reason
            print(
                f"agent {outcome.name} ({outcome.agent_id or '?'}): {outcome.status}, {detail}",
                file=sys.stderr,
            )
        if not result.outcomes:
            print(f"no agents answered within {args.browse_timeout:g}s", file=sys.stderr)
    return 0 if result.answered else 1


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .models.default import DEFAULT_MODEL

    paths = default_paths()
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Defaults of None are filled from the configuration (flag > env > config file > default)
    # by _prepare before a command runs: see `edge-agent config show`.
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
        p.add_argument(
            "--model", help=f"model name (env EDGE_AGENT_MODEL; default {DEFAULT_MODEL})"
        )
        # None = not given: selection then takes env EDGE_AGENT_QUANT/THREADS, then profiles.
        p.add_argument("--quant", help="pin a quantization (env EDGE_AGENT_QUANT)")
        p.add_argument("--threads", type=int, help="pin the thread count (env EDGE_AGENT_THREADS)")
        p.add_argument("--profile", help="force a hardware profile (env EDGE_AGENT_PROFILE)")

    socket_default = None  # from the configuration: flag > EDGE_AGENT_SOCKET > file > default
    p = commands.add_parser("serve", help="run the daemon in the foreground")
    p.add_argument(
        "--socket", default=socket_default, help="Unix socket path (env EDGE_AGENT_SOCKET)"
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

    index = commands.add_parser("index", help="check or repair a collection on disk")
    index.add_argument(
        "--index-dir",
        type=Path,
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

    def add_client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--connect",
            "--socket",
            dest="connect",
            default=socket_default,
            metavar="ADDRESS",
            help="socket path or HOST:PORT (env EDGE_AGENT_SOCKET; default %(default)s)",
        )
        p.add_argument("--token-file", help="auth token for TCP (else env EDGE_AGENT_TOKEN)")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds per call")

    p = commands.add_parser("add", help="embed and store documents (files, JSONL, or stdin)")
    p.add_argument("collection")
    p.add_argument("files", nargs="*", help="text or .jsonl files; - or none: stdin")
    p.add_argument("--jsonl", action="store_true", help="read every input as JSONL")
    p.add_argument(
        "--chunk-chars",
        type=int,
        help="plain-text chunk size (default: 3 x the model's max tokens, 768 for MiniLM)",
    )
    p.add_argument("--batch", type=int, default=64, help="documents per request (default 64)")
    p.add_argument(
        "--long-text",
        choices=("truncate", "chunk", "error"),
        default="chunk",
        help="a chunk still over the model's window: embed all of it in pieces (chunk,"
        " default), cut it (truncate) or refuse (error)",
    )
    p.add_argument("--no-text", action="store_true", help="store vectors and metadata only")
    add_client_options(p)
    p.set_defaults(func=cmd_add)

    p = commands.add_parser("search", help="top-k documents of a collection for a query")
    p.add_argument("collection")
    p.add_argument("query", nargs="+")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE[|VALUE...]")
    p.add_argument(
        "--where",
        metavar="JSON",
        help='a filter in the full language, e.g. \'{"year": {"gte": 2020}, "or": [...]}\'',
    )
    p.add_argument(
        "--mode",
        choices=("dense", "keyword", "hybrid"),
        help="by meaning, by words (BM25), or both fused (default: hybrid where texts are stored)",
    )
    p.add_argument("--fusion", choices=("weighted", "rrf"), help="hybrid: how (default weighted)")
    p.add_argument("--weight", type=float, help="hybrid weighted: the meaning side's share (0.7)")
    p.add_argument("--explain", action="store_true", help="show the dense and keyword scores")
    p.add_argument("--ef", type=int, help="HNSW search breadth (recall vs speed)")
    p.add_argument("--json", action="store_true")
    add_client_options(p)
    fleet = p.add_argument_group("fleet search (every agent discovered on the LAN)")
    fleet.add_argument("--fleet", action="store_true", help="search every agent that has it")
    fleet.add_argument(
        "--raw", action="store_true", help="also merge agents of another model (scores differ)"
    )
    fleet.add_argument(
        "--browse-timeout", type=float, default=2.0, help="seconds to discover (default 2)"
    )
    fleet.add_argument(
        "--agent-timeout", type=float, default=5.0, help="seconds per call to an agent (default 5)"
    )
    fleet.add_argument(
        "--interface", action="append", default=[], help="browse only here (repeatable)"
    )
    p.set_defaults(func=cmd_search)

    p = commands.add_parser("delete", help="delete documents by id")
    p.add_argument("collection")
    p.add_argument("ids", nargs="+")
    add_client_options(p)
    p.set_defaults(func=cmd_delete)

    p = commands.add_parser("collections", help="list, create, drop or describe collections")
    p.add_argument("action", nargs="?", default="list", choices=("list", "create", "drop", "info"))
    p.add_argument("name", nargs="?")
    p.add_argument("--dimensions", type=int, help="create: a Matryoshka size of the model")
    p.add_argument("--yes", action="store_true", help="drop: confirm")
    p.add_argument("--json", action="store_true")
    add_client_options(p)
    p.set_defaults(func=cmd_collections)

    p = commands.add_parser("stats", help="the daemon's counters and latency percentiles")
    add_client_options(p)
    p.set_defaults(func=cmd_stats)

    p = commands.add_parser("health", help="exit 0 if the daemon is healthy, 1 otherwise")
    p.add_argument("--json", action="store_true")
    add_client_options(p)
    p.set_defaults(func=cmd_health)

    p = commands.add_parser("token", help="print a new random auth token for --listen")
    p.set_defaults(func=cmd_token)

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

    p = commands.add_parser("discover", help="list the agents advertising on the LAN (mDNS)")
    p.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to listen for answers (default 3)"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--interface",
        action="append",
        default=[],
        help="browse only on this interface name or address (repeatable; default all)",
    )
    p.set_defaults(func=cmd_discover)

    config = commands.add_parser("config", help="the effective configuration and its file")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    p = config_commands.add_parser("show", help="every setting, its value and where it came from")
    p.add_argument("--json", action="store_true")
    add_model_options(p)
    p.set_defaults(func=cmd_config_show)
    p = config_commands.add_parser("path", help="the configuration file that is read")
    p.set_defaults(func=cmd_config_path, without_config=True)
    p = config_commands.add_parser("init", help="write a commented configuration file")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_config_init, without_config=True)

    service = commands.add_parser("service", help="run at boot: systemd (Linux), launchd (macOS)")
    service_commands = service.add_subparsers(dest="service_command", required=True)
    for action, what in (("install", "install and start"), ("uninstall", "stop and remove")):
        p = service_commands.add_parser(action, help=f"{what} the service")
        p.add_argument("--dry-run", action="store_true", help="print the files and commands")
        p.add_argument("--platform", choices=("linux", "macos"), help="default: this machine's")
        if action == "install":
            p.add_argument("--exec", dest="executable", help="edge-agent executable to run")
            p.add_argument("--no-start", action="store_true", help="install and enable only")
        p.set_defaults(func=cmd_service_install if action == "install" else cmd_service_uninstall)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _prepare(args)
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
