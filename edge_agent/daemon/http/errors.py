"""Errors over HTTP: one JSON shape for every endpoint, with the wire protocol's stable codes.

The shape is OpenAI's (``{"error": {"message", "type", "param", "code"}}``) so its clients
raise their usual exception classes, extended with ``number`` (the integer of
``edge_agent.errors.ErrorCode``, as the MessagePack protocol sends it) and ``data`` (the
error's structured fields). ``code`` is the code's stable name (``"COLLECTION_NOT_FOUND"``).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from ...errors import EdgeAgentError, ErrorCode

__all__ = ["RETRY_AFTER_S", "HttpError", "error_response", "status_for"]

RETRY_AFTER_S = 1  # the Retry-After of 429 (OVERLOADED) and of 503 while shutting down

_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.EMPTY_TEXT: 400,
    ErrorCode.TEXT_TOO_LONG: 400,
    ErrorCode.DIMENSIONS_NOT_SUPPORTED: 400,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.UNKNOWN_METHOD: 404,
    ErrorCode.COLLECTION_NOT_FOUND: 404,
    ErrorCode.AUTH_REQUIRED: 401,
    ErrorCode.AUTH_FAILED: 401,
    ErrorCode.COLLECTION_EXISTS: 409,
    ErrorCode.DOCUMENT_EXISTS: 409,
    ErrorCode.MODEL_MISMATCH: 409,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.INDEX_BUSY: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.ENGINE_ERROR: 503,
    ErrorCode.INSUFFICIENT_MEMORY: 503,
    ErrorCode.INDEX_CORRUPT: 503,
    ErrorCode.INDEX_FULL: 507,
}

_RETRYABLE = frozenset({ErrorCode.OVERLOADED, ErrorCode.SHUTTING_DOWN, ErrorCode.INDEX_BUSY})


def status_for(code: ErrorCode) -> int:
    """The HTTP status of a wire code: 4xx the caller must fix, 5xx the server's side."""
    return _STATUS.get(code, 500)


def _type_for(status: int) -> str:
    # OpenAI's error types: its clients pick their exception class from the status.
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class HttpError(EdgeAgentError):
    """An HTTP-level refusal with a wire code and an explicit status (415, 405, 408...)."""

    def __init__(self, status: int, code: ErrorCode, message: str, **data: Any) -> None:
        super().__init__(message, **data)
        self.code = code
        self.status = status


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def error_response(exc: EdgeAgentError, *, close: bool = False) -> Response:
    """The JSON error for ``exc``; ``close`` adds ``Connection: close`` (a request whose body
    was not read must not leave its bytes on a kept-alive connection)."""
    status = exc.status if isinstance(exc, HttpError) else status_for(exc.code)
    data = _json_safe(exc.data)
    param = data.get("argument") if isinstance(data.get("argument"), str) else None
    body = {
        "error": {
            "message": exc.message,
            "type": _type_for(status),
            "param": param,
            "code": exc.code.name,
            "number": int(exc.code),
            "data": data,
        }
    }
    headers = {}
    if exc.code in _RETRYABLE:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if close:
        headers["Connection"] = "close"
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )
