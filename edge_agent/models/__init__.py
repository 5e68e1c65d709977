"""Model store, GGUF conversion and quantization, the default model.

The public names load on first use (PEP 562): the engine child imports
``edge_agent.models.manifest`` to unpickle its model's manifest, and importing the whole
package would pull the store's hashing (libcrypto) and the default model's importlib.metadata
into a process that needs neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .default import DEFAULT_MODEL, prepare_default
    from .gguf_meta import GgufInfo, read_gguf_info
    from .manifest import ModelFile, ModelManifest
    from .store import ModelStore, ResolvedModel

__all__ = [
    "DEFAULT_MODEL",
    "GgufInfo",
    "ModelFile",
    "ModelManifest",
    "ModelStore",
    "ResolvedModel",
    "prepare_default",
    "read_gguf_info",
]

_HOMES = {
    "DEFAULT_MODEL": "default",
    "prepare_default": "default",
    "GgufInfo": "gguf_meta",
    "read_gguf_info": "gguf_meta",
    "ModelFile": "manifest",
    "ModelManifest": "manifest",
    "ModelStore": "store",
    "ResolvedModel": "store",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)
