"""One error root for the whole package, each error with a stable integer code.

Codes are part of the wire protocol (docs/protocol.md): never renumber, only add. They are
grouped by what the caller can do about them: fix the request (1xx), fix the setup (2xx),
retry later (3xx), the protocol itself (4xx; 45x are raised locally by clients and the daemon
and never sent), report a bug (5xx), the local index (6xx), LAN discovery (7xx). One code
space (``ErrorCode``; ``edge_agent.protocol.ProtocolCode`` is another name for it), one
exception class per code, and every class is exported from ``edge_agent``.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "DimensionsNotSupported",
    "DownloadError",
    "EdgeAgentError",
    "EmptyText",
    "EngineError",
    "ErrorCode",
    "InsecureListen",
    "InsufficientMemory",
    "IntegrityError",
    "InvalidArgument",
    "ModelFileError",
    "ModelNotFound",
    "NoUsableModel",
    "ProfileError",
    "TextTooLong",
    "UnsupportedPlatform",
    "error_for_code",
]


class ErrorCode(IntEnum):
    # The request is wrong: the caller must change it.
    INVALID_ARGUMENT = 100
    EMPTY_TEXT = 101
    TEXT_TOO_LONG = 102
    DIMENSIONS_NOT_SUPPORTED = 103
    # The setup is wrong: an operator must act.
    MODEL_NOT_FOUND = 200
    MODEL_FILE_ERROR = 201
    INTEGRITY_ERROR = 202
    DOWNLOAD_ERROR = 203
    UNSUPPORTED_PLATFORM = 204
    PROFILE_ERROR = 205
    INSUFFICIENT_MEMORY = 206
    NO_USABLE_MODEL = 207
    INSECURE_LISTEN = 208  # TCP on a non-loopback address without an auth token
    CONFIG_ERROR = 209  # a setting (file, environment or flag) is unknown or out of range
    # Transient: retrying may work.
    ENGINE_ERROR = 300
    BACKEND_UNAVAILABLE = 301  # a collection's remote store (Milvus) cannot be reached now
    # The protocol (edge_agent.protocol). Sent on the wire:
    BAD_REQUEST = 400  # valid msgpack but not a valid request (shape, params convention)
    UNKNOWN_METHOD = 401
    MESSAGE_TOO_LARGE = 402  # fatal: the connection is closed
    OVERLOADED = 403  # retry later: the queue or the connection table is full
    SHUTTING_DOWN = 404  # retry later, against the next daemon
    MALFORMED_FRAME = 405  # fatal: the bytes are not msgpack; the connection is closed
    AUTH_REQUIRED = 406  # TCP: call auth first (only hello and auth work before it)
    AUTH_FAILED = 407  # fatal: wrong token; the connection is closed
    # Raised locally by clients and the daemon; never sent on the wire.
    CONNECTION_FAILED = 450
    TIMEOUT = 451
    BAD_RESPONSE = 452  # the server's reply does not follow this protocol
    ALREADY_RUNNING = 453  # another daemon is listening on the socket
    # A bug on our side.
    INTERNAL = 500
    # The local index (edge_agent/index): collections on disk.
    COLLECTION_NOT_FOUND = 600
    MODEL_MISMATCH = 601
    INDEX_CORRUPT = 602
    COLLECTION_EXISTS = 603
    INDEX_BUSY = 604
    INDEX_FULL = 605
    DOCUMENT_EXISTS = 606
    # LAN discovery and fleet search (edge_agent.lan.discovery, edge_agent.lan.fleet): raised
    # locally by the daemon at start or by clients, never sent on the wire.
    DISCOVERY_ERROR = 700
    AGENT_NOT_FOUND = 701


class EdgeAgentError(Exception):
    """Base of every error edge-agent raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return f"[{self.code.name}] {self.message}"


class InvalidArgument(EdgeAgentError, ValueError):
    code = ErrorCode.INVALID_ARGUMENT


class EmptyText(InvalidArgument):
    code = ErrorCode.EMPTY_TEXT


class TextTooLong(InvalidArgument):
    code = ErrorCode.TEXT_TOO_LONG


class DimensionsNotSupported(InvalidArgument):
    code = ErrorCode.DIMENSIONS_NOT_SUPPORTED


class ModelNotFound(EdgeAgentError, LookupError):
    code = ErrorCode.MODEL_NOT_FOUND


class ModelFileError(EdgeAgentError):
    """A model file is missing, unreadable, or not a usable GGUF."""

    code = ErrorCode.MODEL_FILE_ERROR


class IntegrityError(ModelFileError):
    """A file's bytes do not match the sha256 recorded for it."""

    code = ErrorCode.INTEGRITY_ERROR


class DownloadError(EdgeAgentError):
    code = ErrorCode.DOWNLOAD_ERROR


class UnsupportedPlatform(EdgeAgentError):
    """The hardware probe does not know this operating system (Windows, BSD, ...)."""

    code = ErrorCode.UNSUPPORTED_PLATFORM


class ProfileError(EdgeAgentError, ValueError):
    """A hardware profile file is malformed, or a named profile does not exist."""

    code = ErrorCode.PROFILE_ERROR


class InsufficientMemory(ModelFileError):
    """No candidate model file fits the memory budget; the message says how much is needed."""

    code = ErrorCode.INSUFFICIENT_MEMORY


class NoUsableModel(ModelFileError):
    """Every candidate file was rejected or failed its self-test: refuse to start."""

    code = ErrorCode.NO_USABLE_MODEL


class InsecureListen(EdgeAgentError):
    """Serving TCP beyond loopback with no auth token: anyone on the LAN could use the daemon."""

    code = ErrorCode.INSECURE_LISTEN


class ConfigError(EdgeAgentError, ValueError):
    """A setting is unknown, malformed or out of range; the message names the key, where the
    value came from (flag, environment variable, config file) and what is allowed."""

    code = ErrorCode.CONFIG_ERROR


class EngineError(EdgeAgentError, RuntimeError):
    """llama.cpp refused an operation (e.g. a decode failed)."""

    code = ErrorCode.ENGINE_ERROR


class EngineUnresponsive(EngineError):
    """The engine child gave no answer by its call's deadline (stopped, hung, swapped out)
    and was killed. Internal to the daemon, not exported: on the wire it is ENGINE_ERROR like
    ``EngineError``. The daemon retries such a call once on the fresh child, since the stall
    is rarely the input's fault."""


class BackendUnavailable(EdgeAgentError, ConnectionError):
    """The store a collection lives in (a Milvus server) is unreachable, too slow or
    restarting. Only that collection is affected; ``retry_after_ms`` in the data says when
    the daemon tries it again (it reconnects by itself)."""

    code = ErrorCode.BACKEND_UNAVAILABLE


_BY_CODE: dict[int, type[EdgeAgentError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        EmptyText,
        TextTooLong,
        DimensionsNotSupported,
        ModelNotFound,
        ModelFileError,
        IntegrityError,
        DownloadError,
        UnsupportedPlatform,
        ProfileError,
        InsufficientMemory,
        NoUsableModel,
        InsecureListen,
        ConfigError,
        EngineError,
        BackendUnavailable,
        EdgeAgentError,
    )
}


def error_for_code(code: int) -> type[EdgeAgentError]:
    """The exception class for any error code (the root class for unknown codes)."""
    return _BY_CODE.get(code, EdgeAgentError)


# -- the protocol (4xx) -------------------------------------------------------------------------


class ProtocolError(EdgeAgentError):
    code = ErrorCode.BAD_REQUEST


class BadRequest(ProtocolError, ValueError):
    code = ErrorCode.BAD_REQUEST


class UnknownMethod(ProtocolError, LookupError):
    code = ErrorCode.UNKNOWN_METHOD


class MessageTooLarge(ProtocolError):
    code = ErrorCode.MESSAGE_TOO_LARGE


class Overloaded(ProtocolError):
    code = ErrorCode.OVERLOADED


class ShuttingDown(ProtocolError):
    code = ErrorCode.SHUTTING_DOWN


class MalformedFrame(ProtocolError):
    code = ErrorCode.MALFORMED_FRAME


class AuthRequired(ProtocolError, PermissionError):
    code = ErrorCode.AUTH_REQUIRED


class AuthFailed(ProtocolError, PermissionError):
    code = ErrorCode.AUTH_FAILED


class ConnectionFailed(ProtocolError, ConnectionError):
    code = ErrorCode.CONNECTION_FAILED


class RequestTimeout(ProtocolError, TimeoutError):
    code = ErrorCode.TIMEOUT


class BadResponse(ProtocolError):
    code = ErrorCode.BAD_RESPONSE


class AlreadyRunning(ProtocolError):
    code = ErrorCode.ALREADY_RUNNING


_PROTOCOL_ERRORS: tuple[type[EdgeAgentError], ...] = (
    BadRequest,
    UnknownMethod,
    MessageTooLarge,
    Overloaded,
    ShuttingDown,
    MalformedFrame,
    AuthRequired,
    AuthFailed,
    ConnectionFailed,
    RequestTimeout,
    BadResponse,
    AlreadyRunning,
)
_BY_CODE.update({cls.code: cls for cls in _PROTOCOL_ERRORS})
__all__ += [
    "AlreadyRunning",
    "AuthFailed",
    "AuthRequired",
    "BadRequest",
    "BadResponse",
    "ConnectionFailed",
    "MalformedFrame",
    "MessageTooLarge",
    "Overloaded",
    "ProtocolError",
    "RequestTimeout",
    "ShuttingDown",
    "UnknownMethod",
]


# -- the local index (6xx) ----------------------------------------------------------------------


class CollectionNotFound(EdgeAgentError, LookupError):
    code = ErrorCode.COLLECTION_NOT_FOUND


class ModelMismatch(EdgeAgentError):
    """A vector comes from another model than the one the collection is pinned to: reindex."""

    code = ErrorCode.MODEL_MISMATCH


class IndexCorrupt(EdgeAgentError):
    """A collection's files fail validation; `edge-agent index check|repair` says what to do."""

    code = ErrorCode.INDEX_CORRUPT


class CollectionExists(EdgeAgentError):
    code = ErrorCode.COLLECTION_EXISTS


class IndexBusy(EdgeAgentError):
    """Another process (or another open handle) holds the collection's lock."""

    code = ErrorCode.INDEX_BUSY


class IndexFull(EdgeAgentError):
    """A collection limit (max vectors) or the disk under it is full."""

    code = ErrorCode.INDEX_FULL


class DocumentExists(EdgeAgentError):
    """``add`` of an id that is already stored (``upsert`` replaces instead)."""

    code = ErrorCode.DOCUMENT_EXISTS


_INDEX_ERRORS: tuple[type[EdgeAgentError], ...] = (
    CollectionNotFound,
    ModelMismatch,
    IndexCorrupt,
    CollectionExists,
    IndexBusy,
    IndexFull,
    DocumentExists,
)
_BY_CODE.update({cls.code: cls for cls in _INDEX_ERRORS})
# A literal list, so static tools see the names.
__all__ += [
    "CollectionExists",
    "CollectionNotFound",
    "DocumentExists",
    "IndexBusy",
    "IndexCorrupt",
    "IndexFull",
    "ModelMismatch",
]


# -- discovery (7xx) ----------------------------------------------------------------------------


class DiscoveryError(EdgeAgentError):
    """mDNS cannot run as asked: advertise without TCP, an unknown interface, no usable socket."""

    code = ErrorCode.DISCOVERY_ERROR


class AgentNotFound(EdgeAgentError, LookupError):
    """No discovered agent has that id or name (or a prefix matches several)."""

    code = ErrorCode.AGENT_NOT_FOUND


_BY_CODE.update({cls.code: cls for cls in (DiscoveryError, AgentNotFound)})
__all__ += ["AgentNotFound", "DiscoveryError"]
