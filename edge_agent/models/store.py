"""The model store: one directory per model, GGUF files per quant, and a manifest."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InvalidArgument, ModelFileError, ModelNotFound
from .gguf_meta import GgufInfo, read_gguf_info
from .hashing import VerifyCache, sha256_file
from .manifest import MANIFEST_NAME, ModelFile, ModelManifest

__all__ = ["KNOWN_TEMPLATES", "ModelStore", "ResolvedModel"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Instruction conventions of well-known embedding families, by GGUF architecture, applied when a
# file is imported without explicit templates: (query template, document template, default task,
# Matryoshka sizes or None for "any size from 32 to dims").
KNOWN_TEMPLATES: dict[str, tuple[str | None, str | None, str | None, tuple[int, ...] | None]] = {
    "qwen3": (
        "Instruct: {task}\nQuery:{text}",
        None,
        "Given a web search query, retrieve relevant passages that answer the query",
        None,
    ),
    "nomic-bert": (
        "search_query: {text}",
        "search_document: {text}",
        None,
        (64, 128, 256, 512, 768),
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    manifest: ModelManifest
    quant: str
    path: Path


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument(
            f"model name {name!r} must be 1-128 characters of letters, digits, '.', '_', '-'"
        )
    return name


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._verify_cache = VerifyCache(self.root / ".verified.json")

    def model_dir(self, name: str) -> Path:
        return self.root / validate_model_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST_NAME).is_file())

    def list(self) -> list[ModelManifest]:
        return [self.get(name) for name in self.names()]

    def exists(self, name: str) -> bool:
        return (self.model_dir(name) / MANIFEST_NAME).is_file()

    def get(self, name: str) -> ModelManifest:
        path = self.model_dir(name) / MANIFEST_NAME
        if not path.is_file():
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"no model {name!r} in {self.root} (known: {known})", model=name)
        return ModelManifest.load(path)

    def resolve(self, name: str, quant: str | None = None, verify: bool = True) -> ResolvedModel:
        """The file for (model, quant), its sha256 verified unless ``verify`` is False."""
        manifest = self.get(name)
        chosen = quant or manifest.default_quant()
        entry = manifest.files.get(chosen)
        if entry is None:
            raise ModelNotFound(
                f"model {name!r} has no {chosen} file (has: {', '.join(manifest.files)})",
                model=name,
                quant=chosen,
            )
        path = self.model_dir(name) / entry.path
        if verify:
            self._verify_cache.verify(path, entry.sha256, entry.size)
        return ResolvedModel(manifest=manifest, quant=chosen, path=path)

    def shapes(self, name: str) -> dict[str, GgufInfo]:
        """Quant -> what each file's GGUF header says (layers, KV heads, vocabulary: the memory
        estimate's inputs); files that are missing or unreadable are left out."""
        manifest = self.get(name)
        found: dict[str, GgufInfo] = {}
        for quant, entry in manifest.files.items():
            try:
                found[quant] = read_gguf_info(self.model_dir(name) / entry.path)
            except ModelFileError:
                continue
        return found

    def verify_all(self, name: str) -> dict[str, str]:
        """Re-hash every file of a model (ignoring the cache); quant -> "ok" or the error."""
        manifest = self.get(name)
        results: dict[str, str] = {}
        for quant, entry in manifest.files.items():
            path = self.model_dir(name) / entry.path
            try:
                if not path.is_file():
                    raise ModelFileError(f"model file missing: {path}", path=str(path))
                actual = sha256_file(path, show_progress=True)
                results[quant] = "ok" if actual == entry.sha256 else f"sha256 mismatch: {actual}"
            except ModelFileError as exc:
                results[quant] = exc.message
        return results

    def place_file(self, name: str, quant: str, source: Path, move: bool = False) -> ModelFile:
        """Copy (or move) a GGUF into the model's directory and describe it."""
        target_dir = self.model_dir(name)
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / f"{name}.{quant}.gguf"
        if source.resolve() != target.resolve():
            tmp = target.with_name(target.name + ".tmp")
            if move:
                shutil.move(str(source), tmp)
            else:
                shutil.copyfile(source, tmp)
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        return ModelFile(
            quant=quant, path=target.name, sha256=sha256_file(target), size=target.stat().st_size
        )

    def save(self, manifest: ModelManifest) -> None:
        manifest.save(self.model_dir(manifest.name))

    def import_gguf(
        self,
        source: Path,
        name: str | None = None,
        *,
        source_label: str | None = None,
        move: bool = False,
        query_template: str | None = None,
        document_template: str | None = None,
        matryoshka_dims: tuple[int, ...] | None = None,
    ) -> ModelManifest:
        """Register any GGUF, reading dims/pooling/context from its metadata.

        A second quant of an existing model is added beside the others; its dims and
        architecture must agree with what the manifest already says.
        """
        info = read_gguf_info(source)
        if info.pooling in (None, "none", "rank"):
            raise ModelFileError(
                f"{source}: pooling {info.pooling or 'unspecified'} does not produce one embedding"
                " per text; only mean, cls and last pooling models can be used",
                path=str(source),
            )
        name = validate_model_name(name or (info.name or source.stem).replace(" ", "-"))
        existing = self.get(name) if self.exists(name) else None
        if existing and (existing.dims, existing.architecture) != (info.dims, info.architecture):
            raise InvalidArgument(
                f"{source} is {info.architecture}/{info.dims}d but model {name!r} is"
                f" {existing.architecture}/{existing.dims}d: import it under another name"
            )
        placed = self.place_file(name, info.quant, source, move=move)
        if existing:
            manifest = replace(existing, files={**existing.files, info.quant: placed})
        else:
            known_query, known_document, task, known_dims = KNOWN_TEMPLATES.get(
                info.architecture, (None, None, None, ())
            )
            if known_dims is None:
                known_dims = tuple(
                    d for d in (32, 64, 128, 256, 512, 768, 1024, 2048) if d < info.dims
                )
            manifest = ModelManifest(
                name=name,
                source=source_label or f"import:{source.name}",
                architecture=info.architecture,
                dims=info.dims,
                pooling=info.pooling,
                max_tokens=info.context_length,
                files={info.quant: placed},
                query_template=query_template if query_template is not None else known_query,
                document_template=(
                    document_template if document_template is not None else known_document
                ),
                default_task=task,
                matryoshka_dims=matryoshka_dims if matryoshka_dims is not None else known_dims,
            )
        self.save(manifest)
        return manifest
