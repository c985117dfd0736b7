"""Host overhead of gated_retrieve and of the attached hook on the eager path, per call, on
shapes so small that the kernel's own work is negligible (issue 19).

    PYTHONPATH=$PWD python bench/host_overhead.py [--baseline-tree /work/main] [--rounds 15]
        [--batches 25] [--calls 20] [--json out.json]

Shapes: one query row (n = 1), m = 16 keys, d1 = 64, d2 = 32, float32, 1 torch thread; backends
"cpu" and "torch". Timed per backend, each per call (see `worker` for how a round is timed):
- "kernel":            the backend's run(q2d, K, R, gamma): the kernel with no checks around it.
- "op":                gated_retrieve(q, K, R, 0.5) with q (1, d1): the public op.
- "op, key gammas":    the same with a (m,) float32 tensor of per-key thresholds.
- "op, (1, 1, d1) query": the op on a decode step's (batch, token, d1) input, with return_index
                       (as the hook calls it: the leading dims are flattened and restored).
- "layer, bare":       a Linear d1 -> d2 (as `layers.0.proj` of a module) on a (1, 1, d1) decode
                       input, nothing attached; the cases below add the hook to a copy of it.
- "layer + attach":    attach(model, db) with the database's gamma (a number).
- "layer + attach, key gammas": a database whose facts have thresholds of their own.
- "layer + graph_safe": attach(model, db, graph_safe=True).
The hook's cost is "layer + ..." minus "layer, bare"; the op's is "op" minus "kernel".

Each tree (this one, and --baseline-tree when given: another checkout, say main before a change)
is measured in a worker process of its own (this script with PYTHONPATH at that tree). The
workers run round by round in alternating order, so both see the same machine load; the table
gives the median over rounds per case (microseconds per call) and the ratio this / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

N, M, D1, D2, GAMMA = 1, 16, 64, 32, 0.5
BACKENDS = ("cpu", "torch")
THIS_TREE = Path(__file__).resolve().parents[1]


def _cases():
    """name -> zero-argument callable: one call of what that case times (see the module docstring)."""
    import torch

    from neuraldb_kernels import NeuralDB, attach, gated_retrieve
    from neuraldb_kernels.ops import get_backend

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(N, D1, generator=generator)
    keys = torch.randn(M, D1, generator=generator)
    residuals = torch.randn(M, D2, generator=generator)
    key_gammas = torch.rand(M, generator=generator) * 0.5 + 0.4
    hidden = torch.randn(1, 1, D1, generator=generator)
    weight, bias = torch.randn(D2, D1, generator=generator), torch.randn(D2, generator=generator)

    def layer():
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList([torch.nn.Module()])
        model.layers[0].proj = torch.nn.Linear(D1, D2)
        with torch.no_grad():
            model.layers[0].proj.weight.copy_(weight)
            model.layers[0].proj.bias.copy_(bias)
        return model.eval()

    def database(with_key_gammas: bool):
        db = NeuralDB(d1=D1, d2=D2, layer=0, gamma=GAMMA)
        gammas = [g.reshape(1) for g in key_gammas] if with_key_gammas else None
        db.add(keys, residuals, key_gammas=gammas)
        return db

    def forward(model):
        proj = model.layers[0].proj
        return lambda: proj(hidden)

    cases = {}
    for backend in BACKENDS:
        run = get_backend(backend).run
        cases[f"{backend}: kernel"] = lambda run=run: run(q, keys, residuals, GAMMA)
        cases[f"{backend}: op"] = lambda b=backend: gated_retrieve(q, keys, residuals, GAMMA, backend=b)
        cases[f"{backend}: op, key gammas"] = lambda b=backend: gated_retrieve(q, keys, residuals, key_gammas, backend=b)
        cases[f"{backend}: op, (1, 1, d1) query"] = lambda b=backend: gated_retrieve(hidden, keys, residuals, GAMMA,
                                                                                   backend=b, return_index=True)
        cases[f"{backend}: layer, bare"] = forward(layer())
        path = "layers.{layer}.proj"
        for name, db, options in (("layer + attach", database(False), {}),
                                  ("layer + attach, key gammas", database(True), {}),
                                  ("layer + graph_safe", database(False), {"graph_safe": True})):
            model = layer()
            attach(model, db, module_path=path, backend=backend, **options)
            cases[f"{backend}: {name}"] = forward(model)
    return cases


def _batch_micros(call, calls: int) -> float:
    """Microseconds per call of `call`, over one batch of `calls` back-to-back calls."""
    start = time.perf_counter_ns()
    for _ in range(calls):
        call()
    return (time.perf_counter_ns() - start) / calls / 1e3


def worker(calls: int, batches: int) -> None:
    """Answer each line on stdin with one round: a JSON line {case: microseconds per call}, the
    median over `batches` batches of `calls` calls. Batches are short (well under a scheduler
    time slice), so on a loaded machine most run uninterrupted and the median is their time."""
    import torch

    cases = _cases()
    with torch.no_grad():
        for call in cases.values():  # warm-up: first-call imports, view buffers, caches
            _batch_micros(call, 50)
        print(json.dumps(list(cases)), flush=True)
        for _ in sys.stdin:
            timings = {name: statistics.median(_batch_micros(call, calls) for _ in range(batches))
                       for name, call in cases.items()}
            print(json.dumps(timings), flush=True)


class Worker:
    """This script's worker in a process of its own, importing neuraldb_kernels from `tree`."""

    def __init__(self, tree: Path, calls: int, batches: int):
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
        self.tree = tree
        command = [sys.executable, __file__, "--worker", "--calls", str(calls), "--batches", str(batches)]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.cases = json.loads(self._line())

    def _line(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {self.tree} exited (status {self.process.wait()})")
        return line

    def round(self) -> dict:
        self.process.stdin.write("round\n")
        self.process.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def overheads(medians: dict) -> dict:
    """{backend: {what: microseconds}} from one tree's medians: the op's host overhead over the
    bare kernel (2-D query, per-key thresholds, decode-shaped query) and the hook's over the bare
    layer (attach, with per-key thresholds, graph_safe)."""
    result = {}
    for backend in BACKENDS:
        kernel, bare = medians[f"{backend}: kernel"], medians[f"{backend}: layer, bare"]
        result[backend] = {
            "op": medians[f"{backend}: op"] - kernel,
            "op, key gammas": medians[f"{backend}: op, key gammas"] - kernel,
            "op, (1, 1, d1) query": medians[f"{backend}: op, (1, 1, d1) query"] - kernel,
            "hook": medians[f"{backend}: layer + attach"] - bare,
            "hook, key gammas": medians[f"{backend}: layer + attach, key gammas"] - bare,
            "hook, graph_safe": medians[f"{backend}: layer + graph_safe"] - bare,
        }
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-tree", type=Path, help="another checkout to measure in the same rounds")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed batch")
    parser.add_argument("--batches", type=int, default=25, help="timed batches per case and round")
    parser.add_argument("--json", type=Path, help="write the medians and the machine here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.calls, args.batches)
        return 0
    load_before = os.getloadavg()
    trees = {"this": THIS_TREE} | ({"baseline": args.baseline_tree.resolve()} if args.baseline_tree else {})
    workers = {name: Worker(tree, args.calls, args.batches) for name, tree in trees.items()}
    cases = workers["this"].cases
    samples = {name: {case: [] for case in cases} for name in workers}
    try:
        for round_index in range(args.rounds):
            order = list(workers) if round_index % 2 == 0 else list(workers)[::-1]
            for name in order:
                for case, micros in workers[name].round().items():
                    samples[name].setdefault(case, []).append(micros)
    finally:
        for process in workers.values():
            process.close()
    medians = {name: {case: statistics.median(values) for case, values in per_case.items() if values}
               for name, per_case in samples.items()}
    machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    baseline = "baseline" in medians
    print(f"{'case':34s} {'this (us)':>10s}" + (f" {'baseline (us)':>14s} {'ratio':>6s}" if baseline else ""))
    for case in cases:
        line = f"{case:34s} {medians['this'][case]:10.1f}"
        if baseline:
            line += f" {medians['baseline'][case]:14.1f} {medians['this'][case] / medians['baseline'][case]:6.2f}"
        print(line)
    derived = {name: overheads(per_case) for name, per_case in medians.items()}
    print("host overhead (us):")
    for backend, per_what in derived["this"].items():
        for what, micros in per_what.items():
            print(f"  {backend + ': ' + what:32s} {micros:10.1f}"
                  + (f" {derived['baseline'][backend][what]:14.1f}" if baseline else ""))
    print(f"# {machine['cpu']}, {machine['cores']} cores; load average {load_before[0]:.2f} before, "
          f"{machine['load_average_after'][0]:.2f} after; {args.rounds} rounds x {args.batches} batches x "
          f"{args.calls} calls; {machine['date_utc']} UTC")
    if args.json:
        args.json.write_text(json.dumps({"medians_us": medians, "overheads_us": derived, "machine": machine,
                                         "trees": {name: str(tree) for name, tree in trees.items()},
                                         "rounds": args.rounds, "batches": args.batches, "calls": args.calls},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
