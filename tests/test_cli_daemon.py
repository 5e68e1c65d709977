"""The client half of the CLI against a real daemon: add (files, JSONL, stdin), search, delete,
collections, stats, health, token — each run as a real `edge-agent` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import ServerThread, options_for

from edge_agent.ingest import chunk_text, read_jsonl
from edge_agent.models import ModelStore

TOKEN = "cli-token-0123456789abcdef"


@pytest.fixture(scope="module")
def daemon(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("cli") / "run" / "edge-agent.sock"
    options = options_for(model_store, path, listen="127.0.0.1:0", auth_token=TOKEN)
    thread = ServerThread(options).start()
    yield thread
    thread.stop()


def run_cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_chunking_keeps_paragraphs_and_limits() -> None:
    text = "First para.\n\nSecond para is here.\n\n\n" + ("Long sentence here. " * 30)
    chunks = chunk_text(text, 120)
    assert chunks[0] == "First para.\n\nSecond para is here."
    assert all(0 < len(c) <= 120 for c in chunks)
    assert " ".join(" ".join(c.split()) for c in chunks).count("Long sentence here.") == 30
    # A single unbroken token longer than the limit is cut, not lost.
    assert "".join(chunk_text("x" * 250, 100)) == "x" * 250


def test_jsonl_errors_name_the_line() -> None:
    from edge_agent.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"f\.jsonl:2"):
        list(read_jsonl(['{"id": "a", "text": "ok"}', '{"text": "no id"}'], "f.jsonl"))
    with pytest.raises(InvalidArgument, match=r"f\.jsonl:1: not JSON"):
        list(read_jsonl(["{nope"], "f.jsonl"))


def test_add_search_delete_over_the_socket(daemon: ServerThread, tmp_path: Path) -> None:
    sock = str(daemon.socket_path)
    notes = tmp_path / "notes.txt"
    notes.write_text(
        "The backup job runs every night at two.\n\n"
        "Solar panels charge the battery during the day.\n"
    )
    records = tmp_path / "faq.jsonl"
    records.write_text(
        json.dumps(
            {
                "id": "faq-1",
                "text": "Reset the router by holding its button.",
                "metadata": {"kind": "faq", "n": 1},
            }
        )
        + "\n"
        + json.dumps(
            {
                "id": "faq-2",
                "text": "Passwords expire after ninety days.",
                "metadata": {"kind": "faq", "n": 2},
            }
        )
        + "\n"
    )
    added = run_cli("add", "docs", str(notes), str(records), "--connect", sock)
    assert added.returncode == 0, added.stderr
    assert "added 3 documents to docs" in added.stdout  # notes.txt is one chunk of 2 paragraphs
    # stdin, plain lines: one document each, ids from content (re-adding does not duplicate)
    for _ in range(2):
        lines = run_cli("add", "docs", "--connect", sock, stdin="Tea is served at four.\n\n")
        assert lines.returncode == 0, lines.stderr
    found = run_cli(
        "search",
        "docs",
        "when",
        "does",
        "the",
        "router",
        "reset",
        "--json",
        "-k",
        "2",
        "--connect",
        sock,
    )
    assert found.returncode == 0, found.stderr
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert hits[0]["id"] == "faq-1" and hits[0]["metadata"] == {"kind": "faq", "n": 1}
    filtered = run_cli("search", "docs", "router", "--filter", "n=2", "--json", "--connect", sock)
    assert [json.loads(x)["id"] for x in filtered.stdout.splitlines()] == ["faq-2"]
    table = run_cli("search", "docs", "tea time", "--connect", sock)
    assert "Tea is served at four." in table.stdout.splitlines()[0]
    listed = run_cli("collections", "--connect", sock)
    assert listed.returncode == 0 and "docs" in listed.stdout and "4 docs" in listed.stdout
    deleted = run_cli("delete", "docs", "faq-1", "missing", "--connect", sock)
    assert "deleted 1 of 2" in deleted.stdout
    again = run_cli("search", "docs", "router", "--json", "--connect", sock)
    assert "faq-1" not in again.stdout


def test_search_modes_and_full_filters_from_the_command_line(
    daemon: ServerThread, tmp_path: Path
) -> None:
    sock = str(daemon.socket_path)
    records = tmp_path / "modes.jsonl"
    records.write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                {
                    "id": "e1",
                    "text": "Error E4021 means the disk quota is full",
                    "metadata": {"y": 2023},
                },
                {"id": "e2", "text": "Cats sleep most of the day", "metadata": {"y": 2019}},
                {"id": "e3", "text": "向量检索让搜索更准确", "metadata": {"y": 2024}},
            )
        )
        + "\n"
    )
    assert run_cli("add", "modes", str(records), "--connect", sock).returncode == 0
    keyword = run_cli("search", "modes", "E4021", "--mode", "keyword", "--json", "--connect", sock)
    assert keyword.returncode == 0, keyword.stderr
    assert [json.loads(x)["id"] for x in keyword.stdout.splitlines()] == ["e1"]
    cjk = run_cli("search", "modes", "向量检索", "--mode", "keyword", "--json", "--connect", sock)
    assert [json.loads(x)["id"] for x in cjk.stdout.splitlines()] == ["e3"]
    explained = run_cli("search", "modes", "E4021 quota", "--explain", "-k", "1", "--connect", sock)
    assert explained.returncode == 0 and "(dense " in explained.stdout and "e1" in explained.stdout
    ranged = run_cli(
        "search", "modes", "anything", "--where", '{"y": {"gte": 2020, "lt": 2024}}',
        "--mode", "dense", "--json", "--connect", sock,
    )  # fmt: skip
    assert [json.loads(x)["id"] for x in ranged.stdout.splitlines()] == ["e1"]
    bad = run_cli("search", "modes", "x", "--where", '{"y": {"near": 1}}', "--connect", sock)
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr


def test_bad_input_exits_2_with_the_code(daemon: ServerThread, tmp_path: Path) -> None:
    sock = str(daemon.socket_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    result = run_cli("add", "docs2", str(bad), "--connect", sock)
    assert result.returncode == 2
    assert "error 100 INVALID_ARGUMENT" in result.stderr and "bad.jsonl:1" in result.stderr
    missing = run_cli("search", "nope", "x", "--connect", sock)
    assert missing.returncode == 2 and "600 COLLECTION_NOT_FOUND" in missing.stderr
    drop = run_cli("collections", "drop", "docs2", "--connect", sock)
    assert drop.returncode == 2 and "--yes" in drop.stderr


def test_collections_lifecycle_and_tcp_with_token(daemon: ServerThread, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    tcp = daemon.tcp_address
    made = run_cli("collections", "create", "c1", "--connect", tcp, "--token-file", str(token_file))
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["name"] == "c1"
    refused = run_cli("collections", "--connect", tcp, env={"EDGE_AGENT_TOKEN": ""})
    assert refused.returncode == 2 and "406 AUTH_REQUIRED" in refused.stderr
    by_env = run_cli("collections", "info", "c1", "--connect", tcp, env={"EDGE_AGENT_TOKEN": TOKEN})
    assert by_env.returncode == 0 and json.loads(by_env.stdout)["count"] == 0
    dropped = run_cli(
        "collections", "drop", "c1", "--yes", "--connect", tcp, env={"EDGE_AGENT_TOKEN": TOKEN}
    )
    assert dropped.returncode == 0


def test_health_stats_and_token(daemon: ServerThread, tmp_path: Path) -> None:
    sock = str(daemon.socket_path)
    healthy = run_cli("health", "--connect", sock)
    assert healthy.returncode == 0 and healthy.stdout.strip() == "ok"
    down = run_cli("health", "--connect", str(tmp_path / "nothing.sock"))
    assert down.returncode == 1 and "unhealthy" in down.stderr
    stats = run_cli("stats", "--connect", sock)
    assert stats.returncode == 0
    assert "search" in json.loads(stats.stdout)["methods"]
    first, second = run_cli("token").stdout.strip(), run_cli("token").stdout.strip()
    assert len(first) >= 40 and first != second


def test_long_files_are_chunked_to_the_model_window(daemon: ServerThread, tmp_path: Path) -> None:
    sock = str(daemon.socket_path)
    paragraphs = [
        f"Paragraph {i} explains how the pump number {i} is serviced every spring. " * 3
        for i in range(30)
    ]
    manual = tmp_path / "manual.txt"
    manual.write_text("\n\n".join(paragraphs))
    result = run_cli("add", "manuals", str(manual), "--connect", sock)
    assert result.returncode == 0, result.stderr
    added = int(result.stdout.split()[1])
    # 3 x 256 characters a chunk: every paragraph kept, nothing cut to the model's window.
    assert len(manual.read_text()) / 768 <= added <= len(paragraphs)
    assert "truncated" not in result.stdout
    hits = run_cli("search", "manuals", "pump 17 spring service", "--json", "--connect", sock)
    top = json.loads(hits.stdout.splitlines()[0])
    assert "pump number 17" in top["text"] and top["metadata"]["source"] == str(manual)
