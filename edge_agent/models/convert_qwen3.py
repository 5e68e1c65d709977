"""Convert a Hugging Face Qwen3 embedding model (Qwen3-Embedding) to a GGUF for llama.cpp.

Written on the ``gguf`` package's writer, with the keys llama.cpp's own convert_hf_to_gguf.py
writes for Qwen3 (architecture ``qwen3``; head_dim as key/value length; rope theta and RMS
epsilon from config.json) plus what an embedding model needs: last-token pooling and
``<|endoftext|>`` as the end-of-text token the pooled state is read at. The vocabulary is
tokenizer.json's byte-level BPE (tokens in GPT-2's byte-to-unicode form, merges in rank order)
with the ``qwen2`` pre-tokenizer; added tokens keep their ids, special ones are CONTROL tokens.

The output head (``lm_head``) is never written: an embedding model does not use it, and
llama.cpp's qwen3 loader ties the output to the token embeddings when it is absent (as
Qwen3-Embedding-0.6B does anyway). Tensors are streamed one at a time, so converting needs
about one tensor's memory, not the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import ModelFileError
from ..progress import Progress
from .convert_st import read_json, read_max_seq_length, read_pooling
from .convert_tensors import TensorSource, open_tensors

__all__ = ["EOS_TOKEN", "Qwen3Source", "convert_qwen3", "read_qwen3_source"]

EOS_TOKEN = "<|endoftext|>"
_HEAD_PREFIXES = ("lm_head.",)


@dataclass(frozen=True)
class _Planned:
    source_name: str
    gguf_name: str
    shape: tuple[int, ...]


class Qwen3Source:
    """A Qwen3 model directory, its configs and tokenizer parsed and checked."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        self.config = read_json(model_dir / "config.json")
        if self.config.get("model_type") != "qwen3":
            raise ModelFileError(
                f"{model_dir}: model_type {self.config.get('model_type')!r} is not qwen3",
                path=str(model_dir),
            )
        if self.config.get("rope_scaling"):
            raise ModelFileError(
                f"{model_dir}: rope_scaling {self.config['rope_scaling']!r} is not supported"
                " by this converter (Qwen3-Embedding has none)",
                path=str(model_dir),
            )
        try:
            self.hidden = int(self.config["hidden_size"])
            self.layers = int(self.config["num_hidden_layers"])
            self.ffn = int(self.config["intermediate_size"])
            self.heads = int(self.config["num_attention_heads"])
            self.kv_heads = int(self.config.get("num_key_value_heads") or self.heads)
            self.head_dim = int(self.config.get("head_dim") or self.hidden // self.heads)
            self.rope_theta = float(self.config.get("rope_theta", 1_000_000.0))
            self.rms_eps = float(self.config.get("rms_norm_eps", 1e-6))
            self.context_length = int(self.config["max_position_embeddings"])
            self.vocab_size = int(self.config["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(
                f"{model_dir}/config.json: missing or bad Qwen3 field ({exc})",
                path=str(model_dir / "config.json"),
            ) from exc
        self.max_tokens = read_max_seq_length(model_dir, self.context_length)
        self.pooling = read_pooling(model_dir, gguf.PoolingType.LAST)
        if self.pooling != gguf.PoolingType.LAST:
            raise ModelFileError(
                f"{model_dir}: a Qwen3 (causal) model pools its last token; the"
                f" sentence-transformers config asks for {self.pooling.name.lower()}",
                path=str(model_dir),
            )
        self.tokens, self.token_types, self.merges = _read_bpe(
            model_dir / "tokenizer.json", self.vocab_size
        )
        try:
            self.eos_id = self.tokens.index(EOS_TOKEN)
        except ValueError:
            raise ModelFileError(
                f"{model_dir}/tokenizer.json has no {EOS_TOKEN} token", path=str(model_dir)
            ) from None
        self.tensors = open_tensors(model_dir)
        self.plan = _plan(self.tensors, self.layers, model_dir)
        embd = self.tensors.shape(self.plan[0].source_name)
        if embd != (self.vocab_size, self.hidden):
            raise ModelFileError(
                f"{model_dir}: token embeddings are {embd}, config says"
                f" ({self.vocab_size}, {self.hidden})",
                path=str(model_dir),
            )

    @property
    def dims(self) -> int:
        return self.hidden


def read_qwen3_source(model_dir: Path) -> Qwen3Source:
    return Qwen3Source(model_dir)


def _read_bpe(path: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """tokenizer.json's byte-level BPE: tokens by id (padded to the embedding rows), their
    llama.cpp token types, and the merges as "left right" strings in rank order."""
    tokenizer = read_json(path)
    model: dict[str, Any] = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelFileError(f"{path}: not a BPE tokenizer", path=str(path))
    pre = str(tokenizer.get("pre_tokenizer") or {})
    if "ByteLevel" not in pre:
        raise ModelFileError(f"{path}: not a byte-level BPE tokenizer", path=str(path))
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size

    def place(token: str, index: int, kind: gguf.TokenType) -> None:
        if not 0 <= index < vocab_size:
            raise ModelFileError(
                f"{path}: token {token!r} has id {index}, outside the model's {vocab_size}"
                " embedding rows",
                path=str(path),
            )
        tokens[index] = token
        types[index] = int(kind)

    for token, index in model["vocab"].items():
        place(token, int(index), gguf.TokenType.NORMAL)
    for added in tokenizer.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        place(str(added["content"]), int(added["id"]), kind)
    # Embedding rows beyond the tokenizer (Qwen pads its vocabulary): never produced by the
    # tokenizer, named as llama.cpp's converter names them.
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index] = f"[PAD{index}]"
            types[index] = int(gguf.TokenType.UNUSED)
    merges: list[str] = []
    for merge in model.get("merges") or []:
        if isinstance(merge, str):
            merges.append(merge)
        elif isinstance(merge, list) and len(merge) == 2:
            merges.append(f"{merge[0]} {merge[1]}")
        else:
            raise ModelFileError(f"{path}: malformed merge {merge!r}", path=str(path))
    return [t for t in tokens if t is not None], types, merges


def _plan(tensors: TensorSource, layers: int, model_dir: Path) -> list[_Planned]:
    """Source tensor -> GGUF tensor, token embeddings first; the output head is dropped."""
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, layers)
    planned: list[_Planned] = []
    for name in tensors.names():
        stem = name.removeprefix("model.")
        if stem.startswith(_HEAD_PREFIXES):
            continue
        base, _, suffix = stem.rpartition(".")
        mapped = tensor_map.get_name(f"model.{base}")
        if mapped is None or suffix != "weight":
            raise ModelFileError(
                f"{model_dir}: unexpected tensor {name} for a Qwen3 model", path=str(model_dir)
            )
        planned.append(_Planned(name, f"{mapped}.weight", tensors.shape(name)))
    planned.sort(key=lambda p: (not p.gguf_name.startswith("token_embd"), p.gguf_name))
    names = {p.gguf_name for p in planned}
    required = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{part}.weight"
        for i in range(layers)
        for part in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
            "attn_k_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
        )
    ]
    missing = [n for n in required if n not in names]
    if missing:
        raise ModelFileError(
            f"{model_dir}: {len(missing)} Qwen3 tensors missing, e.g. {missing[0]}",
            path=str(model_dir),
        )
    return planned


def convert_qwen3(
    source: Qwen3Source, out_path: Path, out_type: str = "F16", name: str = ""
) -> None:
    """Write ``out_path`` as a GGUF of ``out_type`` ("F32" or "F16"; quantize the rest)."""
    if out_type not in ("F32", "F16"):
        raise ValueError(f"convert_qwen3 writes F32 or F16, not {out_type}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3])
    writer.add_name(name or source.dir.name)
    writer.add_context_length(source.context_length)
    writer.add_embedding_length(source.hidden)
    writer.add_block_count(source.layers)
    writer.add_feed_forward_length(source.ffn)
    writer.add_head_count(source.heads)
    writer.add_head_count_kv(source.kv_heads)
    writer.add_key_length(source.head_dim)
    writer.add_value_length(source.head_dim)
    writer.add_rope_freq_base(source.rope_theta)
    writer.add_layer_norm_rms_eps(source.rms_eps)
    writer.add_pooling_type(gguf.PoolingType.LAST)
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if out_type == "F32" else gguf.LlamaFileType.MOSTLY_F16
    )

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(source.tokens)
    writer.add_token_types(source.token_types)
    writer.add_token_merges(source.merges)
    # Qwen3-Embedding: no BOS, <|endoftext|> ends every text (its tokenizer's post-processor
    # appends it) and is what last-token pooling reads.
    writer.add_bos_token_id(source.eos_id)
    writer.add_eos_token_id(source.eos_id)
    writer.add_pad_token_id(source.eos_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(True)

    def out_dtype(shape: tuple[int, ...]) -> np.dtype:
        # Norms stay f32 (tiny, precision-sensitive), matrices are f16 in an F16 file.
        return np.dtype(np.float16 if out_type == "F16" and len(shape) >= 2 else np.float32)

    for planned in source.plan:
        dtype = out_dtype(planned.shape)
        nbytes = int(np.prod(planned.shape)) * dtype.itemsize
        writer.add_tensor_info(planned.gguf_name, planned.shape, dtype, nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with Progress(f"convert {out_type}", total=len(source.plan), unit=" tensors") as bar:
        for planned in source.plan:
            data = source.tensors.get(planned.source_name)
            writer.write_tensor_data(data.astype(out_dtype(planned.shape), copy=False))
            bar.advance(1)
    writer.close()
    tmp_path.replace(out_path)
