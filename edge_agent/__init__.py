"""edge-agent: an on-device text-embedding agent.

The public surface. Importing this package loads no engine code: the embedder (llama.cpp) is
imported lazily on first use, so clients stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    DimensionsNotSupported,
    DownloadError,
    EdgeAgentError,
    EmptyText,
    EngineError,
    ErrorCode,
    IntegrityError,
    InvalidArgument,
    ModelFileError,
    ModelNotFound,
    TextTooLong,
)

if TYPE_CHECKING:
    from .client import AsyncClient, Client, fleet_search
    from .embedding.embedder import Embedder, EmbedderConfig, Embeddings
    from .embedding.worker import ProcessEmbedder
    from .lan.discovery import browse
    from .models import ModelStore
    from .protocol import EmbedResult

from ._version import __version__

__all__ = [
    "AsyncClient",
    "Client",
    "DimensionsNotSupported",
    "DownloadError",
    "EdgeAgentError",
    "EmbedResult",
    "Embedder",
    "EmbedderConfig",
    "Embeddings",
    "EmptyText",
    "EngineError",
    "ErrorCode",
    "IntegrityError",
    "InvalidArgument",
    "ModelFileError",
    "ModelNotFound",
    "ModelStore",
    "ProcessEmbedder",
    "TextTooLong",
    "__version__",
    "browse",
    "fleet_search",
]

_LAZY = {
    "AsyncClient": "client",
    "Client": "client",
    "EmbedResult": "protocol",
    "ProcessEmbedder": "embedding.worker",
    "Embedder": "embedding.embedder",
    "EmbedderConfig": "embedding.embedder",
    "Embeddings": "embedding.embedder",
    "ModelStore": "models",
    "browse": "lan.discovery",
    "fleet_search": "client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_agent' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
