"""edge-agent's daemon against llama.cpp's own llama-server (/v1/embeddings), side by side.

    python bench/llama_server_bench.py [--quant Q8_0] [--threads 2] [--texts 256] [--rounds 3]
        [--models-dir DIR --model NAME]

llama-server is built once from the llama.cpp that edge-agent's pinned llama-cpp-python sdist
vendors (the same engine version), with the same CPU flags as edge-agent's engine
(packaging/build_engine.py), and cached in ~/.cache/edge-agent/llama-server/<hash>/ (about
6-8 minutes of compiling on 2 cores the first time; progress is printed). Both servers load
the same GGUF file with the same threads, batch size and flash attention, and get the same
texts; rounds alternate the two, so both see the same disturbances, and the best round counts.

Workloads: one client sending one text per request back to back; 16 clients doing the same
(dynamic batching); one client sending 64 texts per request. Clients are threads in this
process: edge-agent's blocking ``Client`` (MessagePack over the Unix socket, vectors as
float32 bytes), and ``http.client`` keep-alive connections posting the OpenAI-style JSON that
llama-server speaks. Also reported: CPU seconds per 1,000 texts and peak RSS of each server's
processes (edge-agent: daemon + engine child), and the cosine between the two servers'
vectors for the same texts (same engine, same file: it should be 1.000).

``--model NAME`` serves another model of the store (``--models-dir``), e.g. the Qwen3-0.6B
shape of bench/qwen3_bench.py (``--models-dir ~/.cache/edge-agent/bench/store --model
qwen3-0.6b-shape --texts 32 --rounds 1``: it embeds ~2 texts/s). llama-server then gets the
pooling from the model's manifest and, for a decoder (last-token pooling), what our engine
uses: a 512-token context shared by the slots (``-kvu``), a q8_0 KV cache, 256-token
micro-batches (embedding/engine.py). Its llama.cpp is the vendored one without
packaging/patches/: it still reserves the vocabulary x outputs logits buffer.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import (
    REPO,
    add_common_args,
    load_sts,
    machine_summary,
    markdown_table,
    open_store,
    unique_sentences,
)
from serve_bench import percentile, start_daemon

from edge_agent.client import Client

sys.path.insert(0, str(REPO / "packaging"))
import build_engine  # packaging/build_engine.py: the engine pin and its flags

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-agent"


# -- building llama-server ------------------------------------------------------------------------


def _step(message: str) -> None:
    print(f"[llama-server] {message}", file=sys.stderr, flush=True)


def build_llama_server() -> Path:
    """The llama-server binary for the pinned llama.cpp and this CPU's flags (built once)."""
    name, version = build_engine.LLAMA
    flags = build_engine.llama_cmake_flags(portable=False)
    key = hashlib.sha256(f"{name}\n{version}\n{flags}".encode()).hexdigest()[:16]
    home = CACHE / "llama-server" / f"{version}-{key}"
    binary = home / "llama-server"
    if binary.is_file():
        return binary
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        work = Path(tmp)
        _step(f"downloading the {name} {version} sdist (its vendored llama.cpp)")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", f"{name}=={version}", "-d", str(work)],
            check=True,
        )  # fmt: skip
        sdist = next(work.glob("*.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        build = work / "build"
        # No web UI (it would be downloaded), no curl, static: one self-contained binary.
        configure = [
            "cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
            *[f for f in flags.split() if f.startswith("-DGGML_")],
        ]  # fmt: skip
        _step("configuring: " + " ".join(configure[3:]))
        log_path = home / "build.log"
        with log_path.open("w") as log:
            subprocess.run(configure, check=True, stdout=log, stderr=subprocess.STDOUT)
            jobs = str(os.cpu_count() or 2)
            command = ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs]
            _step(f"compiling (several minutes; full log in {log_path})")
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert proc.stdout is not None
            last = ""
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace")
                log.write(line)
                if line.startswith("[") and "%]" in line[:8] and line[:6] != last:
                    last = line[:6]
                    _step(f"compiling {line[:6].strip()}")
            if proc.wait() != 0:
                raise SystemExit(f"building llama-server failed; see {log_path}")
        built = next(build.rglob("llama-server"))
        shutil.copy2(built, binary)
    _step(f"built {binary}")
    return binary


# -- the servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_llama_server(
    binary: Path, gguf: Path, threads: int, port: int, log_path: Path, pooling: str = "mean"
) -> subprocess.Popen:
    if pooling == "last":  # a decoder, sized as our engine sizes it (embedding/engine.py)
        context = ["-c", "512", "-kvu", "-b", "512", "-ub", "256", "-ctk", "q8_0", "-ctv", "q8_0"]
    else:  # an encoder: no KV cache; 16 slots of 512 tokens, one batch
        context = ["-c", "8192", "-b", "512", "-ub", "512"]
    command = [
        str(binary), "-m", str(gguf), "--embeddings", "--pooling", pooling,
        "-t", str(threads), "-tb", str(threads), "-np", "16", *context, "-fa", "on",
        "--no-webui", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = log_path.open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited ({proc.returncode}); see {log_path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"llama-server did not become healthy; see {log_path}")


class LlamaServerClient:
    """/v1/embeddings over one keep-alive HTTP connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def embed(self, texts: list[str]) -> np.ndarray:
        body = json.dumps({"input": texts, "model": "bench"})
        self.conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"llama-server answered {response.status}: {payload[:200]!r}")
        data = json.loads(payload)["data"]
        return np.asarray([item["embedding"] for item in data], dtype=np.float32)

    def close(self) -> None:
        self.conn.close()


class EdgeAgentClient:
    def __init__(self, socket_path: Path) -> None:
        self.client = Client(socket_path, timeout=120)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.client.embed(texts).vectors

    def close(self) -> None:
        self.client.close()


# -- measuring ------------------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (the daemon's engine child)."""
    out = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for text in child.read_text().split():
            out.extend(tree_pids(int(text)))
    return out


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def peak_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total / 1024


def run_pass(
    make: Callable[[], object], texts: list[str], clients: int, per_request: int
) -> tuple[float, list[float]]:
    """``clients`` threads share ``texts`` round-robin, ``per_request`` texts a request."""
    connections = [make() for _ in range(clients)]
    for c in connections:
        c.embed(["warm"])  # type: ignore[attr-defined]
    latencies: list[float] = []
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        mine = texts[index::clients]
        client = connections[index]
        barrier.wait()
        try:
            for start in range(0, len(mine), per_request):
                t0 = time.perf_counter()
                client.embed(mine[start : start + per_request])  # type: ignore[attr-defined]
                latencies.append((time.perf_counter() - t0) * 1000)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    for c in connections:
        c.close()  # type: ignore[attr-defined]
    if errors:
        raise errors[0]
    return len(texts) / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--quant", default="Q8_0")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="a model of the store")
    args = parser.parse_args()
    began = time.perf_counter()
    binary = build_llama_server()

    store = open_store(args.models_dir)
    resolved = store.resolve(args.model, args.quant)
    gguf, pooling = resolved.path, store.get(args.model).pooling
    sentences = unique_sentences(load_sts(args.data_dir))
    order = np.random.default_rng(0).permutation(len(sentences))
    texts = [sentences[i] for i in order[: args.texts]]
    workloads = [("1 client, 1 text/request", 1, 1), ("16 clients, 1 text/request", 16, 1),
                 ("1 client, 64 texts/request", 1, 64)]  # fmt: skip

    print(machine_summary())
    print(
        f"model {args.model} {args.quant} ({gguf.name}, {pooling} pooling), {args.threads}"
        f" threads, batch 512, flash attention on; {len(texts)} STS sentences per pass,"
        f" best of {args.rounds}\n"
    )
    with tempfile.TemporaryDirectory(prefix="llama-server-bench-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        llama = start_llama_server(
            binary, gguf, args.threads, port, workdir / "llama.log", pooling
        )
        daemon = start_daemon(args, workdir, store.root, args.model)
        socket_path = workdir / "agent.sock"
        makers: dict[str, tuple[Callable[[], object], int]] = {
            "edge-agent": (lambda: EdgeAgentClient(socket_path), daemon.pid),
            "llama-server": (lambda: LlamaServerClient(port), llama.pid),
        }
        try:
            ours = EdgeAgentClient(socket_path)
            theirs = LlamaServerClient(port)
            a, b = ours.embed(texts[:32]), theirs.embed(texts[:32])
            ours.close()
            theirs.close()
            cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            best: dict[tuple[str, str], tuple[float, list[float]]] = {}
            cpu: dict[str, list[float]] = {name: [0.0, 0.0] for name in makers}  # s, texts
            for round_number in range(args.rounds):
                names = list(makers) if round_number % 2 == 0 else list(reversed(makers))
                for label, clients, per_request in workloads:
                    for name in names:
                        make, pid = makers[name]
                        pids = tree_pids(pid)
                        before = cpu_seconds(pids)
                        result = run_pass(make, texts, clients, per_request)
                        cpu[name][0] += cpu_seconds(pids) - before
                        cpu[name][1] += len(texts) + clients  # + the warm-up texts
                        if (name, label) not in best or result[0] > best[(name, label)][0]:
                            best[(name, label)] = result
                print(f"  round {round_number + 1}/{args.rounds} done", file=sys.stderr)
            rss = {name: peak_rss_mb(tree_pids(pid)) for name, (_, pid) in makers.items()}
            # Per process: the daemon, then its children (the engine child; a query-lane
            # child only if one started).
            per_process = [peak_rss_mb([pid]) for pid in tree_pids(daemon.pid)]
        finally:
            daemon.terminate()
            llama.terminate()
            daemon.wait(timeout=60)
            llama.wait(timeout=60)

    rows = []
    for label, _, _ in workloads:
        (ours_rate, ours_lat), (their_rate, their_lat) = (
            best[("edge-agent", label)],
            best[("llama-server", label)],
        )
        rows.append([
            label, f"{ours_rate:.1f}", f"{their_rate:.1f}", f"{ours_rate / their_rate:.2f}",
            f"{statistics.median(ours_lat):.2f}", f"{statistics.median(their_lat):.2f}",
            f"{percentile(ours_lat, 0.99):.2f}", f"{percentile(their_lat, 0.99):.2f}",
        ])  # fmt: skip
    print(markdown_table(
        ["workload", "edge-agent texts/s", "llama-server texts/s", "ratio", "p50 ms (ea)",
         "p50 ms (ls)", "p99 ms (ea)", "p99 ms (ls)"],
        rows,
    ))  # fmt: skip
    per_k = {name: 1000 * spent / max(count, 1) for name, (spent, count) in cpu.items()}
    print()
    print(markdown_table(
        ["server", "CPU s per 1,000 texts (all passes)", "peak RSS MiB (all processes)"],
        [[name, f"{per_k[name]:.2f}", f"{rss[name]:.1f}"] for name in makers],
    ))  # fmt: skip
    print(
        f"\npeak RSS: edge-agent / llama-server = {rss['edge-agent'] / rss['llama-server']:.2f}"
        f" (daemon {per_process[0]:.1f} MiB + engine child"
        f"{'ren' if len(per_process) > 2 else ''} {' + '.join(f'{v:.1f}' for v in per_process[1:])}"
        " MiB; each process's own peak, VmHWM)"
    )
    print(
        f"\ncosine between the two servers' vectors on 32 texts: min {cosine.min():.6f},"
        f" mean {cosine.mean():.6f}"
    )
    print(f"\nbench took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
