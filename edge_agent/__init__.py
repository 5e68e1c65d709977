"""edge-agent: an on-device text-embedding agent.

The public surface: the clients, the embedder, the model store, LAN browse and fleet search,
and every error a caller can meet (all of ``edge_agent.errors``, wire-visible or local).
Importing this package loads no engine code: the embedder (llama.cpp) is imported lazily on
first use, so clients stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    AgentNotFound,
    AlreadyRunning,
    AuthFailed,
    AuthRequired,
    BackendUnavailable,
    BadRequest,
    BadResponse,
    CollectionExists,
    CollectionNotFound,
    ConfigError,
    ConnectionFailed,
    DimensionsNotSupported,
    DiscoveryError,
    DocumentExists,
    DownloadError,
    EdgeAgentError,
    EmptyText,
    EngineError,
    ErrorCode,
    IndexBusy,
    IndexCorrupt,
    IndexFull,
    InsecureListen,
    InsufficientMemory,
    IntegrityError,
    InvalidArgument,
    MalformedFrame,
    MessageTooLarge,
    ModelFileError,
    ModelMismatch,
    ModelNotFound,
    NoUsableModel,
    Overloaded,
    ProfileError,
    ProtocolError,
    RequestTimeout,
    ShuttingDown,
    TextTooLong,
    UnknownMethod,
    UnsupportedPlatform,
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
    "AgentNotFound",
    "AlreadyRunning",
    "AsyncClient",
    "AuthFailed",
    "AuthRequired",
    "BackendUnavailable",
    "BadRequest",
    "BadResponse",
    "Client",
    "CollectionExists",
    "CollectionNotFound",
    "ConfigError",
    "ConnectionFailed",
    "DimensionsNotSupported",
    "DiscoveryError",
    "DocumentExists",
    "DownloadError",
    "EdgeAgentError",
    "EmbedResult",
    "Embedder",
    "EmbedderConfig",
    "Embeddings",
    "EmptyText",
    "EngineError",
    "ErrorCode",
    "IndexBusy",
    "IndexCorrupt",
    "IndexFull",
    "InsecureListen",
    "InsufficientMemory",
    "IntegrityError",
    "InvalidArgument",
    "MalformedFrame",
    "MessageTooLarge",
    "ModelFileError",
    "ModelMismatch",
    "ModelNotFound",
    "ModelStore",
    "NoUsableModel",
    "Overloaded",
    "ProcessEmbedder",
    "ProfileError",
    "ProtocolError",
    "RequestTimeout",
    "ShuttingDown",
    "TextTooLong",
    "UnknownMethod",
    "UnsupportedPlatform",
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
