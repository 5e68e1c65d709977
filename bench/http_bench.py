"""The HTTP API (OpenAI's /v1/embeddings) against the MessagePack socket, same daemon, one run.

    python bench/http_bench.py [--quant Q8_0] [--threads 2] [--texts 512] [--rounds 3]
                               [--llama-server]

One real ``edge-agent serve`` subprocess (engine isolated in its child, as in production)
serves both transports, so the model, threads and batcher are the same; only the transport
differs. Clients are threads in this process, one connection each: edge-agent's blocking
``Client`` over the Unix socket (vectors as float32 bytes), and ``http.client`` keep-alive
connections posting OpenAI's JSON with ``encoding_format`` "base64" (what the official openai
client asks for by default) and "float" (what curl users get). Workloads: 1 and 16 clients,
1 text and 64 texts a request, the same texts for every transport; rounds alternate the order
of the transports and the best round of each counts. ``--llama-server`` adds llama.cpp's own
server on the same GGUF file with the same threads (built once by bench/llama_server_bench.py,
6-8 minutes of compiling on 2 cores).

Target (issue #15): HTTP within 10% of the socket's texts/s at 16 clients.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import (
    add_common_args,
    load_sts,
    machine_summary,
    markdown_table,
    open_store,
    start_daemon,
    unique_sentences,
)
from llama_server_bench import (
    LlamaServerClient,
    build_llama_server,
    free_port,
    run_pass,
    start_llama_server,
)
from serve_bench import percentile

from edge_agent.client import Client


class SocketClient:
    def __init__(self, socket_path: Path) -> None:
        self.client = Client(socket_path, timeout=120)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.client.embed(texts).vectors

    def close(self) -> None:
        self.client.close()


class HttpClient:
    """/v1/embeddings over one keep-alive connection, decoding as the openai client does."""

    def __init__(self, port: int, model: str, encoding: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.model, self.encoding = model, encoding

    def embed(self, texts: list[str]) -> np.ndarray:
        body = json.dumps({"input": texts, "model": self.model, "encoding_format": self.encoding})
        self.conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
        data = json.loads(payload)["data"]
        if self.encoding == "base64":
            return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data])
        return np.asarray([d["embedding"] for d in data], dtype=np.float32)

    def close(self) -> None:
        self.conn.close()


def wait_for_http(port: int, deadline_s: float = 60.0) -> str:
    """The served model's name, once the HTTP listener answers."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            response = conn.getresponse()
            if response.status == 200:
                return str(json.loads(response.read())["data"][0]["id"])
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the daemon's HTTP listener did not answer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--quant", default="Q8_0")
    parser.add_argument("--texts", type=int, default=512, help="texts per pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llama-server", action="store_true", help="add llama.cpp's server")
    args = parser.parse_args()
    began = time.perf_counter()
    store = open_store(args.models_dir)
    gguf = store.resolve("all-MiniLM-L6-v2", args.quant).path
    sentences = unique_sentences(load_sts(args.data_dir))
    order = np.random.default_rng(0).permutation(len(sentences))
    texts = [sentences[i] for i in order[: args.texts]]
    workloads = [
        ("1 client, 1 text/request", 1, 1),
        ("16 clients, 1 text/request", 16, 1),
        ("1 client, 64 texts/request", 1, 64),
        ("16 clients, 64 texts/request", 16, 64),
    ]
    binary = build_llama_server() if args.llama_server else None

    print(machine_summary())
    print(
        f"model all-MiniLM-L6-v2 {args.quant} ({gguf.name}), {args.threads} threads;"
        f" {len(texts)} STS sentences per pass, best of {args.rounds}\n"
    )
    with tempfile.TemporaryDirectory(prefix="http-bench-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        daemon, socket_path = start_daemon(
            args, workdir, store.root, env_extra={"EDGE_AGENT_HTTP": f"127.0.0.1:{port}"}
        )
        llama = None
        try:
            model = wait_for_http(port)
            makers: dict[str, Callable[[], object]] = {
                "socket (msgpack)": lambda: SocketClient(socket_path),
                "HTTP base64": lambda: HttpClient(port, model, "base64"),
                "HTTP float": lambda: HttpClient(port, model, "float"),
            }
            if binary is not None:
                llama_port = free_port()
                llama = start_llama_server(
                    binary, gguf, args.threads, llama_port, workdir / "llama.log"
                )
                makers["llama-server"] = lambda: LlamaServerClient(llama_port)
            # Same numbers on every transport (cosine against the socket's vectors).
            reference = SocketClient(socket_path)
            base_vectors = reference.embed(texts[:32])
            reference.close()
            agreement = {}
            for name, make in makers.items():
                client = make()
                other = client.embed(texts[:32])  # type: ignore[attr-defined]
                client.close()  # type: ignore[attr-defined]
                cos = (base_vectors * other).sum(axis=1) / (
                    np.linalg.norm(base_vectors, axis=1) * np.linalg.norm(other, axis=1)
                )
                agreement[name] = float(cos.min())
            best: dict[tuple[str, str], tuple[float, list[float]]] = {}
            for round_number in range(args.rounds):
                names = list(makers)
                if round_number % 2:
                    names.reverse()
                for label, clients, per_request in workloads:
                    for name in names:
                        result = run_pass(makers[name], texts, clients, per_request)
                        if (name, label) not in best or result[0] > best[(name, label)][0]:
                            best[(name, label)] = result
                print(f"  round {round_number + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
            if llama is not None:
                llama.terminate()
                llama.wait(timeout=60)

    socket_name = "socket (msgpack)"
    rows = []
    for label, _, _ in workloads:
        base_rate = best[(socket_name, label)][0]
        for name in makers:
            rate, latencies = best[(name, label)]
            rows.append([
                label, name, f"{rate:.1f}", f"{rate / base_rate:.2f}",
                f"{statistics.median(latencies):.2f}", f"{percentile(latencies, 0.99):.2f}",
            ])  # fmt: skip
    print(markdown_table(
        ["workload", "transport", "texts/s", "vs socket", "p50 ms", "p99 ms"], rows
    ))  # fmt: skip
    print()
    print(
        "min cosine vs the socket's vectors (32 texts): "
        + ", ".join(f"{name} {value:.6f}" for name, value in agreement.items())
    )
    print(f"\nbench took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
