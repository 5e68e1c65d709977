"""Selection: a pure function of probe + profiles + model files + measurements + memory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_probe import load_host

from edge_agent.errors import InvalidArgument, ModelNotFound
from edge_agent.hardware import probe_host
from edge_agent.models import DEFAULT_MODEL, ModelFile, ModelManifest, ModelStore
from edge_agent.selection.choose import (
    InsufficientMemory,
    Measurement,
    NoUsableModel,
    Override,
    estimate_memory,
    explain,
    override_from,
    select,
)
from edge_agent.selection.profiles import load_profiles
from edge_agent.selection.tuning import TUNING_FILE, TuningStore, engine_build, tune

MIB = 1 << 20
GIB = 1 << 30
ENGINE = "llama-cpp-python 0.3.36; CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 |"
AMX_ENGINE = ENGINE + " AVX512 = 1 | AMX_INT8 = 1 |"


def manifest_of(name: str, dims: int, max_tokens: int, sizes: dict[str, int]) -> ModelManifest:
    return ModelManifest(
        name=name,
        source="test",
        architecture="bert",
        dims=dims,
        pooling="mean",
        max_tokens=max_tokens,
        files={
            q: ModelFile(quant=q, path=f"{name}.{q}.gguf", sha256=f"sha-{name}-{q}", size=size)
            for q, size in sizes.items()
        },
    )


# The default model's real file sizes (all-MiniLM-L6-v2).
MINILM = manifest_of(
    "all-MiniLM-L6-v2",
    384,
    256,
    {
        "F32": 90894912,
        "F16": 45827136,
        "Q8_0": 25279200,
        "Q6_K": 24422112,
        "Q5_K_M": 21989088,
        "Q4_K_M": 21270240,
        "Q4_0": 19970784,
    },
)
# An 8B embedding model (Qwen3-Embedding-8B's published GGUF sizes).
BIG = manifest_of(
    "qwen3-embedding-8b",
    4096,
    32768,
    {"F16": 15_140_000_000, "Q8_0": 8_050_000_000, "Q4_K_M": 4_680_000_000},
)


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


# host -> (profile, quant, threads, batch_tokens, max_sequences)
DECISIONS = {
    "rpi3b-1gb": ("raspberry-pi-3", "Q8_0", 3, 256, 16),
    "rpi4-4gb": ("raspberry-pi-4", "Q8_0", 3, 256, 32),
    "rpi5-8gb": ("raspberry-pi-5", "Q8_0", 3, 512, 32),
    "apple-m2-8gb": ("apple-silicon", "F16", 4, 512, 64),
    "x86-avx2-laptop": ("x86-avx2", "Q8_0", 4, 512, 64),
    "x86-avx512-amx-server": ("x86-amx", "F16", 3, 512, 64),
    "x86-old-no-avx2": ("x86-legacy", "F32", 3, 256, 32),
    "container-1.5cpu-512mb": ("x86-small-memory", "Q8_0", 1, 256, 16),
    "container-v1-2cpu-2gb": ("x86-avx2", "Q8_0", 2, 512, 64),
}


@pytest.mark.parametrize("name", sorted(DECISIONS))
def test_each_host_class_gets_its_decision_with_reasons(profiles, name: str) -> None:
    profile, quant, threads, batch, sequences = DECISIONS[name]
    selection = select(load_host(name), profiles, MINILM, engine_info=ENGINE)
    decision = selection.decision
    assert selection.profile.name == profile
    assert (decision.quant, decision.threads, decision.batch_tokens, decision.max_sequences) == (
        quant,
        threads,
        batch,
        sequences,
    )
    assert decision.basis == "profile" and decision.max_context == 256  # the model's own cap
    assert selection.reasons[0].startswith(f"profile {profile} ")
    assert any(r.startswith("threads rule") for r in selection.reasons)
    assert any(r.startswith("memory budget") for r in selection.reasons)
    # Every file of the model stays available as a fallback, in the profile's order.
    assert [c.quant for c in selection.candidates] == list(selection.profile.quants)
    text = explain(selection)
    assert f"choice    {quant}:" in text and f"profile   {profile}" in text
    json.dumps(selection.to_json())


def test_container_budget_comes_from_the_cgroup_limit(profiles) -> None:
    selection = select(load_host("container-1.5cpu-512mb"), profiles, MINILM)
    # 512 MiB limit - 160 MiB headroom; the host's 32 GB of /proc/meminfo do not count.
    assert selection.budget.budget == 352 * MIB
    assert "cgroup memory limit 512 MiB" in selection.budget.basis


def test_amx_engine_never_gets_q8_0_or_k_quants_on_an_amx_cpu(profiles) -> None:
    server = load_host("x86-avx512-amx-server")
    selection = select(server, profiles, MINILM, engine_info=AMX_ENGINE)
    assert [c.quant for c in selection.candidates] == ["F16", "F32", "Q4_0"]
    rejected = dict(selection.rejected)
    assert set(rejected) == {"Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"}
    assert all("#20824" in why and "AMX_INT8" in why for why in rejected.values())
    # The same engine on a CPU without AMX never runs the AMX path: nothing is dropped.
    laptop = select(load_host("x86-avx2-laptop"), profiles, MINILM, engine_info=AMX_ENGINE)
    assert not laptop.rejected and laptop.decision.quant == "Q8_0"


def test_override_wins_and_is_reported(profiles) -> None:
    override = override_from(
        flags={"quant": "Q4_0", "threads": None},
        environ={"EDGE_AGENT_THREADS": "2", "EDGE_AGENT_QUANT": "F16"},
        config={"threads": 6, "batch_tokens": 128, "max_context": 128},
        config_name="/etc/edge-agent.toml",
    )
    assert (override.quant, override.threads, override.batch_tokens) == ("Q4_0", 2, 128)
    assert override.sources == {
        "quant": "flag --quant",
        "threads": "env EDGE_AGENT_THREADS",
        "batch_tokens": "/etc/edge-agent.toml",
        "max_context": "/etc/edge-agent.toml",
    }
    selection = select(load_host("x86-old-no-avx2"), profiles, MINILM, override=override)
    decision = selection.decision
    assert [c.quant for c in selection.candidates] == ["Q4_0"]  # no silent fallback
    assert (decision.threads, decision.batch_tokens, decision.max_context) == (2, 128, 128)
    assert decision.basis == "override"
    assert any(
        "quant=Q4_0 (flag --quant)" in r and "threads=2 (env EDGE_AGENT_THREADS)" in r
        for r in selection.reasons
    )
    assert selection.to_json()["overrides"]["quant"] == "flag --quant"


def test_override_of_profile_and_threads_beyond_the_quota(profiles) -> None:
    host = load_host("container-1.5cpu-512mb")
    selection = select(
        host, profiles, MINILM, override=Override(profile="generic", threads=4, sources={})
    )
    assert selection.profile.name == "generic" and selection.decision.threads == 4
    assert any("exceed the 1 usable CPUs" in n for n in selection.decision.notes)


def test_bad_override_values_are_typed_errors(profiles) -> None:
    with pytest.raises(InvalidArgument, match="env EDGE_AGENT_THREADS: threads must be an int"):
        override_from(environ={"EDGE_AGENT_THREADS": "many"})
    with pytest.raises(InvalidArgument, match=r"threads \(flag --threads\) must be an integer"):
        override_from(flags={"threads": 0})
    with pytest.raises(InvalidArgument, match="unknown setting"):
        override_from(config={"quantization": "Q8_0"})
    with pytest.raises(ModelNotFound, match="has no Q2_K file"):
        select(load_host("rpi4-4gb"), profiles, MINILM, override=override_from({"quant": "Q2_K"}))


def test_memory_guard_refuses_with_how_much_is_needed(profiles) -> None:
    with pytest.raises(InsufficientMemory) as caught:
        select(load_host("rpi4-4gb"), profiles, BIG)
    error = caught.value
    assert "smallest, Q4_K_M, needs 4." in error.message and "budget is 2.99 GiB" in error.message
    assert error.data["needed"] > error.data["budget"] > 0
    assert error.data["needed"] > BIG.files["Q4_K_M"].size  # file + compute buffers


def test_memory_guard_picks_what_fits(profiles) -> None:
    selection = select(load_host("rpi5-8gb"), profiles, BIG)
    assert [c.quant for c in selection.candidates] == ["Q4_K_M"]
    rejected = dict(selection.rejected)
    assert set(rejected) == {"Q8_0", "F16"} and "over the budget of 7.02 GiB" in rejected["Q8_0"]
    # Less free memory than the probe saw: nothing fits any more.
    with pytest.raises(InsufficientMemory):
        select(load_host("rpi5-8gb"), profiles, BIG, available_memory=2 * GIB)


def test_memory_guard_applies_to_an_overridden_quant(profiles) -> None:
    with pytest.raises(InsufficientMemory, match="requested by flag --quant"):
        select(load_host("rpi5-8gb"), profiles, BIG, override=override_from({"quant": "Q8_0"}))


def test_estimate_grows_with_batch_and_without_flash_attention() -> None:
    small = estimate_memory(0, 384, 512, 64, True)
    assert estimate_memory(0, 384, 2048, 64, True) > small
    assert estimate_memory(0, 384, 512, 64, False) > small
    # Calibration: at least llama.cpp's own buffers for MiniLM (7.6 MiB output + 5.9 MiB
    # compute at 512 tokens with flash attention, 17.6 MiB compute without).
    assert small >= (7.6 + 5.9) * MIB
    assert estimate_memory(0, 384, 512, 64, False) >= (7.6 + 17.6) * MIB


def test_known_bad_files_are_skipped_and_all_bad_refuses(profiles) -> None:
    host = load_host("x86-avx2-laptop")
    bad = {MINILM.files["Q8_0"].sha256: "killed by SIGSEGV"}
    selection = select(host, profiles, MINILM, bad=bad)
    assert selection.decision.quant == "F32"
    assert dict(selection.rejected)["Q8_0"].endswith("killed by SIGSEGV")
    everything = {f.sha256: "crash" for f in MINILM.files.values()}
    with pytest.raises(NoUsableModel) as caught:
        select(host, profiles, MINILM, bad=everything)
    assert "Q8_0: failed its self-test" in caught.value.message


def measured(quant: str, texts_per_s: float, cosine: float, **extra) -> Measurement:
    return Measurement(
        sha256=MINILM.files[quant].sha256,
        quant=quant,
        threads=extra.pop("threads", 2),
        batch_tokens=extra.pop("batch_tokens", 512),
        max_sequences=64,
        texts_per_s=texts_per_s,
        cosine_min=cosine,
        cosine_mean=cosine,
        **extra,
    )


def test_measured_speed_beats_the_static_order(profiles) -> None:
    host = load_host("x86-avx2-laptop")  # profile order: Q8_0, F32, F16, ...
    measurements = [
        measured("Q8_0", 100.0, 0.9995),
        measured("Q4_K_M", 160.0, 0.985, threads=3, batch_tokens=256),
        measured("F16", 120.0, 0.99999),
        measured("Q4_0", 400.0, 0.93),  # fastest, but below the profile's quality floor
    ]
    selection = select(host, profiles, MINILM, measurements=measurements)
    order = [c.quant for c in selection.candidates]
    assert order[:3] == ["Q4_K_M", "F16", "Q8_0"]  # measured, fastest first
    assert order[3:6] == ["F32", "Q6_K", "Q5_K_M"]  # unmeasured, in the profile's order
    assert order[-1] == "Q4_0"  # last resort
    lead = selection.decision
    assert (lead.basis, lead.threads, lead.batch_tokens) == ("measured", 3, 256)
    assert "160 texts/s" in lead.notes[0]
    assert "below the profile's floor" in selection.candidates[-1].notes[-1]


def test_within_tolerance_the_more_precise_quant_wins(profiles) -> None:
    host = load_host("x86-avx2-laptop")
    measurements = [measured("Q8_0", 100.0, 0.9995), measured("F32", 97.0, 1.0)]
    selection = select(host, profiles, MINILM, measurements=measurements)
    assert [c.quant for c in selection.candidates[:2]] == ["F32", "Q8_0"]
    assert any("within 5% of the fastest (Q8_0)" in r for r in selection.reasons)


def test_measured_threads_are_capped_by_the_quota_and_memory_as_measured(profiles) -> None:
    host = load_host("container-1.5cpu-512mb")
    measurements = [measured("Q8_0", 100.0, 0.9995, threads=4, rss_bytes=300 * MIB)]
    decision = select(host, profiles, MINILM, measurements=measurements).decision
    assert decision.threads == 1 and decision.memory_needed == 300 * MIB
    too_big = [measured("Q8_0", 100.0, 0.9995, rss_bytes=400 * MIB)]  # budget is 352 MiB
    selection = select(host, profiles, MINILM, measurements=too_big)
    assert selection.decision.quant == "Q6_K" and "Q8_0" in dict(selection.rejected)


def test_the_collections_quant_is_preferred_but_not_pinned(profiles) -> None:
    host = load_host("x86-avx2-laptop")
    measurements = [measured("Q8_0", 100.0, 0.9995), measured("F16", 150.0, 0.99999)]
    why = "collections docs were embedded with it"
    selection = select(host, profiles, MINILM, measurements=measurements, prefer=("Q8_0", why))
    order = [c.quant for c in selection.candidates]
    assert order[:2] == ["Q8_0", "F16"]  # preferred first, the faster one kept as a fallback
    assert len(order) == len(MINILM.files)
    assert f"preferred Q8_0: {why}" in selection.reasons
    # A known-bad file is not preferred: the reason says so and the usual order applies.
    bad = {MINILM.files["Q8_0"].sha256: "crashed"}
    skipped = select(
        host, profiles, MINILM, measurements=measurements, bad=bad, prefer=("Q8_0", why)
    )
    assert skipped.decision.quant == "F16"
    assert any(r.startswith("cannot prefer Q8_0") for r in skipped.reasons)
    # The user's override still wins over the collections.
    pinned = select(
        host,
        profiles,
        MINILM,
        override=Override(quant="F32", sources={"quant": "flag"}),
        prefer=("Q8_0", why),
    )
    assert [c.quant for c in pinned.candidates] == ["F32"]


def test_without_moves_to_the_next_candidate(profiles) -> None:
    selection = select(load_host("x86-avx2-laptop"), profiles, MINILM)
    after = selection.without("Q8_0", "self-test crash")
    assert after.decision.quant == "F32" and after.rejected[-1] == ("Q8_0", "self-test crash")


def test_tuning_round_trip_and_selection_uses_it(model_store: ModelStore, tmp_path: Path) -> None:
    """A short real tuning run of the default model, stored, reloaded and used by select."""
    host, profiles_ = probe_host(), load_profiles()
    engine = engine_build()
    result = tune(
        model_store,
        DEFAULT_MODEL,
        state_dir=tmp_path,
        budget_s=10.0,
        host=host,
        profiles=profiles_,
        quants=("F32", "Q8_0", "Q4_0"),
        engine=engine,
        show_progress=False,
    )
    assert result.seconds < 10.0 + 6.0  # the budget plus the worker's grace
    by_quant = {m.quant: m for m in result.measurements}
    assert set(by_quant) == {"F32", "Q8_0", "Q4_0"}
    assert by_quant["F32"].cosine_min == pytest.approx(1.0, abs=1e-5)  # the reference
    assert by_quant["Q8_0"].cosine_min > 0.995 > by_quant["Q4_0"].cosine_min > 0.9
    assert all(m.texts_per_s > 0 and m.threads >= 1 for m in result.measurements)

    stored = TuningStore(tmp_path / TUNING_FILE).measurements(engine, host.cpu_id)
    assert sorted(stored, key=repr) == sorted(result.measurements, key=repr)
    assert TuningStore(tmp_path / TUNING_FILE).measurements("another engine", host.cpu_id) == []

    manifest = model_store.get(DEFAULT_MODEL)
    selection = select(host, profiles_, manifest, measurements=stored, engine_info=engine)
    lead = selection.decision
    assert lead.basis == "measured" and lead.quant in ("F32", "Q8_0")
    best = max(
        (m for m in stored if m.cosine_min >= selection.profile.min_cosine),
        key=lambda m: m.texts_per_s,
    )
    chosen = max((m for m in stored if m.quant == lead.quant), key=lambda m: m.texts_per_s)
    assert chosen.texts_per_s >= best.texts_per_s * 0.95
    assert lead.threads == chosen.threads and lead.batch_tokens == chosen.batch_tokens
    if by_quant["Q4_0"].cosine_min < selection.profile.min_cosine:
        assert selection.candidates[-1].quant == "Q4_0"
    print(result.table())


def test_measurement_json_round_trip() -> None:
    m = measured("Q8_0", 12.5, 0.999, rss_bytes=5, measured_at="2026-01-01T00:00:00+00:00")
    assert Measurement.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert dataclasses.asdict(m)["quant"] == "Q8_0"
