"""A tiny, random Qwen3-architecture embedding model, written as GGUF for tests.

Real Qwen3-Embedding files are hundreds of megabytes; this one is ~100 KB and loads through
the same llama.cpp code path (qwen3 graph, byte-level BPE vocab with the qwen2 pre-tokenizer,
last-token pooling). Its vectors mean nothing, but they are deterministic and depend on every
token of the input, which is all the tests need.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

__all__ = [
    "EOS_TEXT",
    "HIDDEN",
    "MERGES",
    "MODEL_NAME",
    "byte_to_unicode",
    "write_tiny_qwen3_gguf",
]

MODEL_NAME = "tiny-qwen3-embedding"
EOS_TEXT = "<|endoftext|>"
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2  # grouped-query attention, as in the real Qwen3 models
HEAD_DIM = 16
FFN = 128
ROPE_FREQ_BASE = 1_000_000.0
RMS_EPS = 1e-6

# Merges in rank order ("Ġ" is GPT-2's stand-in for a space byte). A handful is enough to
# exercise the BPE path; everything else falls back to single-byte tokens.
MERGES: tuple[tuple[str, str], ...] = (
    ("Ġ", "t"),
    ("t", "h"),
    ("th", "e"),
    ("Ġt", "h"),
    ("Ġth", "e"),
    ("h", "e"),
    ("i", "n"),
    ("e", "r"),
    ("Ġ", "a"),
    ("o", "n"),
    ("r", "e"),
    ("Ġ", "i"),
    ("Ġi", "n"),
    ("in", "g"),
    ("a", "n"),
    ("Ġa", "n"),
    ("Ġan", "d"),
    ("Ġ", "s"),
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by every byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _vocab() -> tuple[list[str], list[int]]:
    # Byte tokens first with id == byte value, so any UTF-8 text has a tokenization.
    byte_chars = byte_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    types = [int(gguf.TokenType.NORMAL)] * 256
    for left, right in MERGES:
        merged = left + right
        if merged not in tokens:
            tokens.append(merged)
            types.append(int(gguf.TokenType.NORMAL))
    tokens.append(EOS_TEXT)
    types.append(int(gguf.TokenType.CONTROL))
    return tokens, types


def _tensor_name(kind: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


def write_tiny_qwen3_gguf(path: Path, *, context_length: int = 64, seed: int = 0) -> Path:
    """Write the tiny model to ``path`` (F32, last-token pooling, EOS not auto-appended)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, types = _vocab()
    eos_id = tokens.index(EOS_TEXT)

    def dense(rows: int, cols: int) -> np.ndarray:
        # Fan-in scaled rather than a flat *0.02: with 0.02 the residual stream stays ~the input
        # embedding, the last-token vector would be ~the EOS embedding for every text, and tests
        # could not tell one text (or one instruction) from another.
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def ones(size: int) -> np.ndarray:
        return np.ones(size, dtype=np.float32)

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3])
    writer.add_name(MODEL_NAME)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(context_length)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_pooling_type(gguf.PoolingType.LAST)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{left} {right}" for left, right in MERGES])
    # Qwen3-Embedding uses <|endoftext|> as BOS, EOS and padding; without explicit ids the
    # gpt2 vocab defaults BOS/EOS to id 11, a byte token.
    writer.add_bos_token_id(eos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_pad_token_id(eos_id)
    # The point of this model: the tokenizer does not append EOS, the embedder must.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)

    t = gguf.MODEL_TENSOR
    # No output.weight: llama.cpp ties it to token_embd, as Qwen3-Embedding-0.6B does.
    writer.add_tensor(
        _tensor_name(t.TOKEN_EMBD),
        rng.standard_normal((len(tokens), HIDDEN)).astype(np.float32),
    )
    writer.add_tensor(_tensor_name(t.OUTPUT_NORM), ones(HIDDEN))
    for layer in range(LAYERS):
        writer.add_tensor(_tensor_name(t.ATTN_NORM, layer), ones(HIDDEN))
        writer.add_tensor(_tensor_name(t.ATTN_Q, layer), dense(HEADS * HEAD_DIM, HIDDEN))
        writer.add_tensor(_tensor_name(t.ATTN_K, layer), dense(KV_HEADS * HEAD_DIM, HIDDEN))
        writer.add_tensor(_tensor_name(t.ATTN_V, layer), dense(KV_HEADS * HEAD_DIM, HIDDEN))
        writer.add_tensor(_tensor_name(t.ATTN_OUT, layer), dense(HIDDEN, HEADS * HEAD_DIM))
        # Qwen3's per-head q/k RMS norms are mandatory tensors for the qwen3 loader.
        writer.add_tensor(_tensor_name(t.ATTN_Q_NORM, layer), ones(HEAD_DIM))
        writer.add_tensor(_tensor_name(t.ATTN_K_NORM, layer), ones(HEAD_DIM))
        writer.add_tensor(_tensor_name(t.FFN_NORM, layer), ones(HIDDEN))
        writer.add_tensor(_tensor_name(t.FFN_GATE, layer), dense(FFN, HIDDEN))
        writer.add_tensor(_tensor_name(t.FFN_UP, layer), dense(FFN, HIDDEN))
        writer.add_tensor(_tensor_name(t.FFN_DOWN, layer), dense(HIDDEN, FFN))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
