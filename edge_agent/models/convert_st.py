"""What a sentence-transformers model directory says besides its weights: pooling, prompts,
sequence length. Shared by the per-architecture converters (convert.py, convert_qwen3.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from ..errors import ModelFileError

__all__ = ["Prompts", "read_json", "read_max_seq_length", "read_pooling", "read_prompts"]

# sentence-transformers Pooling config key -> llama.cpp pooling type. Other modes (max,
# weightedmean, mean_sqrt_len_tokens) have no llama.cpp equivalent.
_POOLING_FROM_ST = (
    ("pooling_mode_mean_tokens", gguf.PoolingType.MEAN),
    ("pooling_mode_cls_token", gguf.PoolingType.CLS),
    ("pooling_mode_lasttoken", gguf.PoolingType.LAST),
)
_UNSUPPORTED_POOLING = (
    "pooling_mode_max_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
)
# Qwen3-Embedding's (and other instruction models') query prompt: an instruction, then the text.
_INSTRUCT = re.compile(r"^Instruct: (?P<task>.+)\nQuery: ?$", re.DOTALL)
INSTRUCT_TEMPLATE = "Instruct: {task}\nQuery:{text}"


def read_json(path: Path, required: bool = True) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise ModelFileError(f"{path} is missing", path=str(path)) from None
        return {}
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read {path}: {exc}", path=str(path)) from exc
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: not a JSON object", path=str(path))
    return data


def _pooling_dir(model_dir: Path) -> Path:
    """The Pooling module's directory, from modules.json when there is one."""
    modules = model_dir / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"cannot read {modules}: {exc}", path=str(modules)) from exc
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and str(entry.get("type", "")).endswith(".Pooling"):
                return model_dir / str(entry.get("path", "1_Pooling"))
    return model_dir / "1_Pooling"


def read_pooling(model_dir: Path, default: gguf.PoolingType) -> gguf.PoolingType:
    """The pooling the sentence-transformers config declares (``default`` when it has none)."""
    path = _pooling_dir(model_dir) / "config.json"
    config = read_json(path, required=False)
    for key, kind in _POOLING_FROM_ST:
        if config.get(key):
            return kind
    for key in _UNSUPPORTED_POOLING:
        if config.get(key):
            raise ModelFileError(
                f"{path}: {key} has no llama.cpp equivalent; supported poolings: mean, cls,"
                " lasttoken",
                path=str(path),
            )
    return default


@dataclass(frozen=True)
class Prompts:
    query_template: str | None
    document_template: str | None
    default_task: str | None


def read_prompts(model_dir: Path) -> Prompts:
    """Query/document templates from config_sentence_transformers.json's ``prompts``.

    An instruction prompt ("Instruct: <task>\\nQuery:") becomes the template
    "Instruct: {task}\\nQuery:{text}" with <task> as the default task, so clients can pass
    their own task; any other prompt is a plain prefix.
    """
    config = read_json(model_dir / "config_sentence_transformers.json", required=False)
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict):
        prompts = {}
    query = prompts.get("query")
    document = prompts.get("document", prompts.get("passage"))
    task = None
    query_template = None
    if isinstance(query, str) and query:
        match = _INSTRUCT.match(query)
        if match:
            task = match.group("task")
            query_template = INSTRUCT_TEMPLATE
        else:
            query_template = query + "{text}"
    document_template = document + "{text}" if isinstance(document, str) and document else None
    return Prompts(query_template, document_template, task)


def read_max_seq_length(model_dir: Path, fallback: int) -> int:
    config = read_json(model_dir / "sentence_bert_config.json", required=False)
    value = config.get("max_seq_length")
    return int(value) if isinstance(value, int) and value > 0 else fallback


def read_matryoshka_dims(model_dir: Path) -> tuple[int, ...] | None:
    """Matryoshka sizes if the model declares them (``matryoshka_dims`` in
    config_sentence_transformers.json); None when it does not."""
    config = read_json(model_dir / "config_sentence_transformers.json", required=False)
    dims = config.get("matryoshka_dims")
    if isinstance(dims, list) and dims and all(isinstance(d, int) and d > 0 for d in dims):
        return tuple(sorted(set(dims)))
    return None
