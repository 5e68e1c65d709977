"""Safe start with real broken model files: a GGUF that aborts llama.cpp in the child, one that
loads but gives wrong numbers, and the fallback, refusal and tuning paths around them."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_agent.embedding.embedder import Embedder
from edge_agent.hardware import probe_host
from edge_agent.models import DEFAULT_MODEL, ModelFile, ModelManifest, ModelStore
from edge_agent.models.hashing import sha256_file
from edge_agent.selection.choose import NoUsableModel, override_from, select
from edge_agent.selection.profiles import load_profiles
from edge_agent.selection.selftest import PROBE_TEXTS, plan, run_selftest, safe_start
from edge_agent.selection.tuning import BAD_FILE, BadFiles, engine_build, tune

BROKEN = "broken-minilm"
Transform = Callable[[str, np.ndarray], np.ndarray]


def rewrite_gguf(source: Path, target: Path, transform: Transform) -> None:
    """Copy a GGUF's metadata and tensors, passing each tensor through ``transform``."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by the writer itself
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, transform(tensor.name, np.array(tensor.data)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def f16_token_types(name: str, data: np.ndarray) -> np.ndarray:
    # llama.cpp adds this table to f32 activations; its CPU add has no f32 + f16 kernel, so
    # the first embed aborts the process ("binary_op: unsupported types").
    return data.astype(np.float16) if name == "token_types.weight" else data


def perturbed_ffn(name: str, data: np.ndarray) -> np.ndarray:
    if name != "blk.0.ffn_down.weight":
        return data
    noise = np.random.default_rng(0).normal(0.0, 3.0 * float(data.std()), data.shape)
    return (data + noise).astype(data.dtype)


@pytest.fixture(scope="module")
def broken_sources(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory):
    """(crashing GGUF, wrong-numbers GGUF, the real F32 file), written once per module."""
    out = tmp_path_factory.mktemp("broken")
    f16 = model_store.resolve(DEFAULT_MODEL, "F16").path
    rewrite_gguf(f16, out / "crash.gguf", f16_token_types)
    rewrite_gguf(f16, out / "wrong.gguf", perturbed_ffn)
    return out / "crash.gguf", out / "wrong.gguf", model_store.resolve(DEFAULT_MODEL, "F32").path


def place(model_dir: Path, quant: str, source: Path) -> ModelFile:
    target = model_dir / f"{BROKEN}.{quant}.gguf"
    try:
        os.link(source, target)  # same bytes, no copy
    except OSError:
        shutil.copyfile(source, target)
    return ModelFile(quant, target.name, sha256_file(target), target.stat().st_size)


def broken_store(
    root: Path,
    model_store: ModelStore,
    files: dict[str, Path],
    reference_vectors: dict[str, list[float]] | None = None,
) -> ModelStore:
    """A store with model ``broken-minilm`` whose quant labels map to the given files."""
    store = ModelStore(root)
    model_dir = store.model_dir(BROKEN)
    model_dir.mkdir(parents=True)
    base = model_store.get(DEFAULT_MODEL)
    manifest = ModelManifest(
        name=BROKEN,
        source="test: deliberately broken files",
        architecture=base.architecture,
        dims=base.dims,
        pooling=base.pooling,
        max_tokens=base.max_tokens,
        files={quant: place(model_dir, quant, path) for quant, path in files.items()},
        reference_vectors=reference_vectors or {},
    )
    store.save(manifest)
    return store


def write_profiles(root: Path, quants: list[str]) -> Path:
    root.mkdir()
    (root / "generic.toml").write_text(
        'name = "generic"\n[settings]\n'
        f"quants = {json.dumps(quants)}\n"
        "batch_tokens = 256\nmax_sequences = 8\nmemory_headroom_mib = 64\n"
        "[settings.threads]\nbase = 'physical_cores'\nmax = 2\n"
    )
    return root


def bad_kinds(state: Path) -> dict[str, str]:
    data = json.loads((state / BAD_FILE).read_text())
    return {entry["quant"]: entry["kind"] for entry in data["bad"]}


def test_crash_and_wrong_numbers_fall_back_to_a_working_file(
    model_store: ModelStore, broken_sources, tmp_path: Path
) -> None:
    crash, wrong, f32 = broken_sources
    files = {"F16": crash, "Q8_0": wrong, "F32": f32}
    store = broken_store(tmp_path / "models", model_store, files)
    profiles = load_profiles(write_profiles(tmp_path / "profiles", ["F16", "Q8_0", "F32"]))
    state = tmp_path / "state"

    started = safe_start(store, BROKEN, state_dir=state, profiles=profiles, tune_budget_s=None)

    kinds = [(o.quant, o.kind) for o in started.outcomes]
    assert kinds == [("F16", "crash"), ("Q8_0", "wrong-numbers"), ("F32", "ok")]
    crash_outcome, wrong_outcome, _ = started.outcomes
    assert "SIGABRT" in crash_outcome.detail and "binary_op" in crash_outcome.detail
    assert wrong_outcome.cosine is not None and wrong_outcome.cosine < 0.9
    assert "below 0.995 for Q8_0" in wrong_outcome.detail
    assert started.decision.quant == "F32" and started.resolved.path.name.endswith("F32.gguf")
    assert bad_kinds(state) == {"F16": "crash", "Q8_0": "wrong-numbers"}
    rejected = dict(started.selection.rejected)
    assert rejected["F16"].startswith("self-test crash") and "F32" not in rejected
    assert "self-test F16: crash" in started.report()

    # What the daemon then opens works.
    with Embedder(started.resolved, started.config) as embedder:
        assert embedder.embed(["hello"]).vectors.shape == (1, 384)
    assert started.config.threads == started.decision.threads <= 2

    # Next start: the bad files are skipped without running them again, and explained.
    again = safe_start(store, BROKEN, state_dir=state, profiles=profiles, tune_budget_s=None)
    assert [(o.quant, o.kind) for o in again.outcomes] == [("F32", "ok")]
    explained = plan(store, BROKEN, state_dir=state, profiles=profiles)
    assert explained.decision.quant == "F32"
    assert "killed by SIGABRT" in dict(explained.rejected)["F16"]

    # Another engine build is a new key: the files get a fresh chance.
    host = probe_host()
    assert BadFiles(state / BAD_FILE).bad("another build", host.cpu_id) == {}


def test_all_bad_refuses_to_start_with_the_reasons(
    model_store: ModelStore, embedder: Embedder, broken_sources, tmp_path: Path
) -> None:
    crash, wrong, _ = broken_sources
    # No good file at all; the expected vectors come from the manifest (the real F32 model's).
    expected = embedder.embed(list(PROBE_TEXTS)).vectors
    store = broken_store(
        tmp_path / "models",
        model_store,
        {"F16": crash, "Q8_0": wrong},
        reference_vectors={t: v.tolist() for t, v in zip(PROBE_TEXTS, expected, strict=True)},
    )
    profiles = load_profiles(write_profiles(tmp_path / "profiles", ["F16", "Q8_0"]))
    state = tmp_path / "state"
    with pytest.raises(NoUsableModel) as caught:
        safe_start(store, BROKEN, state_dir=state, profiles=profiles, tune_budget_s=None)
    message = caught.value.message
    assert message.startswith(f"refusing to start: no file of {BROKEN} works")
    assert "F16: self-test crash: killed by SIGABRT" in message
    assert "Q8_0: self-test wrong-numbers: cosine" in message and "expected vectors" in message
    assert bad_kinds(state) == {"F16": "crash", "Q8_0": "wrong-numbers"}

    # Pinned by the user: the override is honoured (retried), never silently replaced.
    pinned = override_from(flags={"quant": "F16"})
    with pytest.raises(NoUsableModel, match="pinned by flag --quant"):
        safe_start(
            store, BROKEN, state_dir=state, profiles=profiles, override=pinned, tune_budget_s=None
        )


def test_a_hung_child_is_killed_at_the_timeout(model_store: ModelStore, tmp_path: Path) -> None:
    host = probe_host()
    decision = select(host, load_profiles(), model_store.get(DEFAULT_MODEL)).decision
    outcome, _, _ = run_selftest(model_store, decision, timeout_s=0.05)
    assert (outcome.ok, outcome.kind) == (False, "timeout")
    assert "killed" in outcome.detail


def test_tuning_survives_a_file_that_crashes_the_engine(
    model_store: ModelStore, broken_sources, tmp_path: Path
) -> None:
    crash, wrong, f32 = broken_sources
    files = {"F16": crash, "Q8_0": wrong, "F32": f32}
    store = broken_store(tmp_path / "models", model_store, files)
    profiles = load_profiles(write_profiles(tmp_path / "profiles", ["F16", "Q8_0", "F32"]))
    state, host, engine = tmp_path / "state", probe_host(), engine_build()
    result = tune(
        store,
        BROKEN,
        state_dir=state,
        budget_s=10.0,
        host=host,
        profiles=profiles,
        engine=engine,
        show_progress=False,
    )
    assert [q for q, _ in result.crashed] == ["F16"]
    assert "SIGABRT" in result.crashed[0][1]
    assert bad_kinds(state) == {"F16": "crash"}
    by_quant = {m.quant: m for m in result.measurements}
    assert {"Q8_0", "F32"} <= set(by_quant)  # the worker was restarted for the rest
    assert by_quant["Q8_0"].cosine_min < 0.9  # wrong numbers show as quality loss
    # Selection from those measurements: the crashing file is out, the wrong one last.
    selection = plan(store, BROKEN, state_dir=state, profiles=profiles, host=host, engine=engine)
    assert [c.quant for c in selection.candidates] == ["F32", "Q8_0"]
    assert "below the profile's floor" in selection.candidates[-1].notes[-1]


def test_unloadable_and_corrupt_files_fall_back_differently(
    model_store: ModelStore, broken_sources, tmp_path: Path
) -> None:
    _, _, f32 = broken_sources
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(4096))  # a header llama.cpp refuses to load
    q8 = model_store.resolve(DEFAULT_MODEL, "Q8_0").path
    store = broken_store(tmp_path / "models", model_store, {"F16": garbage, "Q8_0": q8, "F32": f32})
    # The Q8_0 file no longer matches its manifest entry: an integrity problem, not the
    # engine's, so it must not be marked bad for this engine and CPU.
    manifest = store.get(BROKEN)
    q8_entry = dataclasses.replace(manifest.files["Q8_0"], sha256="0" * 64)
    store.save(dataclasses.replace(manifest, files={**manifest.files, "Q8_0": q8_entry}))
    profiles = load_profiles(write_profiles(tmp_path / "profiles", ["F16", "Q8_0", "F32"]))
    state = tmp_path / "state"

    started = safe_start(store, BROKEN, state_dir=state, profiles=profiles, tune_budget_s=None)

    assert [(o.quant, o.kind, o.ok) for o in started.outcomes] == [
        ("F16", "error", False),
        ("Q8_0", "integrity", False),
        ("F32", "unverified", True),  # the most precise file: nothing to compare it with
    ]
    assert "could not load" in started.outcomes[0].detail
    assert "does not match the manifest" in started.outcomes[1].detail
    assert bad_kinds(state) == {"F16": "error"}
