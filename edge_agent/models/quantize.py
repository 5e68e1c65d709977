"""Quantize a GGUF with llama.cpp's own quantizer."""

from __future__ import annotations

from pathlib import Path

from ..errors import EngineError

__all__ = ["CONVERT_QUANTS", "QUANT_FTYPES", "quantize"]

# llama.cpp's enum llama_ftype values for the quants we produce.
QUANT_FTYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q8_0": 7,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
    "Q6_K": 18,
}
# The ladder `models convert` writes by default. Here, not in convert_hf: the CLI names it in
# its help text, and importing the converter would load gguf and numpy (~15 MB) into every
# command, the daemon included.
CONVERT_QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")


def quantize(source: Path, target: Path, quant: str, threads: int = 0) -> None:
    import llama_cpp  # deferred: importing it loads the engine library

    from .llama_backend import route_engine_logs

    route_engine_logs()
    if quant not in QUANT_FTYPES:
        raise ValueError(f"unknown quant {quant!r}; known: {', '.join(QUANT_FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = threads
    tmp = target.with_name(target.name + ".tmp")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if status != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise EngineError(f"llama.cpp could not quantize {source} to {quant} (status {status})")
    tmp.replace(target)
