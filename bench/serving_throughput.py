"""Throughput of `neuraldb serve` (vLLM, CPU) on the default model with 0, 10k, 100k facts: for each
size, a database directory of random unit keys and random residuals (they never fire on real text,
so this measures the cost of scanning the keys at every token), a server on a loopback port, then
CLIENTS concurrent clients sending REQUESTS greedy completions of MAX_TOKENS tokens in total.
Prints one JSON line per size (requests/s, generated tokens/s, seconds, load average before and
after). Needs the vllm extra (see .ci/run).

    python bench/serving_throughput.py --facts 0,10000,100000 --clients 8 --requests 64 --max-tokens 32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

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


def build_database(directory: Path, facts: int) -> None:
    """A database directory for the default model with `facts` random unit keys and residuals."""
    generator = torch.Generator().manual_seed(0)
    with Workspace.create(directory, model="default") as workspace:
        db = workspace.db
        for start in range(0, facts, BATCH):
            count = min(BATCH, facts - start)
            keys = torch.nn.functional.normalize(torch.randn(count, db.d1, generator=generator), dim=1)
            db.add(keys, torch.randn(count, db.d2, generator=generator),
                   ids=[f"random{i}" for i in range(start, start + count)])


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


def measure(directory: Path, args) -> dict:
    """Start a server on `directory`, run the clients, stop it; the measurement."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(directory.parent / f"{directory.name}.server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "neuraldb_kernels.cli", "serve", "--db", str(directory),
                               "--port", str(port), "--served-model-name", "bench",
                               f"--vllm-arg=--max-model-len={args.max_model_len}"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENVIRONMENT})
    try:
        started = time.perf_counter()
        _wait_until_ready(server, port, args.start_seconds)
        startup = time.perf_counter() - started
        body = lambda i: {"model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
                          "temperature": 0, "ignore_eos": True}
        _post(port, body(0))  # warm-up
        load_before = os.getloadavg()
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as clients:
            answers = list(clients.map(lambda i: _post(port, body(i)), range(args.requests)))
        seconds = time.perf_counter() - started
        tokens = sum(answer["usage"]["completion_tokens"] for answer in answers)
        return {"startup_s": round(startup, 1), "seconds": round(seconds, 2),
                "requests_per_s": round(args.requests / seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
                "generated_tokens": tokens, "load_before": [round(x, 2) for x in load_before],
                "load_after": [round(x, 2) for x in os.getloadavg()]}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", default="0,10000,100000", help="comma-separated database sizes")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--start-seconds", type=float, default=600)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as scratch:
        for facts in (int(part) for part in args.facts.split(",")):
            directory = Path(scratch) / f"facts{facts}"
            started = time.perf_counter()
            build_database(directory, facts)
            build = time.perf_counter() - started
            result = measure(directory, args)
            print(json.dumps({"facts": facts, "clients": args.clients, "requests": args.requests,
                              "max_tokens": args.max_tokens, "build_s": round(build, 1), **result}), flush=True)


if __name__ == "__main__":
    main()
