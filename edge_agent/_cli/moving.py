"""``collections copy SRC DST`` and ``collections export NAME``: moving documents between
backends (local <-> Milvus) and out to other tools, through a running daemon.

Both walk the source's ids in sorted order, a page at a time (``collections`` action
``ids``), and fetch each page's documents with their vectors (``get``): nothing is embedded
again, so a copy keeps the exact vectors. A copy writes with upsert, so a page written twice
is harmless, and records the last id it copied in a state file after each page: run the same
command again after an interruption and it goes on from there (``--restart`` starts over).
At the end it checks that the destination holds as many documents as the source.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..errors import CollectionNotFound, EdgeAgentError, InvalidArgument, ModelMismatch
from .common import connect_client, state_dir_of

__all__ = ["cmd_copy", "cmd_export"]

PAGE = 500  # documents per get / add_vectors round trip (get takes at most 1000)


def _pages(
    client: Any, name: str, after: str | None, batch: int
) -> Iterator[list[dict[str, Any]]]:
    """The documents of ``name`` after id ``after``, a page at a time, with vectors."""
    if not 1 <= batch <= 1000:
        raise InvalidArgument(f"--batch must be in [1, 1000], got {batch}")
    while True:
        page = client.collection_ids(name, after=after, limit=batch)
        ids = page["ids"]
        if ids:
            docs = [d for d in client.get(name, ids, with_vectors=True) if d is not None]
            yield docs  # ids deleted since the listing are skipped
            after = ids[-1]
        if page.get("next") is None:
            return


def _state_path(args: argparse.Namespace, src: str, dst: str) -> Path:
    if args.state:
        return Path(args.state)
    return state_dir_of(args) / "copies" / f"{src}--{dst}.json"


def cmd_copy(args: argparse.Namespace) -> int:
    from ..progress import Progress

    src, dst = args.name, args.dest
    if not src or not dst:
        raise InvalidArgument("collections copy needs SRC and DST")
    if src == dst:
        raise InvalidArgument("collections copy: SRC and DST are the same collection")
    state_path = _state_path(args, src, dst)
    after: str | None = None
    copied = 0
    if state_path.is_file() and not args.restart:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        after, copied = state.get("after"), int(state.get("copied", 0))
    with connect_client(args) as client:
        source = client.collection_info(src)
        try:
            target = client.collection_info(dst)
        except CollectionNotFound:
            dims = source["fingerprint"].get("dimensions")
            target = client.create_collection(
                dst,
                dims,
                backend=args.backend,
                uri=args.uri,
                token_file=args.milvus_token_file,
            )
        if target["fingerprint"] != source["fingerprint"]:
            raise ModelMismatch(
                f"{src!r} holds vectors of {source['fingerprint']}; {dst!r} is pinned to"
                f" {target['fingerprint']}: a copy keeps vectors, so both must have one model"
            )
        total = int(source["count"])
        if after is not None:
            print(f"resuming after id {after!r} ({copied} copied before)", file=sys.stderr)
        with Progress(f"copy {src} -> {dst}", total, " docs") as bar:
            bar.advance(copied)
            for docs in _pages(client, src, after, args.batch):
                if docs:
                    client.add_vectors(
                        dst,
                        [d["id"] for d in docs],
                        np.stack([d["vector"] for d in docs]),
                        texts=[d.get("text") for d in docs],
                        metadata=[d.get("metadata") or {} for d in docs],
                        if_exists="replace",
                        create=False,
                    )
                    copied += len(docs)
                    after = docs[-1]["id"]
                    state_path.parent.mkdir(parents=True, exist_ok=True)
                    state_path.write_text(
                        json.dumps({"after": after, "copied": copied}), encoding="utf-8"
                    )
                    bar.advance(len(docs))
        src_count, dst_count = client.count(src), client.count(dst)
    result = {
        "source": src,
        "destination": dst,
        "copied": copied,
        "source_count": src_count,
        "destination_count": dst_count,
        "verified": src_count == dst_count,
    }
    print(json.dumps(result, indent=2))
    if src_count != dst_count:
        print(
            f"counts differ: {src} has {src_count}, {dst} has {dst_count} (documents added or"
            " deleted during the copy, or the destination held others before)",
            file=sys.stderr,
        )
        return 1
    state_path.unlink(missing_ok=True)
    return 0


def export_line(doc: dict[str, Any]) -> str:
    """One document as a JSON line: id, text, metadata, and the vector as base64 of
    little-endian float32."""
    vector = np.asarray(doc["vector"], dtype="<f4")
    return json.dumps(
        {
            "id": doc["id"],
            "text": doc.get("text"),
            "metadata": doc.get("metadata") or {},
            "vector": base64.b64encode(vector.tobytes()).decode("ascii"),
            "dims": int(vector.shape[0]),
        },
        ensure_ascii=False,
    )


def cmd_export(args: argparse.Namespace) -> int:
    from ..progress import Progress

    if not args.name:
        raise InvalidArgument("collections export needs a NAME")
    out: TextIO
    with connect_client(args) as client:
        total = int(client.count(args.name))
        out = (
            sys.stdout
            if args.output in (None, "-")
            else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
        )
        written = 0
        try:
            with Progress(f"export {args.name}", total, " docs") as bar:
                for docs in _pages(client, args.name, None, args.batch):
                    for doc in docs:
                        out.write(export_line(doc) + "\n")
                    written += len(docs)
                    bar.advance(len(docs))
        except EdgeAgentError:
            raise
        finally:
            if out is not sys.stdout:
                out.close()
    print(f"exported {written} documents of {args.name}", file=sys.stderr)
    return 0
