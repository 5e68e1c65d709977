"""OpenAI's embeddings schema <-> the wire ``embed`` method.

``POST /v1/embeddings`` takes exactly OpenAI's request (``input``, ``model``,
``encoding_format``, ``dimensions``, ``user``) plus edge-agent's extensions (``kind``,
``instruction``, ``long_text``) and answers OpenAI's response. Pure functions: the routes call
``embed_params`` for the wire method's arguments and ``embeddings_response`` for the reply.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from ...errors import InvalidArgument, ModelNotFound

__all__ = ["ENCODING_FORMATS", "EXTENSIONS", "embed_params", "embeddings_response", "models_list"]

ENCODING_FORMATS = ("float", "base64")
EXTENSIONS = ("kind", "instruction", "long_text")
_FIELDS = ("input", "model", "encoding_format", "dimensions", "user", *EXTENSIONS)

TOKEN_IDS_MESSAGE = (
    "input holds token ids (lists of integers); edge-agent embeds text with its own model's"
    " tokenizer, so send the strings themselves. LangChain's OpenAIEmbeddings sends token ids"
    " by default: create it with check_embedding_ctx_length=False"
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(value: Any) -> bool:
    """A list of ints, or a list of lists of ints (OpenAI accepts both as pre-tokenized input)."""
    if not isinstance(value, list) or not value:
        return False
    if all(_is_int(item) for item in value):
        return True
    return all(isinstance(item, list) and all(_is_int(t) for t in item) for item in value)


def embed_params(body: Any, served_model: str) -> tuple[dict[str, Any], str]:
    """The wire ``embed`` arguments for an OpenAI request body, and its encoding format.

    InvalidArgument (400) for a malformed request; ModelNotFound (404) for another model."""
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    for name in body:
        if name not in _FIELDS:
            raise InvalidArgument(
                f"unrecognized request argument {name!r:.60} (known: {', '.join(_FIELDS)})",
                argument=str(name)[:60],
            )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model must be a non-empty string", argument="model")
    if model != served_model:
        raise ModelNotFound(
            f"the model {model!r:.100} does not exist here; this daemon serves"
            f" {served_model!r} (GET /v1/models)",
            argument="model",
            model=model[:100],
        )
    if "input" not in body:
        raise InvalidArgument("input is required", argument="input")
    raw = body["input"]
    if _token_ids(raw):
        raise InvalidArgument(TOKEN_IDS_MESSAGE, argument="input")
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw:
        for index, text in enumerate(raw):
            if not isinstance(text, str):
                raise InvalidArgument(
                    f"input[{index}] must be a string, got {type(text).__name__}",
                    argument="input",
                    index=index,
                )
        texts = raw
    else:
        raise InvalidArgument(
            "input must be a string or a non-empty array of strings", argument="input"
        )
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODING_FORMATS:
        raise InvalidArgument(
            f"encoding_format must be one of {ENCODING_FORMATS}, got {encoding!r:.50}",
            argument="encoding_format",
        )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidArgument("user must be a string", argument="user")
    params: dict[str, Any] = {"texts": texts}
    for name in ("dimensions", *EXTENSIONS):
        if body.get(name) is not None:
            params[name] = body[name]
    return params, encoding


def embeddings_response(result: dict[str, Any], encoding: str) -> dict[str, Any]:
    """OpenAI's response for the wire ``embed`` result (little-endian float32 rows)."""
    raw: bytes = result["vectors"]
    dims, count = int(result["dims"]), int(result["count"])
    row = 4 * dims
    data: list[dict[str, Any]] = []
    if encoding == "base64":
        # The bytes OpenAI sends: little-endian float32, exactly what the wire carries.
        for index in range(count):
            chunk = base64.b64encode(raw[index * row : (index + 1) * row]).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": chunk})
    else:
        # float32 rows, serialised by the response encoder (orjson) without a Python list.
        vectors = np.frombuffer(raw, dtype="<f4").reshape(count, dims).astype(np.float32)
        for index, vector in enumerate(vectors):
            data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(int(n) for n in result["token_counts"])
    return {
        "object": "list",
        "data": data,
        "model": result["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def models_list(model: str, dims: int, supported_dims: list[int]) -> dict[str, Any]:
    """``GET /v1/models``: the one served model, with its sizes as extensions."""
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": "edge-agent",
                "dimensions": dims,
                "supported_dimensions": supported_dims,
            }
        ],
    }
