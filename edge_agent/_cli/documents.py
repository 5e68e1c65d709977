"""``add``, ``search`` (one daemon, or ``--fleet``: every agent on the LAN), ``delete`` and
``collections``: a daemon's collections, as its client.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from .common import add_client_options, connect_client


def cmd_add(args: argparse.Namespace) -> int:
    from ..ingest import read_sources
    from ..progress import Progress

    added = truncated = 0
    with (
        connect_client(args) as client,
        Progress(f"add to {args.collection}", None, " docs") as bar,
    ):
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
            raise InvalidArgument('--where takes a JSON object, e.g. \'{"year": {"gte": 2020}}\'')
        where.update(extra)
    with connect_client(args) as client:
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
            keyword = "-" if hit.keyword_score is None else f"{hit.keyword_score:.3g}"
            parts = f" (dense {dense}, keyword {keyword})"
        print(f"{rank:>3}. {hit.score:.4f}{parts}  {hit.id}  {text[:80]}")
    return 0


def _fleet_search(args: argparse.Namespace) -> int:
    """``search --fleet``: every agent on the LAN; exit 1 when none answered."""
    from ..client import fleet_search

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


def cmd_delete(args: argparse.Namespace) -> int:
    with connect_client(args) as client:
        deleted = client.delete(args.collection, args.ids)
    print(f"deleted {deleted} of {len(args.ids)} ids from {args.collection}")
    return 0


def cmd_collections(args: argparse.Namespace) -> int:
    if args.action in ("copy", "export"):
        from .moving import cmd_copy, cmd_export

        return cmd_copy(args) if args.action == "copy" else cmd_export(args)
    with connect_client(args) as client:
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
                where = f"  milvus {item.get('uri')}" if item.get("backend") == "milvus" else ""
                print(
                    f"{item['name']:<24} {item['count']:>9} docs  {item['dims']}d"
                    f"  {fp['model']} ({fp['sha256'][:12]}){where}"
                )
            return 0
        if not args.name:
            raise InvalidArgument(f"collections {args.action} needs a NAME")
        if args.action == "create":
            result = client.create_collection(
                args.name,
                args.dimensions,
                backend=args.backend,
                uri=args.uri,
                token_file=args.milvus_token_file,
            )
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


def add_add_parser(commands: Any) -> None:
    """``add``."""
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


def add_search_parser(commands: Any) -> None:
    """``search``."""
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


def add_collection_parsers(commands: Any) -> None:
    """``delete`` and ``collections``."""
    p = commands.add_parser("delete", help="delete documents by id")
    p.add_argument("collection")
    p.add_argument("ids", nargs="+")
    add_client_options(p)
    p.set_defaults(func=cmd_delete)

    p = commands.add_parser(
        "collections", help="list, create, drop, describe, copy or export collections"
    )
    p.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=("list", "create", "drop", "info", "copy", "export"),
    )
    p.add_argument("name", nargs="?")
    p.add_argument("dest", nargs="?", help="copy: the destination collection (made if missing)")
    p.add_argument("--dimensions", type=int, help="create: a Matryoshka size of the model")
    p.add_argument(
        "--backend",
        choices=("local", "milvus"),
        help="create/copy: where the new collection lives (default: the daemon's index.backend)",
    )
    p.add_argument("--uri", help="milvus: a Milvus Lite file (*.db) or http://host:19530")
    p.add_argument(
        "--milvus-token-file", help="milvus: a file (on the daemon's host) holding the token"
    )
    p.add_argument("--batch", type=int, default=500, help="copy/export: documents per call")
    p.add_argument("--state", help="copy: the resume file (default: under the state dir)")
    p.add_argument("--restart", action="store_true", help="copy: ignore a saved position")
    p.add_argument("-o", "--output", help="export: the JSONL file (default: stdout)")
    p.add_argument("--yes", action="store_true", help="drop: confirm")
    p.add_argument("--json", action="store_true")
    add_client_options(p)
    p.set_defaults(func=cmd_collections)
