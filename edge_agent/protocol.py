"""The wire protocol: MessagePack-RPC over a byte stream, as pure functions and data classes.

Nothing here touches sockets, threads or asyncio, so the server, both clients and the tests share
one definition of every message, argument and error. See docs/protocol.md for the spec.

Framing is the msgpack-rpc spec's: messages are msgpack arrays written back to back with no
length prefix. ``Decoder`` turns untrusted bytes into messages under hard limits, raising only
the typed errors below; ``parse_message`` then checks the msgpack-rpc shape.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard

import msgpack
import numpy as np

from .errors import (
    AlreadyRunning,
    AuthFailed,
    AuthRequired,
    BadRequest,
    BadResponse,
    ConnectionFailed,
    EdgeAgentError,
    ErrorCode,
    InvalidArgument,
    MalformedFrame,
    MessageTooLarge,
    Overloaded,
    ProtocolError,
    RequestTimeout,
    ShuttingDown,
    UnknownMethod,
    error_for_code,
)
from .texts import check_text

__all__ = [
    "ARGUMENTS",
    "BACKENDS",
    "COLLECTION_ACTIONS",
    "ERROR_NOTIFICATION",
    "IF_EXISTS_MODES",
    "KINDS",
    "LONG_TEXT_MODES",
    "MAX_GET_IDS",
    "MAX_IDS_PAGE",
    "NOTIFICATION",
    "PROTOCOL_VERSION",
    "REQUEST",
    "RESPONSE",
    "AddArgs",
    "AddVectorsArgs",
    "AlreadyRunning",
    "AuthArgs",
    "AuthFailed",
    "AuthRequired",
    "BadRequest",
    "BadResponse",
    "CollectionsArgs",
    "ConnectionFailed",
    "CountArgs",
    "Decoder",
    "DeleteArgs",
    "EmbedArgs",
    "EmbedResult",
    "GetArgs",
    "HelloArgs",
    "Limits",
    "MalformedFrame",
    "MessageTooLarge",
    "NewDoc",
    "NoArgs",
    "Notification",
    "Overloaded",
    "ProtocolCode",
    "ProtocolError",
    "Request",
    "RequestTimeout",
    "Response",
    "SearchArgs",
    "SearchHit",
    "ShuttingDown",
    "UnknownMethod",
    "bind_args",
    "decode_vectors",
    "encode_embed_result",
    "encode_notification",
    "encode_request",
    "encode_response",
    "encode_vectors",
    "error_from_wire",
    "error_to_wire",
    "exception_class",
    "named_args",
    "parse_message",
    "request_vectors",
]

# Bumped only for incompatible changes; additions are announced through hello's capabilities.
PROTOCOL_VERSION: Final = 1

REQUEST: Final = 0
RESPONSE: Final = 1
NOTIFICATION: Final = 2

# The server's only notification: a fatal error, sent just before it closes the connection,
# because a broken frame has no msgid to answer.
ERROR_NOTIFICATION: Final = "error"

# Kept here rather than imported from the embedder so that clients never import llama.cpp;
# tests/test_server.py checks they agree with edge_agent.embedding.embedder.
KINDS: Final = ("document", "query")
SEARCH_MODES: Final = ("dense", "keyword", "hybrid")
FUSIONS: Final = ("rrf", "weighted")  # = edge_agent.index.fusion.FUSIONS (tested)
DEFAULT_FUSION: Final = "weighted"  # = edge_agent.index.fusion.DEFAULT_FUSION (tested)
LONG_TEXT_MODES: Final = ("truncate", "chunk", "error")

_MSGID_MAX: Final = 2**32 - 1  # msgpack-rpc msgids are 32-bit unsigned


# One code space: the protocol's codes (4xx) are ErrorCode members; the old name stays.
ProtocolCode = ErrorCode

# The exception class for any code, protocol-level or not.
exception_class = error_for_code


# -- limits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Decoder limits. Each bounds what a peer can make us allocate before we look at it."""

    max_message_bytes: int = 8 << 20
    # msgpack allocates a list/dict of the declared size up front: cap the declared sizes too,
    # so a 5-byte header claiming 4 billion elements is refused before any allocation.
    max_array_len: int = 65_536
    max_map_len: int = 1_024

    def __post_init__(self) -> None:
        for name, low in (("max_message_bytes", 64), ("max_array_len", 16), ("max_map_len", 16)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidArgument(f"{name} must be an integer >= {low}, got {value!r}")


# -- framing --------------------------------------------------------------------------------------

# What the header check in Decoder needs to know about each MessagePack token. msgpack checks a
# str/bin/ext length against its limits only once the payload has arrived, so a 5-byte header
# declaring 4 GiB would make us buffer a whole message's worth of bytes before refusing it; the
# header check reads those lengths itself. One regex passes over runs of complete tokens in C:
# scalars, container headers, fixstr and str/bin shorter than 256 bytes. A complete token needs
# no check (its bytes are here, within the limit), so the Python loop sees only the token the
# regex stopped at: one cut by the end of the read, a longer str/bin, or an ext. The regex's
# alternatives for lengths are ordered short to long, so matching a token of n bytes costs O(n)
# and a message of tiny tokens O(bytes), like the long ones; possessive, so nothing backtracks.
# Measured on a 2-core x86 test box: 8 MiB of texts in 64 KiB reads adds ~1 ms; the worst
# case, 8 MiB of nothing but empty bins, ~1 s (msgpack alone: 0.1 s), once per such message.
_LENGTH_PREFIXED = rb"(?:" + rb"|".join(rb"\x%02x.{%d}" % (n, n) for n in range(256)) + rb")"
_FIXSTR = rb"(?:" + rb"|".join(rb"\x%02x.{%d}" % (0xA0 + n, n) for n in range(1, 32)) + rb")"
_FIXED_TOKENS = [
    rb"[\x00-\xa0\xc0\xc2\xc3\xe0-\xff]++",  # fixint, fixmap/fixarray headers, "", nil, bools
    rb"[\xcc\xd0].",  # uint8, int8
    rb"[\xcd\xd1\xdc\xde].{2}",  # uint16, int16, array16 and map16 headers
    rb"[\xca\xce\xd2\xdd\xdf].{4}",  # float32, uint32, int32, array32 and map32 headers
    rb"[\xcb\xcf\xd3].{8}",  # float64, uint64, int64
    # fixstr; the lookaheads spare other tokens a try of each alternative
    rb"(?=[\xa1-\xbf])" + _FIXSTR,
    # bin8/str8, then bin16/str16 and bin32/str32 whose length is under 256
    rb"(?=[\xc4-\xc6\xd9-\xdb])(?:[\xc4\xd9]|[\xc5\xda]\x00|[\xc6\xdb]\x00\x00\x00)"
    + _LENGTH_PREFIXED,
]


@functools.cache
def _fixed_run() -> re.Pattern[bytes]:
    # Compiled on first use (a few ms): most processes never see a message cut by a read.
    return re.compile(rb"(?:" + rb"|".join(_FIXED_TOKENS) + rb")*+", re.DOTALL)


# Lead byte -> (bytes of the length field, bytes between that field and the payload).
_SIZED = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),  # bin 8/16/32
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),  # str 8/16/32
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),  # ext 8/16/32 (the type byte follows the length)
}  # fmt: skip
_EXT = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})


class _HeaderCheck:
    """Walks the tokens of one incomplete message and refuses, at its header, a str, bin or ext
    whose declared length would carry the message past its limit, and any ext (unused here).

    Runs only on a message still incomplete after a read (complete ones never reach it), and
    resumes where it stopped: each byte of a message is looked at once however it is split.
    Nesting needs no stack: MessagePack is a plain sequence of tokens, and a container header is
    one token like any other.
    """

    __slots__ = ("carry", "message_start", "pos", "skip")

    def __init__(self, message_start: int) -> None:
        self.message_start = message_start  # stream offset of the message's first byte
        self.pos = message_start  # stream offset of the first byte not looked at yet
        self.skip = 0  # payload bytes still to pass over
        self.carry = b""  # the start of a token split by the end of a read

    def scan(self, data: bytes, cap: int) -> None:
        """Look at ``data``, the stream's bytes from ``self.pos`` on; raise MessageTooLarge or
        MalformedFrame for a header that can never be accepted."""
        self.pos += len(data)
        if self.skip:
            if self.skip >= len(data):
                self.skip -= len(data)
                return
            data = data[self.skip :]
            self.skip = 0
        if self.carry:
            data = self.carry + data
            self.carry = b""
        base = self.pos - len(data)  # stream offset of data[0]
        fixed_run = _fixed_run()
        i, n = 0, len(data)
        while i < n:
            i = fixed_run.match(data, i).end()  # type: ignore[union-attr]  # * always matches
            if i >= n:
                return
            lead = data[i]
            sized = _SIZED.get(lead)
            if sized is None:
                if lead == 0xC1:
                    raise MalformedFrame("undecodable message (byte 0xc1 is never used)")
                if lead in _EXT:
                    raise MalformedFrame("undecodable message (extension types are not used)")
                break  # a fixed-size token cut by the end of the read
            width, gap = sized
            if i + 1 + width > n:
                break  # the length field is not all here yet
            length = int.from_bytes(data[i + 1 : i + 1 + width], "big")
            end = i + 1 + width + gap + length  # offset in data just past the payload
            if base + end - self.message_start > cap:
                raise MessageTooLarge(
                    f"message over {cap} bytes (a {_TOKEN_NAMES[lead]} of {length} bytes"
                    f" declared at byte {base + i - self.message_start})",
                    limit=cap,
                    declared=length,
                )
            if lead in _EXT:
                raise MalformedFrame("undecodable message (extension types are not used)")
            if end > n:
                self.skip = end - n
                return
            i = end
        self.carry = data[i:]


_TOKEN_NAMES = {
    0xC4: "bin", 0xC5: "bin", 0xC6: "bin", 0xD9: "str", 0xDA: "str", 0xDB: "str",
    0xC7: "ext", 0xC8: "ext", 0xC9: "ext",
}  # fmt: skip


class Decoder:
    """Untrusted bytes in, msgpack objects out; one per connection, dropped after any error.

    ``room()`` says how many bytes may be fed next without the message being decoded growing
    past ``max_message_bytes``. The count is ours, not the unpacker's: msgpack consumes a large
    array element by element, so its buffer alone would let one endless message through.
    A reader that never reads more than ``room()`` bytes can tell "one message is too large"
    (room 0 while a message is incomplete) from "several messages arrived at once".

    Declared sizes are checked at their headers, before their bytes arrive: arrays and maps by
    msgpack (``max_array_len``, ``max_map_len``: MalformedFrame), str/bin/ext lengths here
    (``_HeaderCheck``: MessageTooLarge when the payload would end past the current limit).
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        size = self.limits.max_message_bytes
        self._unpacker = msgpack.Unpacker(
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_buffer_size=size,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=self.limits.max_array_len,
            max_map_len=self.limits.max_map_len,
            max_ext_len=0,  # no extension types in this protocol
        )
        self._fed = 0  # bytes fed since the start of the stream
        self._message_start = 0  # stream offset where the incomplete message begins
        self._broken = False
        # Bytes fed since the last drain (references, not copies), starting at stream offset
        # _unchecked_start: what the header check has not seen yet if a message is left open.
        self._unchecked: list[bytes] = []
        self._unchecked_start = 0
        self._check: _HeaderCheck | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete message (non-zero at EOF means a truncated frame)."""
        return self._fed - self._message_start

    def room(self) -> int:
        return self.limits.max_message_bytes - self.pending_bytes

    def _too_large(self, limit: int | None = None) -> MessageTooLarge:
        self._broken = True
        limit = self.limits.max_message_bytes if limit is None else limit
        return MessageTooLarge(f"message over {limit} bytes", limit=limit)

    def feed(self, data: bytes) -> None:
        """Buffer ``data``; more than ``room()`` bytes is refused as MessageTooLarge (callers
        that must accept several messages per read should drain the iterator first)."""
        if self._broken:
            raise MalformedFrame("decoder used after an error")
        if len(data) > self.room():
            raise self._too_large()
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise self._too_large() from None
        self._fed += len(data)
        if data:
            # A reference, not a copy; a caller's mutable buffer is copied, as the unpacker did.
            self._unchecked.append(data if isinstance(data, bytes) else bytes(data))

    def feed_iter(self, data: bytes, limit: Callable[[], int] | None = None) -> Iterator[Any]:
        """Feed ``data`` and yield each complete message as it appears, never buffering more of
        one message than the limit: ``limit()`` if given (read again before each piece, so it
        may change between messages, as a connection's does at auth), else max_message_bytes.
        Raises MessageTooLarge as soon as an incomplete message reaches the limit, or declares
        a str/bin longer than the limit leaves room for."""
        offset = 0
        while offset < len(data):
            cap = limit() if limit is not None else self.limits.max_message_bytes
            room = cap - self.pending_bytes
            if room <= 0:
                raise self._too_large(cap)
            piece = data[offset : offset + room] if offset or room < len(data) else data
            self.feed(piece)
            offset += len(piece)
            yield from self._drain(limit)
        cap = limit() if limit is not None else self.limits.max_message_bytes
        if self.pending_bytes >= cap:
            raise self._too_large(cap)

    def __iter__(self) -> Iterator[Any]:
        """Every complete message buffered so far; raises MalformedFrame on bad bytes, and
        MessageTooLarge for a declared str/bin/ext length beyond max_message_bytes."""
        return self._drain(None)

    def _drain(self, limit: Callable[[], int] | None) -> Iterator[Any]:
        if self._broken:
            raise MalformedFrame("decoder used after an error")
        while True:
            try:
                obj = next(self._unpacker)
            except StopIteration:
                break
            except Exception as exc:
                # The unpacker's state is undefined after any error (ValueError for a declared
                # length over a limit, FormatError, StackError, UnicodeDecodeError, ...):
                # the stream cannot be resynchronised, so the connection must go.
                self._broken = True
                if isinstance(exc, UnicodeDecodeError):
                    reason = "a str is not valid UTF-8"  # its text may be a document's: not shown
                else:
                    reason = f"{type(exc).__name__}: {exc}"[:160]
                raise MalformedFrame(f"undecodable message ({reason})") from None
            self._message_start = self._unpacker.tell()
            yield obj
        self._check_headers(limit)

    def _check_headers(self, limit: Callable[[], int] | None) -> None:
        """Run the header check over the bytes of the message left incomplete, if any."""
        chunks, start = self._unchecked, self._unchecked_start
        self._unchecked, self._unchecked_start = [], self._fed
        if self.pending_bytes == 0:
            self._check = None  # the common case: every message arrived whole
            return
        check = self._check
        if check is None or check.message_start != self._message_start:
            # A message that began after the last drain: all of its bytes are in ``chunks``.
            check = self._check = _HeaderCheck(self._message_start)
        cap = limit() if limit is not None else self.limits.max_message_bytes
        skip = check.pos - start  # bytes of ``chunks`` before the check's position
        try:
            for chunk in chunks:
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                check.scan(chunk[skip:] if skip else chunk, cap)
                skip = 0
        except ProtocolError:
            self._broken = True
            raise


# -- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    msgid: int
    method: str
    params: list[Any]


@dataclass(frozen=True)
class Notification:
    method: str
    params: list[Any]


@dataclass(frozen=True)
class Response:
    msgid: int
    error: Any
    result: Any


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_message(obj: Any) -> Request | Notification | Response:
    """Check the msgpack-rpc shape. BadRequest carries ``data["msgid"]`` when one was readable,
    so a server can answer it and keep the connection; without one, the error is fatal."""
    if not isinstance(obj, list) or not obj or not _is_int(obj[0]):
        raise BadRequest("a message must be an array starting with its type (0, 1 or 2)")
    kind = obj[0]
    if kind == REQUEST:
        if len(obj) != 4 or not _is_int(obj[1]) or not 0 <= obj[1] <= _MSGID_MAX:
            raise BadRequest("a request is [0, msgid (uint32), method, params]")
        msgid = obj[1]
        if not isinstance(obj[2], str):
            raise BadRequest("method must be a string", msgid=msgid)
        if not isinstance(obj[3], list):
            raise BadRequest("params must be an array", msgid=msgid)
        return Request(msgid, obj[2], obj[3])
    if kind == RESPONSE:
        if len(obj) != 4 or not _is_int(obj[1]) or not 0 <= obj[1] <= _MSGID_MAX:
            raise BadRequest("a response is [1, msgid (uint32), error, result]")
        return Response(obj[1], obj[2], obj[3])
    if kind == NOTIFICATION:
        if len(obj) != 3 or not isinstance(obj[1], str) or not isinstance(obj[2], list):
            raise BadRequest("a notification is [2, method, params]")
        return Notification(obj[1], obj[2])
    raise BadRequest(f"unknown message type {kind}")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode_request(msgid: int, method: str, args: Mapping[str, Any] | None = None) -> bytes:
    return _pack([REQUEST, msgid, method, [dict(args)] if args else []])


def encode_response(msgid: int, error: list[Any] | None, result: Any) -> bytes:
    return _pack([RESPONSE, msgid, error, result])


def encode_notification(method: str, args: Mapping[str, Any] | None = None) -> bytes:
    return _pack([NOTIFICATION, method, [dict(args)] if args else []])


# -- errors on the wire ---------------------------------------------------------------------------


def _wire_safe(value: Any, depth: int = 0) -> Any:
    """Error data must always encode: anything exotic becomes its repr."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if depth < 4 and isinstance(value, (list, tuple)):
        return [_wire_safe(v, depth + 1) for v in value]
    if depth < 4 and isinstance(value, Mapping):
        return {str(k): _wire_safe(v, depth + 1) for k, v in value.items()}
    return repr(value)


def error_to_wire(exc: EdgeAgentError) -> list[Any]:
    """[code, name, message, data]."""
    return [int(exc.code), exc.code.name, exc.message, _wire_safe(exc.data)]


def error_from_wire(error: Any) -> EdgeAgentError:
    """The typed exception for a wire error; a reply that is not [code, name, message, data]
    becomes BadResponse rather than crashing the client."""
    if (
        not isinstance(error, list)
        or len(error) != 4
        or not _is_int(error[0])
        or not isinstance(error[1], str)
        or not isinstance(error[2], str)
        or not (error[3] is None or isinstance(error[3], dict))
    ):
        return BadResponse(f"malformed error in reply: {error!r:.200}")
    code, name, message, data = error
    cls = exception_class(code)
    kwargs = {str(k): v for k, v in (data or {}).items()}
    if int(cls.code) != code:
        # A code from a newer server: keep what it said instead of mislabelling it.
        message = f"{name} ({code}): {message}"
        kwargs.setdefault("remote_code", code)
    return cls(message, **kwargs)


# -- params convention ----------------------------------------------------------------------------


def named_args(params: Any) -> dict[str, Any]:
    """Params are [] or [{name: value, ...}]; anything else is a BadRequest."""
    if not isinstance(params, list) or len(params) > 1:
        raise BadRequest("params must be [] or an array holding one map of named arguments")
    if not params or params[0] is None:
        return {}
    if not isinstance(params[0], dict):
        raise BadRequest("params must be [] or an array holding one map of named arguments")
    return params[0]


def _reject_unknown(method: str, args: Mapping[str, Any], known: Sequence[str]) -> None:
    # Unknown names are refused, not ignored: silently dropping e.g. a misspelt "dimensions"
    # would return vectors the caller did not ask for. Clients check hello's capabilities.
    for name in args:
        if name not in known:
            raise InvalidArgument(
                f"{method} takes no argument {name!r} (known: {', '.join(known) or 'none'})",
                argument=name,
            )


@dataclass(frozen=True)
class NoArgs:
    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> NoArgs:
        _reject_unknown("this method", args, ())
        return cls()


@dataclass(frozen=True)
class HelloArgs:
    client: str | None = None  # the client's name/version, for the server's log
    protocol: int | None = None  # the client's protocol version

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> HelloArgs:
        _reject_unknown("hello", args, ("client", "protocol"))
        client = args.get("client")
        protocol = args.get("protocol")
        if client is not None and (not isinstance(client, str) or len(client) > 256):
            raise InvalidArgument("client must be a string of at most 256 characters")
        if protocol is not None and not _is_int(protocol):
            raise InvalidArgument("protocol must be an integer")
        return cls(client=client, protocol=protocol)


@dataclass(frozen=True)
class EmbedArgs:
    """Shape and type checks only; the model's own limits (texts per call, bytes per text,
    supported dimensions) are checked by the service, which knows the model."""

    texts: list[str]
    kind: str = "document"
    instruction: str | None = None
    dimensions: int | None = None
    long_text: str = "truncate"

    @property
    def batch_key(self) -> tuple[str, str | None, int | None, str]:
        """Requests with equal keys can share one engine call."""
        return (self.kind, self.instruction, self.dimensions, self.long_text)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> EmbedArgs:
        _reject_unknown("embed", args, ("texts", "kind", "instruction", "dimensions", "long_text"))
        if "texts" not in args:
            raise InvalidArgument("embed needs texts", argument="texts")
        texts = args["texts"]
        if not isinstance(texts, list):
            raise InvalidArgument("texts must be an array of strings", argument="texts")
        if not texts:
            raise InvalidArgument("texts must not be empty", argument="texts")
        for index, text in enumerate(texts):
            check_text(index, text)
        kind = args.get("kind", "document")
        if kind is None:
            kind = "document"
        if kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {KINDS}, got {kind!r:.50}", argument="kind")
        long_text = args.get("long_text", "truncate")
        if long_text is None:
            long_text = "truncate"
        if long_text not in LONG_TEXT_MODES:
            raise InvalidArgument(
                f"long_text must be one of {LONG_TEXT_MODES}, got {long_text!r:.50}",
                argument="long_text",
            )
        instruction = args.get("instruction")
        if instruction is not None and (
            not isinstance(instruction, str) or not instruction.strip()
        ):
            raise InvalidArgument("instruction must be a non-empty string", argument="instruction")
        dimensions = args.get("dimensions")
        # Whether the model supports the size is the service's check (DIMENSIONS_NOT_SUPPORTED).
        if dimensions is not None and not _is_int(dimensions):
            raise InvalidArgument(
                f"dimensions must be an integer, got {dimensions!r:.50}", argument="dimensions"
            )
        return cls(texts, kind, instruction, dimensions, long_text)

    def to_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"texts": list(self.texts), "kind": self.kind}
        if self.instruction is not None:
            args["instruction"] = self.instruction
        if self.dimensions is not None:
            args["dimensions"] = self.dimensions
        if self.long_text != "truncate":
            args["long_text"] = self.long_text
        return args


# -- index methods ------------------------------------------------------------------------------
# Shape and type checks only. Names, ids, metadata values, filters and sizes are validated by
# the index itself (edge_agent/index), which owns those rules and their limits.

IF_EXISTS_MODES: Final = ("replace", "error")
COLLECTION_ACTIONS: Final = ("list", "create", "drop", "info", "ids")
BACKENDS: Final = ("local", "milvus")  # where a collection's documents live
MAX_IDS_PAGE: Final = 10_000  # collections ids: at most this many ids per call
MAX_GET_IDS: Final = 1_000


def _required(method: str, args: Mapping[str, Any], name: str) -> Any:
    if args.get(name) is None:
        raise InvalidArgument(f"{method} needs {name}", argument=name)
    return args[name]


def _string(method: str, args: Mapping[str, Any], name: str) -> str:
    value = _required(method, args, name)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{name} must be a non-empty string", argument=name)
    return value


def _flag(args: Mapping[str, Any], name: str, default: bool) -> bool:
    value = args.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false, got {value!r:.50}", argument=name)
    return value


def _choice(args: Mapping[str, Any], name: str, choices: Sequence[str], default: str) -> str:
    value = args.get(name)
    if value is None:
        return default
    if value not in choices:
        raise InvalidArgument(
            f"{name} must be one of {tuple(choices)}, got {value!r:.50}", argument=name
        )
    return value


def _optional_int(args: Mapping[str, Any], name: str) -> int | None:
    value = args.get(name)
    if value is not None and not _is_int(value):
        raise InvalidArgument(f"{name} must be an integer, got {value!r:.50}", argument=name)
    return value


def _id_list(method: str, args: Mapping[str, Any], name: str = "ids") -> list[str]:
    ids = _required(method, args, name)
    if not isinstance(ids, list) or not ids:
        raise InvalidArgument(f"{name} must be a non-empty array of strings", argument=name)
    for index, doc_id in enumerate(ids):
        if not isinstance(doc_id, str):
            raise InvalidArgument(f"{name}[{index}] must be a string", argument=name, index=index)
    return ids


def request_vectors(args: Mapping[str, Any], count: int | None = None) -> np.ndarray:
    """``vectors`` (bin, little-endian float32, row-major) and ``dims`` from a request."""
    data, dims = args.get("vectors"), args.get("dims")
    if not isinstance(data, bytes) or not _is_int(dims) or not 1 <= dims <= 65536:
        raise InvalidArgument(
            "vectors must be bin (little-endian float32) with dims an integer in [1, 65536]",
            argument="vectors",
        )
    if len(data) % (4 * dims):
        raise InvalidArgument(
            f"vectors hold {len(data)} bytes, not a whole number of {dims}-d float32 rows",
            argument="vectors",
        )
    rows = len(data) // (4 * dims)
    if count is not None and rows != count:
        raise InvalidArgument(f"{rows} vectors for {count} ids", argument="vectors")
    vectors = np.frombuffer(data, dtype="<f4").reshape(rows, dims).astype(np.float32)
    if not np.isfinite(vectors).all():
        raise InvalidArgument("vectors must be finite (no NaN or infinity)", argument="vectors")
    return vectors


@dataclass(frozen=True)
class AuthArgs:
    token: str

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> AuthArgs:
        _reject_unknown("auth", args, ("token",))
        token = args.get("token")
        if not isinstance(token, str) or not 1 <= len(token) <= 1024:
            raise InvalidArgument("token must be a string of 1-1024 characters")
        return cls(token)


@dataclass(frozen=True)
class NewDoc:
    id: str
    text: str
    metadata: dict[str, Any] | None


@dataclass(frozen=True)
class AddArgs:
    """Documents the daemon embeds (kind "document") and stores."""

    collection: str
    docs: list[NewDoc]
    if_exists: str = "replace"
    create: bool = True
    store_text: bool = True
    long_text: str = "truncate"

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> AddArgs:
        _reject_unknown(
            "add", args, ("collection", "docs", "if_exists", "create", "store_text", "long_text")
        )
        collection = _string("add", args, "collection")
        raw = _required("add", args, "docs")
        if not isinstance(raw, list) or not raw:
            raise InvalidArgument("docs must be a non-empty array of maps", argument="docs")
        docs = []
        for index, doc in enumerate(raw):
            if not isinstance(doc, dict):
                raise InvalidArgument(f"docs[{index}] must be a map", argument="docs", index=index)
            _reject_unknown(f"add docs[{index}]", doc, ("id", "text", "metadata"))
            doc_id, text, metadata = doc.get("id"), doc.get("text"), doc.get("metadata")
            if not isinstance(doc_id, str):
                raise InvalidArgument(
                    f"docs[{index}].id must be a string", argument="docs", index=index
                )
            text = check_text(index, text)
            if metadata is not None and not isinstance(metadata, dict):
                raise InvalidArgument(
                    f"docs[{index}].metadata must be a map", argument="docs", index=index
                )
            docs.append(NewDoc(doc_id, text, metadata))
        return cls(
            collection,
            docs,
            _choice(args, "if_exists", IF_EXISTS_MODES, "replace"),
            _flag(args, "create", True),
            _flag(args, "store_text", True),
            _choice(args, "long_text", LONG_TEXT_MODES, "truncate"),
        )


@dataclass(frozen=True)
class AddVectorsArgs:
    """Vectors the caller computed with the collection's model."""

    collection: str
    ids: list[str]
    vectors: np.ndarray
    texts: list[str | None] | None = None
    metadata: list[dict[str, Any] | None] | None = None
    if_exists: str = "replace"
    create: bool = True

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> AddVectorsArgs:
        _reject_unknown(
            "add_vectors",
            args,
            ("collection", "ids", "vectors", "dims", "texts", "metadata", "if_exists", "create"),
        )
        collection = _string("add_vectors", args, "collection")
        ids = _id_list("add_vectors", args)
        vectors = request_vectors(args, len(ids))
        texts, metadata = args.get("texts"), args.get("metadata")
        if texts is not None and (
            not isinstance(texts, list)
            or len(texts) != len(ids)
            or not all(t is None or isinstance(t, str) for t in texts)
        ):
            raise InvalidArgument("texts must be an array of strings or nils, one per id")
        if metadata is not None and (
            not isinstance(metadata, list)
            or len(metadata) != len(ids)
            or not all(m is None or isinstance(m, dict) for m in metadata)
        ):
            raise InvalidArgument("metadata must be an array of maps or nils, one per id")
        return cls(
            collection,
            ids,
            vectors,
            texts,
            metadata,
            _choice(args, "if_exists", IF_EXISTS_MODES, "replace"),
            _flag(args, "create", True),
        )


@dataclass(frozen=True)
class SearchArgs:
    """``mode``: "dense" (embedding similarity), "keyword" (BM25 over stored texts),
    "hybrid" (both, fused by ``fusion``: "rrf" or "weighted" with ``weight`` for the dense
    part, 0.7 by default), or None: hybrid for a text query on a collection that stores
    texts, else dense. The defaults are measured: docs/index.md "Keyword and hybrid search".
    ``explain``: hits also carry ``dense_score`` and ``keyword_score``."""

    collection: str
    text: str | None = None
    vector: np.ndarray | None = None
    k: int = 10
    filter: dict[str, Any] | None = None
    ef: int | None = None
    instruction: str | None = None
    include_text: bool = True
    mode: str | None = None
    fusion: str = "weighted"
    weight: float | None = None
    explain: bool = False

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> SearchArgs:
        _reject_unknown(
            "search",
            args,
            (
                "collection", "text", "vector", "dims", "k", "filter", "ef", "instruction",
                "include_text", "mode", "fusion", "weight", "explain",
            ),
        )
        collection = _string("search", args, "collection")
        text = args.get("text")
        has_vector = args.get("vector") is not None
        mode = args.get("mode")
        if mode is not None and mode not in SEARCH_MODES:
            raise InvalidArgument(
                f"mode must be one of {SEARCH_MODES}, got {mode!r:.50}", argument="mode"
            )
        if mode in ("keyword", "hybrid"):
            # Words are needed; hybrid may bring its own vector for the dense side.
            if text is None:
                raise InvalidArgument(f'mode "{mode}" needs a query text', argument="text")
            if mode == "keyword" and has_vector:
                raise InvalidArgument('mode "keyword" takes no vector', argument="vector")
        elif (text is None) == (not has_vector):
            raise InvalidArgument("search needs exactly one of text or vector", argument="text")
        vector = None
        if has_vector:
            vector = request_vectors({"vectors": args["vector"], "dims": args.get("dims")}, 1)[0]
        if text is not None:
            check_text(0, text)
        k = _optional_int(args, "k")
        filter_ = args.get("filter")
        if filter_ is not None and not isinstance(filter_, dict):
            raise InvalidArgument("filter must be a map", argument="filter")
        instruction = args.get("instruction")
        if instruction is not None and (not isinstance(instruction, str) or not instruction):
            raise InvalidArgument("instruction must be a non-empty string", argument="instruction")
        weight = args.get("weight")
        if weight is not None and (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not 0.0 <= weight <= 1.0
        ):
            raise InvalidArgument(
                f"weight must be a number in [0, 1], got {weight!r:.50}", argument="weight"
            )
        return cls(
            collection,
            text,
            vector,
            10 if k is None else k,
            filter_ or None,
            _optional_int(args, "ef"),
            instruction,
            _flag(args, "include_text", True),
            mode,
            _choice(args, "fusion", FUSIONS, DEFAULT_FUSION),
            None if weight is None else float(weight),
            _flag(args, "explain", False),
        )


@dataclass(frozen=True)
class GetArgs:
    collection: str
    ids: list[str]
    with_vectors: bool = False

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> GetArgs:
        _reject_unknown("get", args, ("collection", "ids", "with_vectors"))
        ids = _id_list("get", args)
        if len(ids) > MAX_GET_IDS:
            raise InvalidArgument(
                f"{len(ids)} ids in one get; the limit is {MAX_GET_IDS}", limit=MAX_GET_IDS
            )
        return cls(_string("get", args, "collection"), ids, _flag(args, "with_vectors", False))


@dataclass(frozen=True)
class DeleteArgs:
    collection: str
    ids: list[str]

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> DeleteArgs:
        _reject_unknown("delete", args, ("collection", "ids"))
        return cls(_string("delete", args, "collection"), _id_list("delete", args))


@dataclass(frozen=True)
class CountArgs:
    collection: str

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> CountArgs:
        _reject_unknown("count", args, ("collection",))
        return cls(_string("count", args, "collection"))


@dataclass(frozen=True)
class CollectionsArgs:
    action: str = "list"
    name: str | None = None
    dimensions: int | None = None  # create: a Matryoshka size the model supports
    # create: where the documents live (None: the daemon's index.backend setting); for
    # "milvus", the pymilvus URI and a file (on the daemon's host) holding the token.
    backend: str | None = None
    uri: str | None = None
    token_file: str | None = None
    # ids: one page of the collection's ids in sorted order, after ``after``.
    after: str | None = None
    limit: int = 1000

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> CollectionsArgs:
        _reject_unknown(
            "collections",
            args,
            ("action", "name", "dimensions", "backend", "uri", "token_file", "after", "limit"),
        )
        action = _choice(args, "action", COLLECTION_ACTIONS, "list")
        name = None if action == "list" else _string(f"collections {action}", args, "name")
        dimensions = _optional_int(args, "dimensions")
        if dimensions is not None and action != "create":
            raise InvalidArgument("dimensions applies to create only", argument="dimensions")
        backend = None if args.get("backend") is None else _choice(args, "backend", BACKENDS, "")
        uri = None if args.get("uri") is None else _string("collections", args, "uri")
        token_file = (
            None if args.get("token_file") is None else _string("collections", args, "token_file")
        )
        for key, value in (("backend", backend), ("uri", uri), ("token_file", token_file)):
            if value is not None and action != "create":
                raise InvalidArgument(f"{key} applies to create only", argument=key)
        if (uri is not None or token_file is not None) and backend == "local":
            raise InvalidArgument("uri and token_file apply to the milvus backend", argument="uri")
        after = None if args.get("after") is None else _string("collections", args, "after")
        limit = _optional_int(args, "limit")
        if (after is not None or limit is not None) and action != "ids":
            raise InvalidArgument("after and limit apply to ids only", argument="after")
        if limit is not None and not 1 <= limit <= MAX_IDS_PAGE:
            raise InvalidArgument(
                f"limit must be in [1, {MAX_IDS_PAGE}], got {limit}", argument="limit"
            )
        return cls(
            action, name, dimensions, backend, uri, token_file, after,
            1000 if limit is None else limit,
        )  # fmt: skip


@dataclass(frozen=True)
class SearchHit:
    """One search result, decoded: ``score`` is higher for better matches (the cosine in
    dense mode, BM25 in keyword mode, the fused score in hybrid mode); ``dense_score`` and
    ``keyword_score`` are the components, when asked for (``explain``) and known."""

    id: str
    score: float
    metadata: dict[str, Any]
    text: str | None = None
    dense_score: float | None = None
    keyword_score: float | None = None

    @classmethod
    def from_wire(cls, hit: Any) -> SearchHit:
        if (
            not isinstance(hit, dict)
            or not isinstance(hit.get("id"), str)
            or not isinstance(hit.get("score"), (int, float))
            or not isinstance(hit.get("metadata", {}), dict)
        ):
            raise BadResponse(f"malformed search hit: {hit!r:.200}")
        text = hit.get("text")
        components = []
        for name in ("dense_score", "keyword_score"):
            value = hit.get(name)
            if value is not None and not isinstance(value, (int, float)):
                raise BadResponse(f"malformed search hit: {hit!r:.200}")
            components.append(None if value is None else float(value))
        return cls(
            hit["id"], float(hit["score"]), dict(hit.get("metadata") or {}), text, *components
        )


ARGUMENTS: dict[str, Any] = {
    "hello": HelloArgs,
    "auth": AuthArgs,
    "embed": EmbedArgs,
    "health": NoArgs,
    "stats": NoArgs,
    "add": AddArgs,
    "add_vectors": AddVectorsArgs,
    "search": SearchArgs,
    "get": GetArgs,
    "delete": DeleteArgs,
    "count": CountArgs,
    "collections": CollectionsArgs,
}


def bind_args(method: str, params: Any, known: Mapping[str, Any] = ARGUMENTS) -> Any:
    """The typed arguments of ``method``; UnknownMethod, BadRequest or InvalidArgument."""
    spec = known.get(method)
    if spec is None:
        raise UnknownMethod(f"no method {method!r:.80}", method=method[:80])
    return spec.from_args(named_args(params))


# -- vectors --------------------------------------------------------------------------------------


def encode_vectors(vectors: np.ndarray) -> dict[str, Any]:
    """Row-major little-endian float32 bytes: 4 bytes a number instead of msgpack's 5 for a
    float32 or 9 for a float64, and one memcpy to decode."""
    array = np.ascontiguousarray(vectors, dtype="<f4")
    if array.ndim != 2:
        raise InvalidArgument(f"vectors must be 2-D, got shape {array.shape}")
    count, dims = array.shape
    return {"vectors": array.tobytes(), "dims": int(dims), "count": int(count)}


def decode_vectors(data: Any, dims: Any, count: Any) -> np.ndarray:
    if not isinstance(data, bytes) or not _is_int(dims) or not _is_int(count):
        raise BadResponse("vectors must be bin with integer dims and count")
    if dims < 0 or count < 0 or len(data) != dims * count * 4:
        raise BadResponse(f"vectors hold {len(data)} bytes, not {count} x {dims} float32")
    # Copy: frombuffer on bytes is read-only, and callers expect an ordinary array.
    return np.frombuffer(data, dtype="<f4").reshape(count, dims).astype(np.float32)


@dataclass(frozen=True)
class EmbedResult:
    """What ``embed`` returns, decoded: float32 (count, dims) unit vectors in input order."""

    vectors: np.ndarray
    dims: int
    count: int
    token_counts: list[int]
    truncated: list[bool]
    chunks: list[int]
    model: str
    quant: str
    extra: dict[str, Any] = field(default_factory=dict)  # fields from a newer server

    @classmethod
    def from_wire(cls, result: Any) -> EmbedResult:
        if not isinstance(result, dict):
            raise BadResponse("embed result is not a map")
        try:
            vectors = decode_vectors(result["vectors"], result["dims"], result["count"])
            count = result["count"]
            lists = {name: result[name] for name in ("token_counts", "truncated", "chunks")}
            model, quant = result["model"], result["quant"]
        except KeyError as exc:
            raise BadResponse(f"embed result lacks {exc.args[0]!r}") from None
        for name, value in lists.items():
            if not isinstance(value, list) or len(value) != count:
                raise BadResponse(f"embed result {name} is not a list of {count}")
        if not isinstance(model, str) or not isinstance(quant, str):
            raise BadResponse("embed result model and quant must be strings")
        known = {
            "vectors", "dims", "count", "token_counts", "truncated", "chunks", "model", "quant",
        }
        return cls(
            vectors=vectors,
            dims=result["dims"],
            count=count,
            token_counts=lists["token_counts"],
            truncated=lists["truncated"],
            chunks=lists["chunks"],
            model=model,
            quant=quant,
            extra={k: v for k, v in result.items() if k not in known},
        )


def encode_embed_result(
    vectors: np.ndarray,
    token_counts: Sequence[int],
    truncated: Sequence[bool],
    chunks: Sequence[int],
    model: str,
    quant: str,
) -> dict[str, Any]:
    result = encode_vectors(vectors)
    result.update(
        token_counts=[int(n) for n in token_counts],
        truncated=[bool(t) for t in truncated],
        chunks=[int(n) for n in chunks],
        model=model,
        quant=quant,
    )
    return result
