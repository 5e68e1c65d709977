"""Files and streams into documents for ``add``: JSONL records or plain text split into chunks.

Pure text handling (no sockets, no model), so the CLI stays thin and this is testable alone.

- JSONL (``*.jsonl``/``*.ndjson``, ``--jsonl``, or stdin whose first character is ``{``): one
  ``{"id": ..., "text": ..., "metadata": {...}}`` per line; ``id`` and ``text`` are required.
- Plain text files: split on blank lines into paragraphs, packed into chunks of at most
  ``chunk_chars`` characters (a longer paragraph is cut at sentence, then word boundaries).
  Chunk ids are ``<path>#<n>``, metadata ``{"source": path, "chunk": n}``: adding the same file
  again replaces its chunks instead of duplicating them.
- Plain text on stdin: one document per non-empty line, id ``line:<sha256 prefix>`` of its
  text (the same line added twice is one document).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .errors import InvalidArgument

__all__ = ["DEFAULT_CHUNK_CHARS", "Doc", "chunk_text", "read_jsonl", "read_lines", "read_sources"]

DEFAULT_CHUNK_CHARS = 768  # 3 characters a token x MiniLM's 256-token window
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"id": self.id, "text": self.text}
        if self.metadata:
            wire["metadata"] = self.metadata
        return wire


def _split_long(paragraph: str, limit: int) -> Iterator[str]:
    """Pieces of at most ``limit`` characters: whole sentences when they fit, else words,
    else hard cuts (a "word" longer than the limit, e.g. a base64 blob)."""
    piece = ""
    for sentence in _SENTENCE_END.split(paragraph):
        for word in sentence.split(" ") if len(sentence) > limit else [sentence]:
            while len(word) > limit:
                if piece:
                    yield piece
                    piece = ""
                yield word[:limit]
                word = word[limit:]
            joined = f"{piece} {word}" if piece else word
            if len(joined) <= limit:
                piece = joined
            else:
                yield piece
                piece = word
    if piece:
        yield piece


def chunk_text(text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Paragraph-packed chunks of at most ``chunk_chars`` characters, none empty."""
    if chunk_chars < 50:
        raise InvalidArgument(f"chunk size must be at least 50 characters, got {chunk_chars}")
    chunks: list[str] = []
    current = ""
    for raw in _PARAGRAPH.split(text):
        paragraph = " ".join(raw.split())
        if not paragraph:
            continue
        for piece in (
            [paragraph] if len(paragraph) <= chunk_chars else _split_long(paragraph, chunk_chars)
        ):
            if current and len(current) + 2 + len(piece) <= chunk_chars:
                current = f"{current}\n\n{piece}"
            else:
                if current:
                    chunks.append(current)
                current = piece
    if current:
        chunks.append(current)
    return chunks


def read_jsonl(lines: Iterable[str], source: str) -> Iterator[Doc]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{source}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InvalidArgument(f"{source}:{number}: each line must be a JSON object")
        doc_id, text = record.get("id"), record.get("text")
        if not isinstance(doc_id, str) or not doc_id:
            raise InvalidArgument(f'{source}:{number}: "id" must be a non-empty string')
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgument(f'{source}:{number}: "text" must be a non-empty string')
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InvalidArgument(f'{source}:{number}: "metadata" must be an object')
        yield Doc(doc_id, text, metadata)


def read_lines(lines: Iterable[str]) -> Iterator[Doc]:
    for line in lines:
        text = line.strip()
        if text:
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
            yield Doc(f"line:{digest}", text)


def read_sources(
    paths: list[str],
    stdin: TextIO,
    *,
    jsonl: bool = False,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
) -> Iterator[Doc]:
    """Documents from files (``-`` or no paths: stdin), in order, lazily."""
    for name in paths or ["-"]:
        if name == "-":
            first = stdin.readline()
            rest = iter(stdin)
            lines = [first] if first else []
            if jsonl or first.lstrip().startswith("{"):
                yield from read_jsonl(_chain(lines, rest), "<stdin>")
            else:
                yield from read_lines(_chain(lines, rest))
            continue
        path = Path(name)
        try:
            if jsonl or path.suffix.lower() in JSONL_SUFFIXES:
                with path.open(encoding="utf-8") as handle:
                    yield from read_jsonl(handle, name)
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"cannot read {name}: {exc}") from None
        for number, chunk in enumerate(chunk_text(text, chunk_chars)):
            yield Doc(f"{name}#{number}", chunk, {"source": name, "chunk": number})


def _chain(head: list[str], rest: Iterable[str]) -> Iterator[str]:
    yield from head
    yield from rest
