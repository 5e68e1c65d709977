"""Model store, GGUF conversion and quantization, the default model."""

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
