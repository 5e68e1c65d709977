"""The OpenAPI 3.1 description served at ``/openapi.json``.

Kept by hand next to the routes (tests/test_http.py checks that every route is described and
every described path answers): the framework's generator would need YAML docstrings and a
YAML parser for less precise schemas.
"""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"description": description}
    if schema is not None:
        body["content"] = {"application/json": {"schema": schema}}
    return body


_ERRORS = {
    "400": {
        "description": "invalid request (INVALID_ARGUMENT, BAD_REQUEST...)",
        "content": {"application/json": {"schema": _ref("Error")}},
    },
    "401": {
        "description": "missing or wrong bearer token",
        "content": {"application/json": {"schema": _ref("Error")}},
    },
    "413": {"description": "body over the limit (MESSAGE_TOO_LARGE)"},
    "429": {"description": "queue full (OVERLOADED); see Retry-After"},
    "503": {"description": "shutting down or the engine failed; see Retry-After"},
}

_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_IDS = {
    "name": "id",
    "in": "query",
    "required": True,
    "schema": {"type": "array", "items": {"type": "string"}},
    "style": "form",
    "explode": True,
}


def openapi_document(version: str, model: str) -> dict[str, Any]:
    string_list = {"type": "array", "items": {"type": "string"}, "minItems": 1}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code", "number"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": "string", "description": "stable ErrorCode name"},
                        "number": {"type": "integer", "description": "ErrorCode number"},
                        "data": {"type": "object"},
                    },
                }
            },
        },
        "EmbeddingsRequest": {
            "type": "object",
            "required": ["input", "model"],
            "additionalProperties": False,
            "properties": {
                "input": {"oneOf": [{"type": "string"}, string_list]},
                "model": {"type": "string", "example": model},
                "encoding_format": {"enum": ["float", "base64"], "default": "float"},
                "dimensions": {"type": "integer"},
                "user": {"type": "string"},
                "kind": {"enum": ["query", "document"], "default": "document"},
                "instruction": {"type": "string"},
                "long_text": {"enum": ["truncate", "error", "chunk"], "default": "truncate"},
            },
        },
        "EmbeddingsResponse": {
            "type": "object",
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "object": {"const": "embedding"},
                            "index": {"type": "integer"},
                            "embedding": {
                                "oneOf": [
                                    {"type": "array", "items": {"type": "number"}},
                                    {"type": "string", "description": "base64 LE float32"},
                                ]
                            },
                        },
                    },
                },
                "model": {"type": "string"},
                "usage": {
                    "type": "object",
                    "properties": {
                        "prompt_tokens": {"type": "integer"},
                        "total_tokens": {"type": "integer"},
                    },
                },
            },
        },
        "Document": {
            "type": "object",
            "required": ["id", "text"],
            "properties": {
                "id": {"type": "string"},
                "text": {"type": "string"},
                "metadata": {"type": "object"},
            },
        },
        "AddRequest": {
            "type": "object",
            "required": ["documents"],
            "properties": {
                "documents": {"type": "array", "items": _ref("Document"), "minItems": 1},
                "if_exists": {"enum": ["replace", "error"], "default": "replace"},
                "create": {"type": "boolean", "default": True},
                "store_text": {"type": "boolean", "default": True},
                "long_text": {"enum": ["truncate", "error", "chunk"], "default": "truncate"},
            },
        },
        "AddVectorsRequest": {
            "type": "object",
            "required": ["ids", "vectors"],
            "properties": {
                "ids": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "vectors": {
                    "type": "array",
                    "description": "one per id, all of one size; values within float32's range",
                    "items": {
                        "oneOf": [
                            {"type": "array", "items": {"type": "number"}, "minItems": 1},
                            {"type": "string", "description": "base64 LE float32"},
                        ]
                    },
                },
                "texts": {"type": "array", "items": {"type": ["string", "null"]}},
                "metadata": {"type": "array", "items": {"type": ["object", "null"]}},
                "if_exists": {"enum": ["replace", "error"], "default": "replace"},
                "create": {"type": "boolean", "default": True},
            },
        },
        "SearchRequest": {
            "type": "object",
            "properties": {
                "text": {"type": "string"},
                "vector": {"type": "array", "items": {"type": "number"}},
                "k": {"type": "integer", "default": 10},
                "filter": {"type": "object", "description": "docs/index.md, Filters"},
                "mode": {"enum": ["dense", "keyword", "hybrid"]},
                "fusion": {"enum": ["weighted", "rrf"]},
                "weight": {"type": "number", "minimum": 0, "maximum": 1},
                "explain": {"type": "boolean", "default": False},
                "include_text": {"type": "boolean", "default": True},
                "instruction": {"type": "string"},
                "ef": {"type": "integer"},
            },
        },
        "SearchResponse": {
            "type": "object",
            "properties": {
                "collection": {"type": "string"},
                "mode": {"type": "string"},
                "hits": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string"},
                            "score": {"type": "number"},
                            "text": {"type": ["string", "null"]},
                            "metadata": {"type": "object"},
                            "dense_score": {"type": ["number", "null"]},
                            "keyword_score": {"type": ["number", "null"]},
                        },
                    },
                },
                "timing_ms": {"type": "object"},
            },
        },
    }
    paths: dict[str, Any] = {
        "/v1/embeddings": {
            "post": {
                "summary": "OpenAI-compatible embeddings",
                "requestBody": _json_body(_ref("EmbeddingsRequest")),
                "responses": {
                    "200": _ok("vectors", _ref("EmbeddingsResponse")),
                    **_ERRORS,
                    "404": {"description": "unknown model (MODEL_NOT_FOUND)"},
                },
            }
        },
        "/v1/models": {
            "get": {"summary": "the served model", "responses": {"200": _ok("OpenAI's model list")}}
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "one model",
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _ok("the model"), "404": {"description": "MODEL_NOT_FOUND"}},
            }
        },
        "/health": {
            "get": {
                "summary": "200 when ok, 503 when degraded or shutting down",
                "responses": {"200": _ok("ok"), "503": _ok("degraded")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text (when metrics_listen is set)",
                "responses": {"200": {"description": "text/plain exposition"}},
            }
        },
        "/openapi.json": {
            "get": {"summary": "this document", "responses": {"200": _ok("OpenAPI 3.1")}}
        },
        "/v1/collections": {
            "get": {"summary": "list collections", "responses": {"200": _ok("collections")}},
            "post": {
                "summary": "create a collection",
                "requestBody": _json_body(
                    {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "dimensions": {"type": "integer"},
                        },
                    }
                ),
                "responses": {
                    "201": _ok("created"),
                    **_ERRORS,
                    "409": {"description": "COLLECTION_EXISTS"},
                },
            },
        },
        "/v1/collections/{name}": {
            "parameters": [_NAME],
            "get": {
                "summary": "collection info and stats",
                "responses": {"200": _ok("info"), "404": {"description": "COLLECTION_NOT_FOUND"}},
            },
            "delete": {
                "summary": "drop a collection",
                "responses": {
                    "200": _ok("dropped"),
                    "404": {"description": "COLLECTION_NOT_FOUND"},
                },
            },
        },
        "/v1/collections/{name}/documents": {
            "parameters": [_NAME],
            "post": {
                "summary": "add documents (the daemon embeds them)",
                "requestBody": _json_body(_ref("AddRequest")),
                "responses": {
                    "200": _ok("added"),
                    **_ERRORS,
                    "409": {"description": "DOCUMENT_EXISTS, MODEL_MISMATCH"},
                },
            },
            "get": {
                "summary": "documents by id (null where missing)",
                "parameters": [
                    _IDS,
                    {"name": "with_vectors", "in": "query", "schema": {"type": "boolean"}},
                ],
                "responses": {"200": _ok("documents")},
            },
            "delete": {
                "summary": "delete documents by id",
                "parameters": [_IDS],
                "responses": {"200": _ok("deleted count")},
            },
        },
        "/v1/collections/{name}/documents/delete": {
            "parameters": [_NAME],
            "post": {
                "summary": "delete many documents by id",
                "requestBody": _json_body(
                    {"type": "object", "required": ["ids"], "properties": {"ids": string_list}}
                ),
                "responses": {"200": _ok("deleted count")},
            },
        },
        "/v1/collections/{name}/vectors": {
            "parameters": [_NAME],
            "post": {
                "summary": "add vectors computed elsewhere with the collection's model",
                "requestBody": _json_body(_ref("AddVectorsRequest")),
                "responses": {
                    "200": _ok("added"),
                    **_ERRORS,
                    "409": {"description": "DOCUMENT_EXISTS"},
                },
            },
        },
        "/v1/collections/{name}/search": {
            "parameters": [_NAME],
            "post": {
                "summary": "search by text or vector",
                "requestBody": _json_body(_ref("SearchRequest")),
                "responses": {"200": _ok("hits", _ref("SearchResponse")), **_ERRORS},
            },
        },
        "/": {
            "get": {
                "summary": "the search page (public: no data in it)",
                "responses": {"200": {"description": "text/html"}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edge-agent HTTP API",
            "version": version,
            "description": "docs/http.md explains every endpoint and limit",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
