"""Convert a Hugging Face BERT sentence-embedding model (safetensors + WordPiece vocab) to GGUF.

Written on the ``gguf`` package's writer. The output is what llama.cpp's BERT graph expects:
architecture ``bert``, non-causal attention, the pooling from sentence-transformers' config
(mean, CLS or last token: MiniLM, bge, e5, gte-style BERT models), and a WordPiece vocab in
llama.cpp's "phantom space" form (word-initial pieces get U+2581, ``##`` continuation pieces
lose their prefix). The vocab comes from vocab.txt or, without one, from tokenizer.json's
WordPiece model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from ..errors import ModelFileError
from ..progress import Progress
from .convert_st import read_json, read_max_seq_length, read_pooling
from .convert_tensors import open_tensors

__all__ = ["BertSource", "convert_bert", "read_bert_source"]


class BertSource:
    """A sentence-transformers BERT directory, its configs parsed and checked."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        self.config = read_json(model_dir / "config.json")
        if self.config.get("model_type") != "bert":
            raise ModelFileError(
                f"{model_dir}: model_type {self.config.get('model_type')!r} is not bert",
                path=str(model_dir),
            )
        tokenizer_config = read_json(model_dir / "tokenizer_config.json", required=False)
        self.lowercase = bool(tokenizer_config.get("do_lower_case", True))
        self.max_tokens = read_max_seq_length(
            model_dir, int(self.config["max_position_embeddings"])
        )
        self.pooling = read_pooling(model_dir, gguf.PoolingType.MEAN)
        self.vocab = _read_wordpiece_vocab(model_dir)
        if len(self.vocab) != self.config["vocab_size"]:
            raise ModelFileError(
                f"{model_dir}: the vocabulary has {len(self.vocab)} entries, config says"
                f" {self.config['vocab_size']}"
            )
        self.tensors = open_tensors(model_dir)
        self.weights = self.tensors.files[0]

    @property
    def dims(self) -> int:
        return int(self.config["hidden_size"])


def _read_wordpiece_vocab(model_dir: Path) -> list[str]:
    vocab_txt = model_dir / "vocab.txt"
    if vocab_txt.is_file():
        try:
            vocab = vocab_txt.read_text(encoding="utf-8").split("\n")
        except OSError as exc:
            raise ModelFileError(f"cannot read {vocab_txt}: {exc}", path=str(vocab_txt)) from exc
        if vocab and vocab[-1] == "":
            vocab.pop()
        return vocab
    tokenizer = read_json(model_dir / "tokenizer.json", required=False)
    model = tokenizer.get("model") or {}
    if model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
        raise ModelFileError(
            f"{model_dir}: no vocab.txt and no WordPiece vocabulary in tokenizer.json",
            path=str(model_dir),
        )
    by_id = sorted(model["vocab"].items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ModelFileError(f"{model_dir}: tokenizer.json's vocabulary ids have gaps")
    return [token for token, _ in by_id]


def read_bert_source(model_dir: Path) -> BertSource:
    return BertSource(model_dir)


def _phantom(token: str) -> str:
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def convert_bert(source: BertSource, out_path: Path, out_type: str = "F16", name: str = "") -> None:
    """Write ``out_path`` as a GGUF of ``out_type`` ("F32" or "F16"; quantize the rest)."""
    if out_type not in ("F32", "F16"):
        raise ValueError(f"convert_bert writes F32 or F16, not {out_type}")
    config = source.config
    n_layers = int(config["num_hidden_layers"])
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp_path, "bert")
    writer.add_name(name or source.dir.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(n_layers)
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config["layer_norm_eps"]))
    writer.add_causal_attention(False)
    writer.add_pooling_type(source.pooling)
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if out_type == "F32" else gguf.LlamaFileType.MOSTLY_F16
    )

    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([_phantom(t) for t in source.vocab])
    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in source.vocab]
    )
    writer.add_token_type_count(int(config.get("type_vocab_size", 2)))
    index = {token: i for i, token in enumerate(source.vocab)}
    # [CLS] doubles as BOS: llama.cpp's WordPiece path prepends BOS and appends SEP.
    for token, key in (
        ("[CLS]", "tokenizer.ggml.bos_token_id"),
        ("[CLS]", "tokenizer.ggml.cls_token_id"),
        ("[UNK]", "tokenizer.ggml.unknown_token_id"),
        ("[SEP]", "tokenizer.ggml.seperator_token_id"),  # sic: llama.cpp's spelling
        ("[PAD]", "tokenizer.ggml.padding_token_id"),
        ("[MASK]", "tokenizer.ggml.mask_token_id"),
    ):
        if token in index:
            writer.add_uint32(key, index[token])
    writer.add_bool("tokenizer.ggml.normalizer.lowercase", source.lowercase)

    weights = source.tensors
    keys = [k for k in weights.names() if not k.endswith("position_ids")]
    with Progress(f"convert {out_type}", total=len(keys), unit=" tensors") as bar:
        for key in keys:
            bar.advance(1)
            stem = key.removeprefix("bert.")
            if stem.startswith("pooler."):
                continue  # sentence-transformers pools itself; the BERT pooler is unused
            base, _, suffix = stem.rpartition(".")
            mapped = tensor_map.get_name(base)
            if mapped is None:
                raise ModelFileError(f"{source.weights}: unexpected tensor {key}")
            data = weights.get(key)
            # Norms and biases stay f32 (tiny, precision-sensitive), and so does the token
            # type table: llama.cpp adds a view of it directly, and its CPU add has no
            # f32 + f16 kernel (the process aborts).
            if out_type == "F16" and data.ndim >= 2 and mapped != "token_types":
                data = data.astype(np.float16)
            writer.add_tensor(f"{mapped}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp_path.replace(out_path)
