"""One error root for the whole package, each error with a stable integer code.

Codes are part of the wire protocol (docs/protocol.md): never renumber, only add. They are
grouped by what the caller can do about them: fix the request (1xx), fix the setup (2xx),
retry later (3xx), or report a bug (5xx). Protocol-level codes (4xx) live in
edge_agent/protocol.py (``ProtocolCode``); 45x are client-side only and never on the wire.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

__all__ = [
    "DimensionsNotSupported",
    "DownloadError",
    "EdgeAgentError",
    "EmptyText",
    "EngineError",
    "ErrorCode",
    "IntegrityError",
    "InvalidArgument",
    "ModelFileError",
    "ModelNotFound",
    "TextTooLong",
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
    # Transient: retrying may work.
    ENGINE_ERROR = 300
    # A bug on our side.
    INTERNAL = 500


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


class EngineError(EdgeAgentError, RuntimeError):
    """llama.cpp refused an operation (e.g. a decode failed)."""

    code = ErrorCode.ENGINE_ERROR


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
        EngineError,
        EdgeAgentError,
    )
}


def error_for_code(code: int) -> type[EdgeAgentError]:
    """The exception class for a wire error code (the root class for unknown codes)."""
    return _BY_CODE.get(code, EdgeAgentError)
