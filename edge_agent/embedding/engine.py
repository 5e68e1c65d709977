"""A thin, typed layer over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Everything here runs on the thread that created the ``Engine``: llama.cpp contexts are not
thread-safe, and the Embedder above guarantees one owning thread. Batches are filled through
typed memoryviews of ctypes arrays (one C-level copy per sequence) instead of per-token ctypes
assignments, which would cost more than the model on short texts. No numpy: this module runs
in the engine child, where numpy would add ~15 MB of RSS to every served model
(docs/benchmarks.md, "Serving RSS against llama-server").
"""

from __future__ import annotations

import ctypes
import logging
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from ..errors import EngineError, ModelFileError
from ..logs import kv
from ..models.llama_backend import route_engine_logs

__all__ = ["Engine", "EngineSettings", "route_engine_logs"]

log = logging.getLogger("edge_agent.engine")


@dataclass(frozen=True)
class EngineSettings:
    threads: int
    batch_tokens: int  # n_batch == n_ubatch: encoder models abort on larger batches
    max_sequences: int  # sequences per batch (<= 256, llama.cpp's LLAMA_MAX_SEQ)
    flash_attention: bool | None  # None = let llama.cpp decide
    use_mmap: bool = True
    use_mlock: bool = False
    # A lone sequence of at most this many tokens runs in a second, small context without
    # flash attention: one short text embeds ~10-15% faster that way, while packed batches
    # need flash attention (without it, attention over a packed batch grows with its square).
    # 0: one context for everything.
    solo_tokens: int = 0


# A decoder's micro-batch: llama.cpp runs each batch in micro-batches of this many tokens, and
# its compute buffer scales with the micro-batch. Qwen3-Embedding-0.6B at a 512-token batch:
# 14 MB less serving RSS than 512, texts/s within the run-to-run noise (-3% in the first
# session): docs/benchmarks.md, Qwen3 section, "Session 2026-12-04".
DECODER_MICRO_BATCH = 256


class Engine:
    """One model + one embedding context."""

    def __init__(self, path: Path, settings: EngineSettings) -> None:
        route_engine_logs()
        self.settings = settings
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_mmap = settings.use_mmap
        model_params.use_mlock = settings.use_mlock
        model_params.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise ModelFileError(f"llama.cpp could not load {path}", path=str(path))
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.dims = int(llama_cpp.llama_model_n_embd(self._model))
        self.context_length = int(llama_cpp.llama_model_n_ctx_train(self._model))
        self.causal = not llama_cpp.llama_model_has_encoder(self._model) and self._meta_causal()

        batch, threads = settings.batch_tokens, settings.threads
        self.threads = threads
        self.micro_batch = self._micro_batch(batch)  # the main context's n_ubatch
        # Decoders (Qwen3-Embedding) keep a KV cache of n_layer x batch x KV width (56 MiB for
        # the 0.6B at 512 tokens, f16): with flash attention it is held as q8_0, half that
        # (cosine to f16 >= 0.9999 on bench/qwen3_bench.py's texts). Encoders (BERT) have none.
        self.kv_q8 = (
            self.causal and settings.flash_attention is not False and self._head_dims_fit_q8()
        )
        self._ctx: ctypes.c_void_p | None = self._context(
            batch, settings.max_sequences, threads, settings.flash_attention, self.kv_q8
        )
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EngineError(f"llama.cpp could not create a context for {path}")
        self.pooling = int(llama_cpp.llama_pooling_type(self._ctx))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.solo_tokens = min(settings.solo_tokens, settings.batch_tokens)
        if self.causal:
            # The solo context pays off for small encoders (flash attention's overhead on one
            # short text); a decoder's costs its own KV cache and compute buffer (42 MiB for
            # Qwen3-0.6B) and was slower, not faster (docs/benchmarks.md, Qwen3 section).
            self.solo_tokens = 0
        self._solo_ctx: ctypes.c_void_p | None = None
        self._solo_memory = None
        if self.solo_tokens > 0 and settings.flash_attention is not False:
            self._solo_ctx = self._context(self.solo_tokens, 1, settings.threads, False)
            if self._solo_ctx:
                self._solo_memory = llama_cpp.llama_get_memory(self._solo_ctx)
            else:  # not worth failing the model for: everything runs in the main context
                log.warning(
                    "%s",
                    kv(event="solo_context_off", reason="llama.cpp could not create it"),
                )
                self.solo_tokens = 0

        vocab = self._vocab
        self.bos = int(llama_cpp.llama_vocab_bos(vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(vocab))
        self.sep = int(llama_cpp.llama_vocab_sep(vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
        self.add_sep = bool(llama_cpp.llama_vocab_get_add_sep(vocab))

        capacity = settings.batch_tokens
        self._tokens = (ctypes.c_int32 * capacity)()
        self._pos = (ctypes.c_int32 * capacity)()
        self._n_seq_id = (ctypes.c_int32 * capacity)(*([1] * capacity))
        self._logits = (ctypes.c_int8 * capacity)(*([1] * capacity))  # every token is output
        self._seq_values = (ctypes.c_int32 * settings.max_sequences)(
            *range(settings.max_sequences)
        )
        self._seq_ptrs = (ctypes.c_void_p * capacity)()
        # Native-format views (ctypes arrays export "<i", which array('i') cannot be assigned
        # to) for one C-level copy per sequence.
        self._token_view = memoryview(self._tokens).cast("B").cast("i")
        self._pos_view = memoryview(self._pos).cast("B").cast("i")
        self._seq_ptr_bytes = memoryview(self._seq_ptrs).cast("B")
        self._positions = memoryview(array("i", range(capacity)))
        pointer_size = ctypes.sizeof(ctypes.c_void_p)
        base = ctypes.addressof(self._seq_values)
        self._seq_ptr_pattern = [
            struct.pack("P", base + index * ctypes.sizeof(ctypes.c_int32))
            for index in range(settings.max_sequences)
        ]
        self._pointer_size = pointer_size
        # Any: the bindings type these fields as arrays; they take the pointers set here.
        lb: Any = llama_cpp.llama_batch()
        lb.token = ctypes.cast(self._tokens, ctypes.POINTER(llama_cpp.llama_token))
        lb.embd = None
        lb.pos = ctypes.cast(self._pos, ctypes.POINTER(llama_cpp.llama_pos))
        lb.n_seq_id = ctypes.cast(self._n_seq_id, ctypes.POINTER(ctypes.c_int32))
        lb.seq_id = ctypes.cast(
            self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id))
        )
        lb.logits = ctypes.cast(self._logits, ctypes.POINTER(ctypes.c_int8))
        self._batch = lb
        self._token_buffer = (llama_cpp.llama_token * 4096)()

    def _context(
        self,
        tokens: int,
        sequences: int,
        threads: int,
        flash_attention: bool | None,
        kv_q8: bool = False,
    ) -> ctypes.c_void_p:
        params = llama_cpp.llama_context_default_params()
        if kv_q8:  # a quantized V cache needs flash attention
            params.type_k = llama_cpp.GGML_TYPE_Q8_0
            params.type_v = llama_cpp.GGML_TYPE_Q8_0
        params.embeddings = True
        params.n_ctx = tokens
        params.n_batch = tokens  # == n_ubatch for encoders: they abort on larger batches
        params.n_ubatch = self._micro_batch(tokens)
        params.n_seq_max = sequences
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = True  # causal models: all sequences of a batch share n_ctx cells
        params.no_perf = True
        params.flash_attn_type = {
            None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attention]
        return llama_cpp.llama_init_from_model(self._model, params)

    def _micro_batch(self, tokens: int) -> int:
        """llama.cpp's n_ubatch for a context of ``tokens``: DECODER_MICRO_BATCH for a causal
        model pooled by its last token (the KV cache carries a sequence across micro-batches
        and the last one's last token is the pooled one), else the whole batch (an encoder
        must see a sequence in one piece; mean pooling would average one piece)."""
        arch = self.meta("general.architecture") or ""
        last = self.meta(f"{arch}.pooling_type") == str(llama_cpp.LLAMA_POOLING_TYPE_LAST)
        if self.causal and last and tokens > DECODER_MICRO_BATCH:
            return DECODER_MICRO_BATCH
        return tokens

    def _head_dims_fit_q8(self) -> bool:
        """q8_0 blocks are 32 values: the K and V head widths must be multiples of 32."""
        arch = self.meta("general.architecture") or ""
        widths = []
        for key in ("key_length", "value_length"):
            value = self.meta(f"{arch}.attention.{key}")
            heads = self.meta(f"{arch}.attention.head_count")
            if value is None and heads:
                value = str(self.dims // max(1, int(heads)))
            widths.append(int(value) if value and value.isdigit() else 0)
        return all(width > 0 and width % 32 == 0 for width in widths)

    def _meta_causal(self) -> bool:
        arch = self.meta("general.architecture") or ""
        value = self.meta(f"{arch}.attention.causal")
        return value is None or value.lower() not in ("false", "0")

    def set_threads(self, threads: int) -> None:
        """Threads for the following calls (both contexts): llama.cpp reads the count at each
        decode, so changing it costs nothing."""
        for ctx in (self._ctx, self._solo_ctx):
            if ctx:
                llama_cpp.llama_set_n_threads(ctx, threads, threads)
        self.threads = threads

    def meta(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(512)
        length = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8", errors="replace") if length >= 0 else None

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        buffer = self._token_buffer
        count = llama_cpp.llama_tokenize(
            self._vocab, data, len(data), buffer, len(buffer), add_special, False
        )
        if count < 0:
            # Too long for the reusable buffer: llama.cpp told us how many it needs.
            buffer = (llama_cpp.llama_token * -count)()
            count = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buffer, len(buffer), add_special, False
            )
            if count < 0:
                raise EngineError(f"tokenizer failed on a text of {len(data)} bytes")
        return list(buffer[:count])

    def embed_batch(self, sequences: list[list[int]]) -> bytes:
        """Embed up to ``max_sequences`` token sequences whose total fits ``batch_tokens``:
        the pooled vectors as float32 rows (``len(sequences) x dims``), in order."""
        total = sum(len(s) for s in sequences)
        if total > self.settings.batch_tokens or len(sequences) > self.settings.max_sequences:
            # Never hand llama.cpp an oversized batch: it aborts the process instead of failing.
            raise EngineError(
                f"batch of {total} tokens / {len(sequences)} sequences exceeds "
                f"{self.settings.batch_tokens} / {self.settings.max_sequences}"
            )
        offset = 0
        width = self._pointer_size
        for seq_index, tokens in enumerate(sequences):
            length = len(tokens)
            end = offset + length
            self._token_view[offset:end] = array("i", tokens)
            self._pos_view[offset:end] = self._positions[:length]
            self._seq_ptr_bytes[offset * width : end * width] = (
                self._seq_ptr_pattern[seq_index] * length
            )
            offset = end
        self._batch.n_tokens = total
        ctx, memory = self._ctx, self._memory
        if len(sequences) == 1 and total <= self.solo_tokens:
            ctx, memory = self._solo_ctx, self._solo_memory
        if memory:
            llama_cpp.llama_memory_clear(memory, True)
        status = llama_cpp.llama_decode(ctx, self._batch)
        if status != 0:
            raise EngineError(f"llama.cpp decode failed (status {status}) on {total} tokens")
        row_bytes = self.dims * 4
        rows = []
        for seq_index in range(len(sequences)):
            pointer = llama_cpp.llama_get_embeddings_seq(ctx, seq_index)
            if not pointer:
                raise EngineError(f"llama.cpp returned no embedding for sequence {seq_index}")
            rows.append(ctypes.string_at(pointer, row_bytes))
        return b"".join(rows)

    def close(self) -> None:
        if getattr(self, "_solo_ctx", None):
            llama_cpp.llama_free(self._solo_ctx)
            self._solo_ctx = None
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # contexts hold native memory; free it even if close() was missed
        try:
            self.close()
        except Exception:
            pass
