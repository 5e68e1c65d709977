#!/usr/bin/env python3
"""Random-weight Qwen3-Embedding-shaped Hugging Face directories (benchmarks and tests only).

Real Qwen3-Embedding weights cannot be downloaded here, but speed and memory do not depend on
the weight values, and the converter's fidelity can be checked against ``transformers`` on the
same random weights. A directory holds what the real model ships: config.json, model.safetensors
(bf16 for the real shapes, f32 for the tiny test shape), a byte-level BPE tokenizer.json with
the real vocabulary size and the Qwen2 pre-tokenizer, <|endoftext|> appended by its
post-processor, and the sentence-transformers configs (last-token pooling, the query
instruction prompt).

The tokenizer is trained with the ``tokenizers`` library on local text (this repository's docs
and sources), then padded with synthetic merges (an existing token + one byte) to the full size:
any valid byte-level BPE of that size costs the same to load and run.

Directories are cached under ~/.cache/edge-agent/bench (EDGE_AGENT_BENCH_CACHE) by shape and
seed; a ``.complete`` marker is written last, so an interrupted run is redone.

    .venv/bin/python bench/qwen3_fixture.py --shape 0.6b      # prints the directory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
EOS = "<|endoftext|>"
SPECIALS = (EOS, "<|im_start|>", "<|im_end|>")
# Qwen2/Qwen3's pre-tokenizer split (llama.cpp's "qwen2" pre-tokenizer is the same regex).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QUERY_PROMPT = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
)
FORMAT = 1  # bump when the written directory changes


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    dtype: str  # "BF16" or "F32" for model.safetensors


SHAPES = {
    # Qwen3-Embedding-0.6B's config.json.
    "0.6b": Shape("0.6b", 28, 1024, 3072, 16, 8, 128, 151_669, 32_768, "BF16"),
    # Qwen3-Embedding-4B's config.json.
    "4b": Shape("4b", 36, 2560, 9728, 32, 8, 128, 151_669, 32_768, "BF16"),
    # The test shape: the same structure (GQA, q/k norms, tied embeddings), seconds to run.
    "tiny": Shape("tiny", 2, 64, 128, 4, 2, 32, 1_024, 2_048, "F32"),
}


def cache_root() -> Path:
    return Path(
        os.environ.get("EDGE_AGENT_BENCH_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-agent" / "bench"
    )


def _corpus() -> list[str]:
    """Local text to train the tokenizer on: this repository's docs and sources, plus a few
    lines of Chinese so CJK characters get merges too."""
    texts: list[str] = []
    for pattern in ("*.md", "docs/*.md", "edge_agent/**/*.py"):
        for path in sorted(REPO.glob(pattern)):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    texts.append("今天天气很好。我们去公园散步吧。机器学习模型可以把文本变成向量。" * 20)
    return texts


def build_tokenizer(vocab_size: int) -> str:
    """A byte-level BPE tokenizer.json with exactly ``vocab_size`` tokens (specials last)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    regular = vocab_size - len(SPECIALS)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(regular, 8_000),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list[list[str]] = [
        list(m) if isinstance(m, list) else m.split(" ", 1) for m in data["model"]["merges"]
    ]
    # Pad to the full size with synthetic merges: token + one byte character.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    by_id = sorted(vocab, key=vocab.__getitem__)
    cursor = 0
    while len(vocab) < regular:
        left = by_id[cursor]
        cursor += 1
        for char in alphabet:
            if len(vocab) >= regular:
                break
            merged = left + char
            if merged not in vocab:
                vocab[merged] = len(vocab)
                by_id.append(merged)
                merges.append([left, char])
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = merges
    data["added_tokens"] = [
        {
            "id": regular + i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, token in enumerate(SPECIALS)
    ]
    full = Tokenizer.from_str(json.dumps(data))
    full.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {EOS}:0", pair=f"$A:0 $B:1 {EOS}:1", special_tokens=[(EOS, regular)]
    )
    if full.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {full.get_vocab_size()} tokens, not {vocab_size}")
    return full.to_str()


def _to_bf16(data: np.ndarray) -> np.ndarray:
    bits = data.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
    return (rounded >> 16).astype(np.uint16)


def _tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    names: list[tuple[str, tuple[int, ...]]] = [
        ("embed_tokens.weight", (shape.vocab, shape.hidden))
    ]
    for i in range(shape.layers):
        p = f"layers.{i}."
        names += [
            (p + "input_layernorm.weight", (shape.hidden,)),
            (p + "self_attn.q_proj.weight", (q, shape.hidden)),
            (p + "self_attn.k_proj.weight", (kv, shape.hidden)),
            (p + "self_attn.v_proj.weight", (kv, shape.hidden)),
            (p + "self_attn.o_proj.weight", (shape.hidden, q)),
            (p + "self_attn.q_norm.weight", (shape.head_dim,)),
            (p + "self_attn.k_norm.weight", (shape.head_dim,)),
            (p + "post_attention_layernorm.weight", (shape.hidden,)),
            (p + "mlp.gate_proj.weight", (shape.ffn, shape.hidden)),
            (p + "mlp.up_proj.weight", (shape.ffn, shape.hidden)),
            (p + "mlp.down_proj.weight", (shape.hidden, shape.ffn)),
        ]
    names.append(("norm.weight", (shape.hidden,)))
    return names


def write_weights(path: Path, shape: Shape, seed: int) -> None:
    """model.safetensors, streamed tensor by tensor. Matrices are N(0, 1/fan_in) (so every
    token and layer changes the last-token state), norms 1 + N(0, 0.1), embeddings N(0, 1)."""
    rng = np.random.default_rng(seed)
    itemsize = 2 if shape.dtype == "BF16" else 4
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    tensors = _tensor_shapes(shape)
    for name, dims in tensors:
        size = int(np.prod(dims)) * itemsize
        header[name] = {
            "dtype": shape.dtype,
            "shape": list(dims),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        for name, dims in tensors:
            if len(dims) == 1:
                data = 1.0 + 0.1 * rng.standard_normal(dims, dtype=np.float32)
            elif name.startswith("embed_tokens"):
                data = rng.standard_normal(dims, dtype=np.float32)
            else:
                data = rng.standard_normal(dims, dtype=np.float32) / np.float32(np.sqrt(dims[1]))
            (_to_bf16(data) if shape.dtype == "BF16" else data).tofile(handle)


def write_model_dir(target: Path, shape: Shape, seed: int = 0) -> Path:
    """Write a complete Qwen3-Embedding-shaped directory at ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.context,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": shape.layers,
        "vocab_size": shape.vocab,
        "bos_token_id": shape.vocab - len(SPECIALS),
        "eos_token_id": shape.vocab - len(SPECIALS),
        "torch_dtype": "bfloat16" if shape.dtype == "BF16" else "float32",
    }
    (target / "config.json").write_text(json.dumps(config, indent=2))
    (target / "tokenizer.json").write_text(build_tokenizer(shape.vocab), encoding="utf-8")
    (target / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "eos_token": EOS,
                "pad_token": EOS,
                "bos_token": None,
                "padding_side": "left",
                "model_max_length": shape.context,
            }
        )
    )
    (target / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                },
            ]
        )
    )
    (target / "1_Pooling").mkdir(exist_ok=True)
    (target / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": shape.hidden,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": False,
                "pooling_mode_lasttoken": True,
                "include_prompt": True,
            }
        )
    )
    (target / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "prompts": {"query": QUERY_PROMPT, "document": ""},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            }
        )
    )
    (target / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": shape.context, "do_lower_case": False})
    )
    write_weights(target / "model.safetensors", shape, seed)
    return target


def cached_model_dir(shape_name: str, seed: int = 0) -> Path:
    """The cached directory for (shape, seed), written on first use."""
    shape = SHAPES[shape_name]
    target = cache_root() / f"qwen3-{shape.name}-seed{seed}-v{FORMAT}"
    if (target / ".complete").is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    print(f"writing a random {shape.name} Qwen3 model to {target}", file=sys.stderr, flush=True)
    write_model_dir(target, shape, seed)
    (target / ".complete").write_text("")
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(cached_model_dir(args.shape, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
