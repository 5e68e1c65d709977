"""The configuration layer: flag > environment > config file > hardware profile > default."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import (
    ENGINE_SETTINGS,
    SETTINGS,
    Flag,
    config_template,
    load_config,
    reference_table,
)
from edge_agent.embedding.embedder import EmbedderConfig
from edge_agent.errors import ConfigError, ErrorCode, InvalidArgument
from edge_agent.hardware.cpu import CpuInfo
from edge_agent.hardware.host import HostInfo
from edge_agent.index.config import IndexConfig
from edge_agent.options import ServeOptions, ServiceConfig
from edge_agent.selection.choose import Override
from edge_agent.selection.profiles import load_profiles

REPO = Path(__file__).resolve().parent.parent
PI4 = HostInfo(
    cpu=CpuInfo("Linux", "aarch64", "Cortex-A72", frozenset({"asimd"})),
    logical_cores=4,
    physical_cores=4,
    board="Raspberry Pi 4 Model B Rev 1.4",
    mem_total=4 << 30,
    mem_available=3 << 30,
)


@pytest.fixture(scope="module")
def profiles() -> Any:
    return load_profiles()


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def env_for(tmp_path: Path, **more: str) -> dict[str, str]:
    """A clean environment: nothing inherited from the developer's shell."""
    return {"EDGE_AGENT_HOME": str(tmp_path / "home"), **more}


# -- precedence ---------------------------------------------------------------------------------


def test_each_layer_wins_over_the_next_and_says_so(tmp_path: Path, profiles: Any) -> None:
    path = write(
        tmp_path,
        'quant = "Q4_0"\nthreads = 2\n[embedder]\nbatch_tokens = 128\n[index]\nef_search = 99\n',
    )
    env = env_for(tmp_path, EDGE_AGENT_CONFIG=str(path), EDGE_AGENT_THREADS="3")
    env["EDGE_AGENT_QUANT"] = "F16"
    config = load_config({"threads": 4}, env, with_profile=True, host=PI4, profiles=profiles)

    assert (config["threads"], config.source("threads")) == (4, "flag --threads")
    assert (config["quant"], config.source("quant")) == ("F16", "env EDGE_AGENT_QUANT")
    assert config["embedder.batch_tokens"] == 128
    assert config.source("embedder.batch_tokens") == f"file {path}"
    # Not set by the user: the Raspberry Pi 4 profile's values.
    assert config["embedder.max_sequences"] == 32
    assert config.source("embedder.max_sequences") == "profile raspberry-pi-4"
    assert (config["index.ef_search"], config["index.ef_construction"]) == (99, 100)
    assert config.source("index.ef_construction") == "profile raspberry-pi-4"
    assert (config["index.fsync"], config.source("index.fsync")) == ("always", "default")
    assert config.profile is not None and config.profile.name == "raspberry-pi-4"

    # Model selection gets exactly what the user pinned, with where it came from.
    override = config.override()
    assert override.given() == {"quant": "F16", "threads": 4, "batch_tokens": 128}
    assert override.sources == {
        "quant": "env EDGE_AGENT_QUANT",
        "threads": "flag --threads",
        "batch_tokens": f"file {path}",
    }


def test_serve_options_carry_the_settings(tmp_path: Path, profiles: Any) -> None:
    path = write(
        tmp_path,
        'socket = "run/agent.sock"\nsocket_mode = "0660"\nmodels_dir = "/srv/models"\n'
        'index_dir = "idx"\ntune_budget = 0\nlisten = "127.0.0.1:7878"\n'
        'token_file = "token"\nmetrics_listen = ":9464"\nauth_timeout = 2.5\n'
        '[limits]\nmax_queue = 17\nmax_message_bytes = "16MiB"\nshutdown_grace = 3\n'
        "[embedder]\nmax_texts = 9\nchunk_overlap = 4\nuse_mmap = false\n"
        '[index]\nfsync = "batch"\nbatch_window_ms = 250\nsnapshot_wal_records = 7\n',
    )
    env = env_for(tmp_path, EDGE_AGENT_TOKEN="t" * 20)
    options = load_config(
        {"index_dir": Path("/flag/index")},
        env,
        path,
        with_profile=True,
        host=PI4,
        profiles=profiles,
    ).serve_options()

    assert isinstance(options, ServeOptions)
    # Relative paths in the file are relative to the file; the flag wins for index_dir.
    assert options.socket_path == tmp_path / "run" / "agent.sock"
    assert options.socket_mode == 0o660
    assert options.index_dir == Path("/flag/index")
    assert options.models_dir == Path("/srv/models")
    assert options.auth_token_file == tmp_path / "token"
    assert options.auth_token is None  # the token file wins over EDGE_AGENT_TOKEN
    assert (options.listen, options.metrics_listen, options.auth_timeout) == (
        "127.0.0.1:7878",
        ":9464",
        2.5,
    )
    assert options.tune_budget_s is None  # 0 = no tuning
    assert (options.max_queue, options.max_message_bytes, options.shutdown_grace) == (
        17,
        16 << 20,
        3.0,
    )
    assert (options.embedder.max_texts, options.embedder.chunk_overlap) == (9, 4)
    assert options.embedder.use_mmap is False
    assert options.embedder.threads is None  # not pinned: selection decides
    assert options.index.fsync == "batch"
    assert (options.index.batch_window_ms, options.index.snapshot_wal_records) == (250, 7)
    # The profile's graph parameters reach the index when the user sets none.
    assert (options.index.m, options.index.ef_construction, options.index.ef_search) == (
        16,
        100,
        50,
    )
    assert options.override == Override(sources={})
    assert options.state_dir == tmp_path / "home" / "data" / "hardware"


def test_the_environment_token_is_used_without_a_token_file(tmp_path: Path) -> None:
    options = load_config({}, env_for(tmp_path, EDGE_AGENT_TOKEN="t" * 20)).serve_options()
    assert (options.auth_token, options.auth_token_file) == ("t" * 20, None)


def test_no_tune_flag_is_reported_by_its_name(tmp_path: Path) -> None:
    config = load_config({"tune_budget": Flag(0.0, "--no-tune")}, env_for(tmp_path))
    assert (config["tune_budget"], config.source("tune_budget")) == (0.0, "flag --no-tune")
    assert config.serve_options().tune_budget_s is None


def test_defaults_follow_edge_agent_home(tmp_path: Path) -> None:
    config = load_config({}, env_for(tmp_path))
    home = tmp_path / "home"
    assert config["socket"] == home / "run" / "edge-agent.sock"
    assert config["models_dir"] == home / "data" / "models"
    assert config["index_dir"] == home / "data" / "index"
    assert config.path == home / "config.toml" and not config.file_found
    # EDGE_AGENT_MODELS_DIR is the environment layer, not a different default.
    moved = load_config({}, env_for(tmp_path, EDGE_AGENT_MODELS_DIR="/m"))
    assert (moved["models_dir"], moved.source("models_dir")) == (
        Path("/m"),
        "env EDGE_AGENT_MODELS_DIR",
    )


# -- validation ---------------------------------------------------------------------------------


def test_errors_name_the_key_the_source_and_the_range(tmp_path: Path) -> None:
    path = write(tmp_path, "threads = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config({}, env_for(tmp_path, EDGE_AGENT_CONFIG=str(path)))
    assert info.value.code == ErrorCode.CONFIG_ERROR == 209
    assert info.value.message == (f"threads (file {path}) must be an integer in [1, 512], got 0")

    with pytest.raises(ConfigError) as info:
        load_config({}, env_for(tmp_path, EDGE_AGENT_INDEX_FSYNC="sometimes"))
    assert info.value.message == (
        'index.fsync (env EDGE_AGENT_INDEX_FSYNC) must be one of "always", "batch", "off",'
        " got 'sometimes'"
    )

    with pytest.raises(ConfigError, match=r"metrics_listen \(flag --metrics-listen\) must be HOST"):
        load_config({"metrics_listen": "localhost"}, env_for(tmp_path))


def test_a_broken_lower_layer_is_reported_even_when_a_flag_wins(tmp_path: Path) -> None:
    path = write(tmp_path, 'threads = "four"\n')
    with pytest.raises(ConfigError, match=r"threads \(file .*\) must be an integer"):
        load_config({"threads": 2}, env_for(tmp_path), path)


def test_every_problem_is_reported_at_once_with_did_you_mean(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'fsync = "batch"\ntreads = 2\n[index]\nfsnyc = "batch"\nef_search = 0\n[indx]\nm = 3\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config({}, env_for(tmp_path), path)
    message = info.value.message
    assert message.startswith("5 configuration errors:")
    assert f"unknown key 'fsync' in {path}; did you mean 'index.fsync'?" in message
    assert "unknown key 'treads'" in message and "did you mean 'threads'?" in message
    assert "unknown key 'index.fsnyc'" in message and "did you mean 'index.fsync'?" in message
    assert f"unknown table [indx] in {path}; did you mean 'index'?" in message
    assert "index.ef_search (file" in message and "[1, 65536], got 0" in message
    assert len(info.value.data["errors"]) == 5


def test_sizes_take_binary_units(tmp_path: Path) -> None:
    path = write(tmp_path, '[index]\nsnapshot_wal_bytes = "256 MiB"\n')
    assert load_config({}, env_for(tmp_path), path)["index.snapshot_wal_bytes"] == 256 << 20
    bad = write(tmp_path, '[index]\nsnapshot_wal_bytes = "256MB"\n', "bad.toml")
    with pytest.raises(ConfigError, match=r"index.snapshot_wal_bytes .* \[1024, 1 TiB\]"):
        load_config({}, env_for(tmp_path), bad)


def test_environment_booleans_and_lists(tmp_path: Path) -> None:
    env = env_for(
        tmp_path,
        EDGE_AGENT_ADVERTISE="yes",
        EDGE_AGENT_LISTEN="0.0.0.0:7878",
        EDGE_AGENT_ADVERTISE_INTERFACES="eth0, 192.168.1.5",
    )
    config = load_config({}, env)
    assert config["advertise"] is True
    assert config["advertise_interfaces"] == ("eth0", "192.168.1.5")
    with pytest.raises(ConfigError, match=r"EDGE_AGENT_ADVERTISE.*true or false"):
        load_config({}, env_for(tmp_path, EDGE_AGENT_ADVERTISE="maybe"))


def test_advertise_needs_listen(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"advertise \(env EDGE_AGENT_ADVERTISE\) needs listen"):
        load_config({}, env_for(tmp_path, EDGE_AGENT_ADVERTISE="1"))


def test_the_token_never_comes_from_the_file_and_is_never_shown(tmp_path: Path) -> None:
    path = write(tmp_path, 'token = "s3cret-token-value-123"\n')
    with pytest.raises(ConfigError, match="token cannot be set in a config file") as info:
        load_config({}, env_for(tmp_path), path)
    assert "s3cret" not in info.value.message

    secret = "s3cret-token-value-456"
    config = load_config({}, env_for(tmp_path, EDGE_AGENT_TOKEN=secret))
    assert config["token"] == secret
    assert secret not in config.table()
    assert secret not in json.dumps(config.to_json())
    assert config.to_json()["settings"]["token"]["value"] == "(hidden)"


def test_an_explicit_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({}, env_for(tmp_path, EDGE_AGENT_CONFIG=str(tmp_path / "absent.toml")))
    bad = write(tmp_path, "threads = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config({}, env_for(tmp_path), bad)


def test_a_misspelt_environment_variable_is_warned_about(tmp_path: Path) -> None:
    config = load_config({}, env_for(tmp_path, EDGE_AGENT_THRAEDS="2", EDGE_AGENT_SOAK="1"))
    assert config.warnings == (
        "environment variable EDGE_AGENT_THRAEDS is not a setting;"
        " did you mean EDGE_AGENT_THREADS?",
    )


# -- the schema agrees with the code it feeds and with the docs ---------------------------------


def _targets() -> dict[str, Any]:
    """Setting key -> a callable that builds the validated object from one value."""
    targets: dict[str, Any] = {}
    for setting in SETTINGS:
        section, name = setting.section, setting.name
        if section == "index":
            targets[setting.key] = lambda v, n=name: IndexConfig(**{n: v})
        elif section == "embedder":
            field = "max_sequence_tokens" if name == "max_context" else name
            targets[setting.key] = lambda v, f=field: EmbedderConfig(**{f: v})
    targets["threads"] = lambda v: (EmbedderConfig(threads=v), Override(threads=v))
    targets["limits.max_queue"] = lambda v: ServiceConfig(max_queue=v)
    for key, field_name in ENGINE_SETTINGS.items():
        targets[key] = lambda v, f=field_name: ServiceConfig(**{f: v})
    return targets


@pytest.mark.parametrize("key", sorted(_targets()))
def test_ranges_match_the_validators_they_feed(key: str, tmp_path: Path) -> None:
    setting = next(s for s in SETTINGS if s.key == key)
    build = _targets()[key]
    if setting.kind in ("int", "bytes", "float"):
        assert setting.low is not None and setting.high is not None
        low, high = setting.low, setting.high
        exclusive_low = key == "index.compact_deleted_ratio"
        step = 1 if setting.kind != "float" else 1e-9
        if not exclusive_low:
            build(int(low) if setting.kind != "float" else low)
        build(int(high) if setting.kind != "float" else high)
        below = low if exclusive_low else low - step
        for outside in (below, high + step):
            value = int(outside) if setting.kind != "float" else outside
            with pytest.raises(InvalidArgument):
                build(value)
            env = env_for(tmp_path, **{setting.env: str(value)}) if setting.env else None
            if env is not None:
                with pytest.raises(ConfigError, match=re.escape(setting.key)):
                    load_config({}, env)
    elif setting.kind == "choice":
        for choice in setting.choices:
            build(choice)
    elif setting.kind == "bool":
        build(True)
        build(False)


def test_every_option_of_the_daemon_is_a_setting() -> None:
    keys = {s.key for s in SETTINGS}
    index_fields = {f.name for f in dataclasses.fields(IndexConfig)}
    assert {f"index.{name}" for name in index_fields} <= keys
    # Chosen per file by model selection (override > measured > profile), not plain settings.
    selected = {"threads", "flash_attention", "use_mlock", "max_sequence_tokens"}
    embedder_fields = {f.name for f in dataclasses.fields(EmbedderConfig)} - selected
    assert {f"embedder.{name}" for name in embedder_fields} <= keys
    internal = {
        "isolate_engine", "select_model", "override", "quant", "embedder", "index", "service"
    }
    renamed = {
        "socket_path": "socket",
        "auth_token_file": "token_file",
        "auth_token": "token",
        "tune_budget_s": "tune_budget",
        "max_message_bytes": "limits.max_message_bytes",
        "max_connections": "limits.max_connections",
        "max_queue": "limits.max_queue",
        "shutdown_grace": "limits.shutdown_grace",
        "http_listen": "http",
    }
    for option in dataclasses.fields(ServeOptions):
        if option.name not in internal:
            assert renamed.get(option.name, option.name) in keys, option.name


def test_environment_variable_names_are_unique() -> None:
    names = [s.env for s in SETTINGS if s.env]
    assert len(names) == len(set(names)) == len(SETTINGS)


def test_the_docs_list_every_key_as_the_code_does() -> None:
    docs = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert reference_table() in docs, "regenerate the table: python -m edge_agent.config"


def test_the_template_uncommented_is_a_valid_config_of_the_defaults(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    template = config_template(environ=env)
    # Commented out, it changes nothing.
    path = write(tmp_path, template)
    assert all(v.layer == "default" for v in load_config({}, env, path).values.values())
    # Uncommented, every line is valid and gives the default (or the shown example).
    uncommented = "\n".join(
        line[2:] if re.match(r"^# [a-z_]+ = ", line) else line for line in template.splitlines()
    )
    full = write(tmp_path, uncommented, "full.toml")
    config = load_config({}, env, full)
    defaults = load_config({}, env)
    for setting in SETTINGS:
        value = config.values[setting.key]
        if not setting.in_file:
            continue
        assert value.layer == "file", setting.key
        if defaults[setting.key] is not None:
            assert value.value == defaults[setting.key], setting.key


# -- the command line ---------------------------------------------------------------------------


def run_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_config_show_json_reports_values_and_sources(tmp_path: Path) -> None:
    path = write(tmp_path, '[index]\nfsync = "batch"\n')
    env = env_for(tmp_path, EDGE_AGENT_CONFIG=str(path), EDGE_AGENT_MAX_QUEUE="99")
    result = run_cli("config", "show", "--json", "--threads", "3", env=env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    settings = shown["settings"]
    assert shown["config_file"] == str(path) and shown["config_file_found"] is True
    assert settings["index.fsync"] == {"value": "batch", "source": f"file {path}", "layer": "file"}
    assert settings["limits.max_queue"]["source"] == "env EDGE_AGENT_MAX_QUEUE"
    assert settings["threads"]["value"] == 3 and settings["threads"]["layer"] == "flag"
    assert settings["profile"]["layer"] == "profile" and shown["profile"]

    table = run_cli("config", "show", env=env)
    assert table.returncode == 0, table.stderr
    line = next(x for x in table.stdout.splitlines() if x.startswith("index.fsync "))
    assert line.split() == ["index.fsync", "batch", "file", str(path)]


def test_config_errors_exit_2_with_the_message(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_queue = 0\n")
    result = run_cli("--config", str(path), "config", "show", env=env_for(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"edge-agent: error 209 CONFIG_ERROR: limits.max_queue (file {path}) must be an"
        " integer in [1, 1 000 000], got 0"
    )


def test_config_path_follows_flag_then_environment(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    assert run_cli("config", "path", env=env).stdout.strip() == str(
        tmp_path / "home" / "config.toml"
    )
    env["EDGE_AGENT_CONFIG"] = str(tmp_path / "from-env.toml")
    assert run_cli("config", "path", env=env).stdout.strip() == str(tmp_path / "from-env.toml")
    flagged = run_cli("--config", str(tmp_path / "flag.toml"), "config", "path", env=env)
    assert flagged.stdout.strip() == str(tmp_path / "flag.toml")


def test_config_init_writes_a_template_once(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    first = run_cli("config", "init", env=env)
    assert first.returncode == 0, first.stderr
    written = tmp_path / "home" / "config.toml"
    assert written.read_text(encoding="utf-8").startswith("# edge-agent configuration.")
    second = run_cli("config", "init", env=env)
    assert second.returncode == 2 and "exists; add --force" in second.stderr


def test_every_command_uses_the_configured_paths(tmp_path: Path) -> None:
    """The config file's models_dir reaches `models list`, like it reaches the daemon."""
    models = tmp_path / "configured-models"
    path = write(tmp_path, f'models_dir = "{models}"\n')
    result = run_cli("--config", str(path), "models", "list", env=env_for(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip() == f"no models in {models} (run: edge-agent models prepare-default)"
    )


def _field_default(cls: type, name: str) -> Any:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    assert field.default_factory is not dataclasses.MISSING, name
    return field.default_factory()


def test_settings_state_the_defaults_of_the_dataclasses_they_feed() -> None:
    """The dataclasses hold each default (docs/architecture.md, "Defaults"); the settings
    table repeats it for `config show` and the template without importing them, so any drift
    fails here."""
    from edge_agent.config import ENGINE_SETTINGS, SETTINGS

    serve = {
        "tune_budget": "tune_budget_s",
        "auth_timeout": "auth_timeout",
        "first_byte_timeout": "first_byte_timeout",
        "max_preauth_connections": "max_preauth_connections",
        "max_preauth_per_source": "max_preauth_per_source",
        "idle_timeout": "idle_timeout",
        "advertise": "advertise",
        "advertise_interfaces": "advertise_interfaces",
        "limits.max_message_bytes": "max_message_bytes",
        "limits.max_connections": "max_connections",
        "limits.max_queue": "max_queue",
        "limits.shutdown_grace": "shutdown_grace",
    }
    embedder = {
        "embedder.batch_tokens": "batch_tokens",
        "embedder.max_sequences": "max_sequences",
        "embedder.max_context": "max_sequence_tokens",
        "embedder.solo_tokens": "solo_tokens",
        "embedder.chunk_overlap": "chunk_overlap",
        "embedder.max_texts": "max_texts",
        "embedder.max_text_bytes": "max_text_bytes",
        "embedder.use_mmap": "use_mmap",
        "embedder.adaptive_threads": "adaptive_threads",
    }
    checked = 0
    for setting in SETTINGS:
        key = setting.key
        if key in serve:
            target = _field_default(ServeOptions, serve[key])
        elif key in embedder:
            target = _field_default(EmbedderConfig, embedder[key])
        elif key in ENGINE_SETTINGS:
            target = _field_default(ServiceConfig, ENGINE_SETTINGS[key])
        elif setting.section == "index":
            target = _field_default(IndexConfig, setting.name)
        elif key == "socket_mode":
            assert int(setting.default, 8) == _field_default(ServeOptions, "socket_mode")
            checked += 1
            continue
        else:
            continue
        assert setting.default == target, (key, setting.default, target)
        checked += 1
    assert checked >= 40
    # The engine scheduler's queue bound and the daemon's are one value.
    assert _field_default(ServeOptions, "max_queue") == _field_default(ServiceConfig, "max_queue")
