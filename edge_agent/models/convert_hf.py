"""``edge-agent models convert DIR``: a Hugging Face / sentence-transformers directory -> a
model-store entry with a quant ladder.

The architecture comes from config.json's ``model_type``: ``bert`` (MiniLM, bge, e5 and other
BERT sentence embedders: mean / CLS pooling from the sentence-transformers config) or ``qwen3``
(Qwen3-Embedding: last-token pooling, instruction template for queries). F32/F16 are written by
our converters on the ``gguf`` writer; the other quants by llama.cpp's quantizer from the F32
file when one is asked for, otherwise from F16. Every written file is loaded back by llama.cpp
and its metadata checked before it enters the store; the manifest is written last.

Idempotent like ``prepare-default``: the source is fingerprinted (sha256 of its configs,
tokenizer and weights); a model converted from the same source with every asked quant present
and verified is left alone, missing quants are added, and a model of the same name from
another source is refused rather than overwritten.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

from ..errors import IntegrityError, InvalidArgument, ModelFileError
from ..logs import kv
from ..progress import Progress
from .convert_st import Prompts, read_json, read_matryoshka_dims, read_prompts
from .gguf_meta import read_gguf_info
from .manifest import POOLING_NAMES, ModelFile, ModelManifest
from .quantize import CONVERT_QUANTS, QUANT_FTYPES
from .store import KNOWN_TEMPLATES, ModelStore, validate_model_name

__all__ = ["CONVERT_QUANTS", "SUPPORTED_ARCHITECTURES", "convert_model"]

log = logging.getLogger(__name__)

# config.json model_type -> what it covers (named in the error for anything else).
SUPPORTED_ARCHITECTURES = {
    "bert": "BERT sentence embedders (all-MiniLM, bge, e5, gte-style)",
    "qwen3": "Qwen3 (Qwen3-Embedding)",
}
_CONVERTED = ("F32", "F16")
# Order used when nothing else decides (the same reasoning as the default model's, see
# models/default.py): Q8_0 first.
_PREFERRED = ("Q8_0", "F16", "F32", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
_CONFIG_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "modules.json",
    "1_Pooling/config.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)


def _architecture(model_dir: Path) -> str:
    if not model_dir.is_dir():
        raise ModelFileError(f"{model_dir} is not a directory", path=str(model_dir))
    config = read_json(model_dir / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise ModelFileError(
            f"{model_dir}: model_type {model_type!r}"
            f" (architectures {config.get('architectures')}) cannot be converted; supported"
            f" model types: {supported}",
            path=str(model_dir),
        )
    return str(model_type)


def _fingerprint(model_dir: Path) -> str:
    """sha256 over the configs, tokenizer and weights (what decides the converted files)."""
    digest = hashlib.sha256()
    weights = sorted(model_dir.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in weights)
    for rel in _CONFIG_FILES:
        path = model_dir / rel
        if path.is_file():
            digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    with Progress("fingerprint source", total=total / 1e6, unit=" MB") as bar:
        for path in weights:
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                while chunk := handle.read(8 << 20):
                    digest.update(chunk)
                    bar.advance(len(chunk) / 1e6)
    return digest.hexdigest()


def _check_quants(quants: tuple[str, ...]) -> tuple[str, ...]:
    if not quants:
        raise InvalidArgument("--quants needs at least one quant")
    unknown = [q for q in quants if q not in QUANT_FTYPES]
    if unknown:
        raise InvalidArgument(
            f"unknown quant {unknown[0]!r}; known: {', '.join(QUANT_FTYPES)}"
        )
    return tuple(dict.fromkeys(quants))


def _verify_written(path: Path, arch: str, dims: int, pooling: str, quant: str) -> None:
    """The file reads back as what was asked for, and llama.cpp loads it."""
    info = read_gguf_info(path)
    expected = (arch, dims, pooling, quant)
    actual = (info.architecture, info.dims, info.pooling, info.quant)
    if actual != expected:
        raise ModelFileError(
            f"{path}: written as {actual}, expected {expected}", path=str(path)
        )
    import llama_cpp  # deferred: importing it loads the engine library

    from .llama_backend import route_engine_logs

    route_engine_logs()
    params = llama_cpp.llama_model_default_params()
    params.use_mmap = True
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelFileError(f"llama.cpp cannot load the converted {path}", path=str(path))
    llama_cpp.llama_model_free(model)


def _complete(store: ModelStore, name: str, quants: tuple[str, ...]) -> set[str]:
    """The asked quants already in the store and verified."""
    manifest = store.get(name)
    done = set()
    for quant in quants:
        if quant not in manifest.files:
            continue
        try:
            store.resolve(name, quant)
            done.add(quant)
        except (IntegrityError, ModelFileError) as exc:
            log.warning(
                "%s", kv(event="convert_repair", model=name, quant=quant, reason=exc.message)
            )
    return done


def convert_model(
    store: ModelStore,
    model_dir: Path,
    name: str | None = None,
    quants: tuple[str, ...] = CONVERT_QUANTS,
) -> ModelManifest:
    """Convert ``model_dir`` into ``store`` (see the module docstring)."""
    model_dir = Path(model_dir).resolve()
    arch = _architecture(model_dir)
    quants = _check_quants(quants)
    name = validate_model_name(name or model_dir.name)
    label = f"convert:{model_dir} sha256:{_fingerprint(model_dir)[:32]}"

    existing = store.get(name) if store.exists(name) else None
    if existing is not None and existing.source != label:
        raise InvalidArgument(
            f"model {name!r} already exists from another source ({existing.source}):"
            " convert under another --name, or delete its directory"
            f" {store.model_dir(name)} first"
        )
    done = _complete(store, name, quants) if existing else set()
    todo = tuple(q for q in quants if q not in done)
    if existing is not None and not todo:
        log.info("%s", kv(event="convert_up_to_date", model=name, quants=",".join(quants)))
        return existing

    # The converters (gguf, numpy) and the quantizer load only here.
    from .convert import convert_bert, read_bert_source
    from .convert_qwen3 import convert_qwen3, read_qwen3_source
    from .quantize import quantize

    if arch == "qwen3":
        qsource = read_qwen3_source(model_dir)
        dims, max_tokens, pooling = qsource.dims, qsource.max_tokens, "last"

        def write(out: Path, out_type: str) -> None:
            convert_qwen3(qsource, out, out_type, name=name)
    else:
        bsource = read_bert_source(model_dir)
        dims, max_tokens = bsource.dims, bsource.max_tokens
        pooling = POOLING_NAMES[int(bsource.pooling)]

        def write(out: Path, out_type: str) -> None:
            convert_bert(bsource, out, out_type, name=name)

    staging = store.root / f".staging-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.monotonic()
    files: dict[str, ModelFile] = {}
    base_type = "F32" if "F32" in todo else "F16"
    base = staging / f"{name}.{base_type}.gguf"
    try:
        with Progress(f"convert {name}", total=len(todo), unit=" files") as bar:
            for quant in todo:
                out = staging / f"{name}.{quant}.gguf"
                if quant in _CONVERTED:
                    write(out, quant)
                else:
                    if not base.exists():
                        write(base, base_type)
                    quantize(base, out, quant)
                _verify_written(out, arch, dims, pooling, quant)
                bar.advance(1, quant)
            for quant in todo:
                files[quant] = store.place_file(
                    name, quant, staging / f"{name}.{quant}.gguf", move=True
                )
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    if existing is not None:
        all_files = {**existing.files, **files}
        manifest = replace(
            existing,
            files=all_files,
            preferred_quants=tuple(q for q in _PREFERRED if q in all_files),
        )
    else:
        prompts = read_prompts(model_dir)
        if prompts.query_template is None and arch in KNOWN_TEMPLATES:
            query, document, task, _ = KNOWN_TEMPLATES[arch]
            prompts = Prompts(query, document, task)
        matryoshka = read_matryoshka_dims(model_dir)
        if matryoshka is None:
            # Qwen3-Embedding is trained with Matryoshka representation learning (any size
            # from 32 to its width); BERT models are not unless they declare sizes.
            matryoshka = (
                tuple(d for d in (32, 64, 128, 256, 512, 768, 1024, 2048, 4096) if d < dims)
                if arch == "qwen3"
                else ()
            )
        manifest = ModelManifest(
            name=name,
            source=label,
            architecture=arch,
            dims=dims,
            pooling=pooling,
            max_tokens=max_tokens,
            files=files,
            query_template=prompts.query_template,
            document_template=prompts.document_template,
            default_task=prompts.default_task,
            matryoshka_dims=tuple(d for d in matryoshka if d < dims),
            preferred_quants=tuple(q for q in _PREFERRED if q in files),
        )
    store.save(manifest)
    log.info(
        "%s",
        kv(
            event="model_converted",
            model=name,
            architecture=arch,
            quants=",".join(todo),
            seconds=round(time.monotonic() - started, 1),
        ),
    )
    return manifest
