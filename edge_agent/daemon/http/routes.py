"""The ASGI application: OpenAI's embeddings, the REST API over collections, the search page.

Every endpoint calls the same wire methods as the MessagePack socket through
``Service.submit`` (embed, search, add, add_vectors, get, delete, collections), so arguments
are checked by the same code, errors carry the same stable codes, and requests share the
batcher, the queue limit (OVERLOADED -> 429) and the per-method stats. This module only moves JSON.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import importlib.resources
import logging
import time
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ...errors import EdgeAgentError, ErrorCode, InvalidArgument, ModelNotFound
from ...logs import kv
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..metrics import render_metrics
from ..service import Service
from . import limits
from .errors import HttpError, error_response
from .openai import embed_params, embeddings_response, models_list
from .openapi import openapi_document

__all__ = ["HttpSettings", "build_app"]

log = logging.getLogger("edge_agent.http")

# The search page and its assets: public (they hold no data), everything else needs the token.
_PAGE_FILES = {
    "/": ("page.html", "text/html; charset=utf-8"),
    "/ui/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/ui/page.css": ("page.css", "text/css; charset=utf-8"),
}
# The page runs only its own script: even a bug in its escaping could not run injected code.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class HttpSettings:
    """What the app needs besides the Service: every HTTP limit in one place."""

    def __init__(
        self,
        *,
        token: str | None,
        max_body_bytes: int,
        metrics: bool,
        version: str,
    ) -> None:
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.version = version


def _dumps(value: Any) -> bytes:
    # orjson: a float32 vector is written straight from its array, with float32's shortest
    # digits; the standard library takes ~5x as long for the 384 floats of one MiniLM vector.
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=_default)


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_response(value: Any, status: int = 200) -> Response:
    return Response(_dumps(value), status_code=status, media_type="application/json")


async def read_json(request: Request, settings: HttpSettings) -> Any:
    """The JSON body, read under the body limit and deadline (413 / 408 / 415 / 400).

    A declared Content-Length over the limit is refused before a byte of the body is read; a
    chunked body is counted as it streams and refused as soon as it passes the limit."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise HttpError(
            415,
            ErrorCode.BAD_REQUEST,
            "send the body as JSON with Content-Type: application/json"
            f" (got {media or 'none'!r:.60})",
        )
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HttpError(
                400, ErrorCode.BAD_REQUEST, "Content-Length is not a number", close=True
            )
        if int(declared) > limit:
            raise HttpError(
                413,
                ErrorCode.MESSAGE_TOO_LARGE,
                f"the body has {int(declared)} bytes; the limit is {limit}",
                limit=limit,
                close=True,
            )
    chunks: list[bytes] = []
    size = 0
    timeout = limits.BODY_TIMEOUT_S
    deadline = time.monotonic() + timeout
    stream = request.stream().__aiter__()
    while True:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                chunk = await stream.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise HttpError(
                408,
                ErrorCode.BAD_REQUEST,
                f"the body did not arrive within {timeout:g} s",
                limit_s=timeout,
                close=True,
            ) from None
        size += len(chunk)
        if size > limit:
            raise HttpError(
                413,
                ErrorCode.MESSAGE_TOO_LARGE,
                f"the body passed {limit} bytes, the limit",
                limit=limit,
                close=True,
            )
        if chunk:
            chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, ErrorCode.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def _without(body: dict[str, Any], *names: str) -> dict[str, Any]:
    for name in names:
        if name in body:
            raise InvalidArgument(f"{name} comes from the URL path, not the body", argument=name)
    return dict(body)


def _vector_bytes(value: Any, name: str) -> tuple[bytes, int]:
    """A JSON array of numbers as the wire's little-endian float32 bytes and its size."""
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
    ):
        raise InvalidArgument(f"{name} must be a non-empty array of numbers", argument=name)
    return np.asarray(value, dtype="<f4").tobytes(), len(value)


_F32_MAX = float(np.finfo(np.float32).max)


def _vector_rows(value: Any) -> tuple[bytes, int]:
    """``vectors`` for add_vectors: an array with one entry per id, each either an array of
    numbers or the base64 of little-endian float32 (what ``/v1/embeddings`` gives with
    ``encoding_format: base64``), all of one size; as the wire's bytes and ``dims``. Values
    beyond float32's range are refused here (they would become infinity)."""
    if not isinstance(value, list) or not value:
        raise InvalidArgument(
            "vectors must be a non-empty array: one array of numbers or one base64 string"
            " (little-endian float32) per id",
            argument="vectors",
        )
    rows: list[bytes] = []
    for i, row in enumerate(value):
        if isinstance(row, str):
            try:
                data = base64.b64decode(row, validate=True)
            except ValueError:
                raise InvalidArgument(
                    f"vectors[{i}] is not valid base64", argument="vectors"
                ) from None
            if not data or len(data) % 4:
                raise InvalidArgument(
                    f"vectors[{i}] decodes to {len(data)} bytes, not whole float32 values",
                    argument="vectors",
                )
            rows.append(data)
            continue
        if (
            not isinstance(row, list)
            or not row
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in row)
        ):
            raise InvalidArgument(
                f"vectors[{i}] must be a non-empty array of numbers or a base64 string",
                argument="vectors",
            )
        wide = np.asarray(row, dtype=np.float64)
        if not (np.abs(wide) <= _F32_MAX).all():
            raise InvalidArgument(
                f"vectors[{i}] holds a value beyond float32's range", argument="vectors"
            )
        rows.append(wide.astype("<f4").tobytes())
    if len({len(r) for r in rows}) != 1:
        raise InvalidArgument(
            "vectors differ in size: give every one the same number of values",
            argument="vectors",
        )
    return b"".join(rows), len(rows[0]) // 4


def _flag(value: str | None, name: str) -> bool:
    if value is None or value in ("", "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise InvalidArgument(f"{name} must be true or false, got {value!r:.40}", argument=name)


def build_app(service: Service, settings: HttpSettings) -> ASGIApp:
    """The ASGI app for ``service``; wrapped so the token is checked before any routing."""

    async def call(method: str, args: dict[str, Any]) -> Any:
        return await service.submit(method, [args])

    def served_model() -> str:
        return service.embedder.model_name

    async def embeddings(request: Request) -> Response:
        params, encoding = embed_params(await read_json(request, settings), served_model())
        try:
            result = await call("embed", params)
        except InvalidArgument as exc:
            # Same check, OpenAI's names: input[i] rather than the wire's texts[i].
            exc.message = exc.message.replace("texts[", "input[").replace("texts ", "input ")
            argument = exc.data.get("argument")
            if argument == "texts" or (argument is None and "index" in exc.data):
                exc.data["argument"] = "input"
            raise
        return json_response(embeddings_response(result, encoding))

    def model_entries() -> list[dict[str, Any]]:
        embedder = service.embedder
        sizes = sorted(set(embedder.manifest.matryoshka_dims) | {embedder.dims})
        listed: list[dict[str, Any]] = models_list(embedder.model_name, embedder.dims, sizes)[
            "data"
        ]
        return listed

    async def models(_request: Request) -> Response:
        return json_response({"object": "list", "data": model_entries()})

    async def model(request: Request) -> Response:
        name = request.path_params["model"]
        found = [m for m in model_entries() if m["id"] == name]
        if not found:
            raise ModelNotFound(
                f"the model {name!r:.100} does not exist here; this daemon serves"
                f" {served_model()!r}",
                argument="model",
            )
        return json_response(found[0])

    async def health(_request: Request) -> Response:
        report, _stats = await service.report()
        return json_response(report, 200 if report.get("status") == "ok" else 503)

    async def metrics(_request: Request) -> Response:
        if not settings.metrics:
            raise HttpError(
                404,
                ErrorCode.BAD_REQUEST,
                "metrics are off: set metrics_listen (--metrics-listen) to turn them on",
            )
        report, stats = await service.report()
        body = render_metrics(report, stats, settings.version).encode("utf-8")
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    async def openapi(_request: Request) -> Response:
        return json_response(openapi_document(settings.version, served_model()))

    async def collections(request: Request) -> Response:
        if request.method == "GET":
            return json_response(await call("collections", {"action": "list"}))
        body = _object(await read_json(request, settings))
        for name in body:
            if name not in ("name", "dimensions"):
                raise InvalidArgument(
                    f"create takes no field {name!r:.60} (known: name, dimensions)",
                    argument=str(name)[:60],
                )
        args = {"action": "create", "name": body.get("name")}
        if body.get("dimensions") is not None:
            args["dimensions"] = body["dimensions"]
        return json_response(await call("collections", args), 201)

    async def collection(request: Request) -> Response:
        name = request.path_params["name"]
        action = "drop" if request.method == "DELETE" else "info"
        return json_response(await call("collections", {"action": action, "name": name}))

    async def documents(request: Request) -> Response:
        name = request.path_params["name"]
        if request.method == "POST":
            body = _without(_object(await read_json(request, settings)), "collection", "docs")
            args = {"collection": name, "docs": body.pop("documents", None), **body}
            return json_response(await call("add", args))
        ids = request.query_params.getlist("id")
        if not ids:
            raise InvalidArgument("give the documents as ?id=...&id=...", argument="id")
        if request.method == "DELETE":
            return json_response(await call("delete", {"collection": name, "ids": ids}))
        with_vectors = _flag(request.query_params.get("with_vectors"), "with_vectors")
        result = await call("get", {"collection": name, "ids": ids, "with_vectors": with_vectors})
        return json_response(_vectors_inline(result))

    async def delete_documents(request: Request) -> Response:
        body = _without(_object(await read_json(request, settings)), "collection")
        return json_response(
            await call("delete", {"collection": request.path_params["name"], **body})
        )

    async def vectors(request: Request) -> Response:
        # The socket's add_vectors with the vectors as JSON: same checks, limits and errors.
        body = _without(_object(await read_json(request, settings)), "collection", "dims")
        args = {"collection": request.path_params["name"], **body}
        args["vectors"], args["dims"] = _vector_rows(body.get("vectors"))
        return json_response(await call("add_vectors", args))

    async def search(request: Request) -> Response:
        body = _without(_object(await read_json(request, settings)), "collection", "dims")
        args = {"collection": request.path_params["name"], **body}
        if body.get("vector") is not None:
            args["vector"], args["dims"] = _vector_bytes(body["vector"], "vector")
        return json_response(await call("search", args))

    async def page(request: Request) -> Response:
        filename, media = _PAGE_FILES[request.url.path]
        data = importlib.resources.files(__package__).joinpath(filename).read_bytes()
        return Response(data, media_type=media, headers=_PAGE_HEADERS)

    routes = [
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/collections", collections, methods=["GET", "POST"]),
        Route("/v1/collections/{name}", collection, methods=["GET", "DELETE"]),
        Route("/v1/collections/{name}/documents", documents, methods=["GET", "POST", "DELETE"]),
        Route("/v1/collections/{name}/documents/delete", delete_documents, methods=["POST"]),
        Route("/v1/collections/{name}/search", search, methods=["POST"]),
        Route("/v1/collections/{name}/vectors", vectors, methods=["POST"]),
        *(Route(path, page, methods=["GET"]) for path in _PAGE_FILES),
    ]

    async def on_edge_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EdgeAgentError)
        return error_response(exc, close=bool(exc.data.pop("close", False)))

    async def on_http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            error = HttpError(405, ErrorCode.BAD_REQUEST, f"method not allowed here ({exc.detail})")
        else:
            error = HttpError(
                exc.status_code,
                ErrorCode.BAD_REQUEST if exc.status_code != 404 else ErrorCode.UNKNOWN_METHOD,
                "no such endpoint (see /openapi.json)" if exc.status_code == 404 else exc.detail,
            )
        return error_response(error)

    async def on_bug(_request: Request, exc: Exception) -> Response:
        log.error("%s", kv(event="http_internal_error", error=type(exc).__name__), exc_info=exc)
        return error_response(EdgeAgentError(f"internal error: {type(exc).__name__}"))

    app = Starlette(
        routes=routes,
        exception_handlers={
            EdgeAgentError: on_edge_error,
            HTTPException: on_http_error,
            Exception: on_bug,
        },
    )
    return _Guard(app, settings.token)


def _vectors_inline(result: dict[str, Any]) -> dict[str, Any]:
    """``get`` with vectors: the wire's float32 bytes as one JSON array on each found document."""
    raw = result.pop("vectors", None)
    if raw is None:
        return result
    dims = int(result.pop("dims"))
    result.pop("count", None)
    rows = np.frombuffer(raw, dtype="<f4").reshape(-1, dims).tolist() if dims else []
    found = iter(rows)
    for doc in result["documents"]:
        if doc is not None:
            doc["vector"] = next(found)
    return result


def _head_bytes(scope: Scope) -> int:
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    return size + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


def _big_body(scope: Scope) -> bool:
    """Whether the request's body is chunked or declared over MAX_UNAUTHENTICATED_BODY."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return not value.isdigit() or int(value) > limits.MAX_UNAUTHENTICATED_BODY
    return False


class _Guard:
    """Checks ``Authorization: Bearer <token>`` (constant time) before anything else runs.

    Only the search page's static files are public: they hold no data, and the page asks for
    the token when the API answers 401."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _head_bytes(scope) > limits.MAX_HEAD_BYTES:
            # h11 bounds a head that arrives in pieces; one that arrives whole is counted here.
            too_big = HttpError(
                431,
                ErrorCode.BAD_REQUEST,
                f"the request head has over {limits.MAX_HEAD_BYTES} bytes",
                limit=limits.MAX_HEAD_BYTES,
            )
            await error_response(too_big, close=True)(scope, receive, send)
            return
        if (
            self.token is None
            or scope["type"] != "http"
            or (scope["method"] in ("GET", "HEAD") and scope["path"] in _PAGE_FILES)
        ):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        scheme, _, presented = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), self.token):
            await self.app(scope, receive, send)
            return
        code = ErrorCode.AUTH_FAILED if given else ErrorCode.AUTH_REQUIRED
        message = "wrong token" if given else "this listener needs Authorization: Bearer <token>"
        response = error_response(HttpError(401, code, message), close=_big_body(scope))
        response.headers["WWW-Authenticate"] = 'Bearer realm="edge-agent"'
        await response(scope, receive, send)
