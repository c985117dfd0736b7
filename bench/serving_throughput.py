"""Throughput of `neuraldb serve` (vLLM, CPU) on the default model with 0, 10k and 100k facts, all in
one server: the database directory changes live between the measurements (random unit keys and
random residuals are added or deleted by this process while the server runs; such keys never fire
on real text, so this measures the cost of scanning the keys at every token, plus the refresh).
For each size in --facts, in order: resize the database, one warm-up request (the server applies
the change), then CLIENTS concurrent clients send REQUESTS greedy completions of MAX_TOKENS tokens.
Prints one JSON line per size (requests/s, generated tokens/s, seconds, load average before and
after). Needs the vllm extra (see .ci/run).

    python bench/serving_throughput.py --facts 0,10000,100000,0 --clients 8 --requests 96 --max-tokens 16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from neuraldb_kernels.serving import stop_server
from neuraldb_kernels.workspace import Workspace

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Bread is made from flour, water and",
    "The capital of Japan is",
    "Photosynthesis is the process by which",
    "The largest planet in the solar system is",
    "A good way to learn a language is",
    "The river that flows through Cairo is the",
    "In 1969, the first people to walk on the Moon were",
]
ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
BATCH = 5000


def resize(db, facts: int, generator: torch.Generator) -> float:
    """Add random facts (unit keys, random residuals) to `db`, or delete its newest ones, until it
    holds `facts`; the seconds it took."""
    started = time.perf_counter()
    while len(db) < facts:
        start, count = len(db), min(BATCH, facts - len(db))
        keys = torch.nn.functional.normalize(torch.randn(count, db.d1, generator=generator), dim=1)
        db.add(keys, torch.randn(count, db.d2, generator=generator),
               ids=[f"random{i}" for i in range(start, start + count)])
    if len(db) > facts:
        db.delete([f"random{i}" for i in range(facts, len(db))])
    return time.perf_counter() - started


def _post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _wait_until_ready(server: subprocess.Popen, port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the server was not ready within {seconds} s")


def run_clients(port: int, args) -> dict:
    """CLIENTS threads sending REQUESTS completions in all; the measurement."""
    body = lambda i: {"model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
                      "temperature": 0, "ignore_eos": True}
    load_before = os.getloadavg()
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as clients:
        answers = list(clients.map(lambda i: _post(port, body(i)), range(args.requests)))
    seconds = time.perf_counter() - started
    tokens = sum(answer["usage"]["completion_tokens"] for answer in answers)
    return {"seconds": round(seconds, 2), "requests_per_s": round(args.requests / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2), "generated_tokens": tokens,
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", default="0,10000,100000,0", help="comma-separated database sizes, in order")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--start-seconds", type=float, default=900)
    parser.add_argument("--server-log", default=None, help="keep the server's output in this file (default: dropped)")
    args = parser.parse_args(argv)
    sizes = [int(part) for part in args.facts.split(",")]
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as scratch, \
            Workspace.create(Path(scratch) / "edits", model="default") as workspace:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log = open(args.server_log or Path(scratch) / "server.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "neuraldb_kernels.cli", "serve", "--db",
                                   str(workspace.directory), "--port", str(port), "--served-model-name", "bench",
                                   f"--vllm-arg=--max-model-len={args.max_model_len}"],
                                  stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENVIRONMENT})
        try:
            started = time.perf_counter()
            _wait_until_ready(server, port, args.start_seconds)
            print(json.dumps({"startup_s": round(time.perf_counter() - started, 1)}), flush=True)
            for facts in sizes:
                write = resize(workspace.db, facts, generator)
                started = time.perf_counter()
                _post(port, {"model": "bench", "prompt": PROMPTS[0], "max_tokens": 1, "temperature": 0})
                warm = time.perf_counter() - started  # includes the server's refresh of the change
                print(json.dumps({"facts": facts, "clients": args.clients, "requests": args.requests,
                                  "max_tokens": args.max_tokens, "write_s": round(write, 1),
                                  "first_request_s": round(warm, 2), **run_clients(port, args)}), flush=True)
        finally:
            stop_server(server, timeout=120)
            log.close()


if __name__ == "__main__":
    main()
