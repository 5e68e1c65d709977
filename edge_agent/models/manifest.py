"""The model manifest: what a model is and which files hold it, one JSON file per model."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFileError

__all__ = ["POOLING_NAMES", "ModelFile", "ModelManifest", "write_json_atomic"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# llama.cpp's enum llama_pooling_type, by name.
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


@dataclass(frozen=True)
class ModelFile:
    quant: str  # "F32", "F16", "Q8_0", ...
    path: str  # relative to the model directory
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelManifest:
    name: str
    source: str
    architecture: str
    dims: int
    pooling: str  # "mean" | "cls" | "last"
    max_tokens: int
    files: dict[str, ModelFile]
    license: str | None = None
    # Templates with "{text}" (and "{task}" for instruction-tuned models); None = text as is.
    query_template: str | None = None
    document_template: str | None = None
    default_task: str | None = None
    # Sizes that `dimensions` may ask for (Matryoshka models); empty = not supported.
    matryoshka_dims: tuple[int, ...] = ()
    # Quant order to use when the caller does not choose (best first).
    preferred_quants: tuple[str, ...] = ()
    # The reference model's embedding of each probe text, for self-tests (list of floats).
    reference_vectors: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = MANIFEST_FORMAT
        data["matryoshka_dims"] = list(self.matryoshka_dims)
        data["preferred_quants"] = list(self.preferred_quants)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> ModelManifest:
        try:
            if data.get("format") != MANIFEST_FORMAT:
                raise ModelFileError(
                    f"{where}: manifest format {data.get('format')!r} is not {MANIFEST_FORMAT}",
                    path=str(where),
                )
            files = {q: ModelFile(**f) for q, f in data["files"].items()}
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            known["files"] = files
            known["matryoshka_dims"] = tuple(int(d) for d in data.get("matryoshka_dims", ()))
            known["preferred_quants"] = tuple(data.get("preferred_quants", ()))
            return cls(**known)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{where}: malformed manifest ({exc})", path=str(where)) from exc

    @classmethod
    def load(cls, path: Path) -> ModelManifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"cannot read manifest {path}: {exc}", path=str(path)) from exc
        if not isinstance(data, dict):
            raise ModelFileError(f"{path}: manifest is not a JSON object", path=str(path))
        return cls.from_json(data, path)

    def save(self, model_dir: Path) -> None:
        write_json_atomic(model_dir / MANIFEST_NAME, self.to_json())

    def default_quant(self) -> str:
        for quant in (*self.preferred_quants, "F32", "F16"):
            if quant in self.files:
                return quant
        return next(iter(self.files))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write-to-temp, fsync, rename: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
