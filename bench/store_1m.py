"""The store at SmolLM2 sizes (d1=1536, d2=576) and up to 1,000,000 facts: build, open, first
retrieval, add / delete one fact, on-disk size, resident memory. Prints one JSON object.

Keys are random unit vectors and residuals random normals (the store's costs depend on the sizes,
not the values). Build: batched adds of 10,000 facts (one transaction each) into a new database
(time of the `add` calls only; generating the vectors is reported apart). Then, in a fresh process
(so that its resident memory is the opened database's alone): `NeuralDB.open`, the first
`gated_retrieve` over the opened view (n = 1, fp32 query, the store's dtype), 200 single-fact adds
and 200 single-fact deletes on disk (each one transaction, fsync included; no snapshot held), and
the resident set size (VmRSS) and its peak (VmHWM) after open and after the first retrieval. The
database is left with the facts it had (deleted facts are added again, untimed).

  python bench/store_1m.py --facts 1000000 --dir /work/tmp-store1m [--dtype float32] [--keep]
  python bench/store_1m.py --facts 1000000 --dir /work/tmp-store1m --reuse   (measure a kept database again)

Times are wall clock and, for open, also the process's CPU time (on a shared machine the CPU time
is what a quiet machine's wall time would be, for one thread).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

D1, D2, BATCH = 1536, 576, 10_000
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

MEASURE = r"""
import json, sys, time, torch
from neuraldb_kernels import gated_retrieve
from neuraldb_kernels.store import NeuralDB

torch.set_num_threads(int(sys.argv[3]))
def memory():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {name: int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM")}

path, facts = sys.argv[1], int(sys.argv[2])
with NeuralDB.open(path) as db:  # a run killed before it finished (out of memory, say) may have left its facts
    db.delete([fact_id for fact_id in db if fact_id.startswith("single")])
started, cpu = time.perf_counter(), time.process_time()
db = NeuralDB.open(path)
opened, open_cpu = time.perf_counter(), time.process_time() - cpu
after_open = memory()
keys, residuals = db.view()
q = torch.randn(1, keys.shape[1], generator=torch.Generator().manual_seed(7))
out, index, score = gated_retrieve(q, keys, residuals, db.gamma, return_index=True)
retrieved = time.perf_counter()
after_retrieval = memory()
del keys, residuals  # no snapshot held: single deletes run in place
generator = torch.Generator().manual_seed(8)
new_keys = torch.nn.functional.normalize(torch.randn(200, db.d1, generator=generator), dim=1)
new_residuals = torch.randn(200, db.d2, generator=generator)
adds, deletes = [], []
for i in range(200):
    t = time.perf_counter()
    db.add(new_keys[i], new_residuals[i], f"single{i}")
    adds.append(time.perf_counter() - t)
spread = [f"f{(i * 4999) % facts}" for i in range(400)]
for fact_id in [fact_id for fact_id in spread if fact_id in db][:200]:
    stored = db.get(fact_id)
    t = time.perf_counter()
    db.delete(fact_id)
    deletes.append(time.perf_counter() - t)
    db.add(stored.keys[0], stored.residual, fact_id, stored.metadata)  # as it was: --reuse measures the same facts
db.delete([f"single{i}" for i in range(200)])
adds.sort(); deletes.sort()
print(json.dumps({"open_s": opened - started, "open_cpu_s": open_cpu, "first_retrieval_after_open_s": retrieved - opened,
                  "open_to_first_retrieval_s": retrieved - started, "key_rows": db.key_rows,
                  "add_one_ms_median": adds[100] * 1e3, "add_one_ms_p95": adds[190] * 1e3,
                  "delete_one_ms_median": deletes[100] * 1e3, "delete_one_ms_p95": deletes[190] * 1e3,
                  "rss_after_open_bytes": after_open["VmRSS"], "peak_rss_during_open_bytes": after_open["VmHWM"],
                  "rss_after_first_retrieval_bytes": after_retrieval["VmRSS"], "peak_rss_bytes": memory()["VmHWM"]}))
db.close()
"""


def _available_memory() -> int:
    fields = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    return int(fields["MemAvailable"].split()[0]) * 1024


def build(path: str, facts: int, dtype: torch.dtype) -> tuple[float, float]:
    """Write a new database of `facts` random facts in batches; (seconds generating vectors,
    seconds in `add`)."""
    from neuraldb_kernels.store import NeuralDB

    generator = torch.Generator().manual_seed(0)
    generate_s = build_s = 0.0
    with NeuralDB(path, d1=D1, d2=D2, dtype=dtype) as db:
        for start in range(0, facts, BATCH):
            n = min(BATCH, facts - start)
            t = time.perf_counter()
            keys = torch.nn.functional.normalize(torch.randn(n, D1, generator=generator), dim=1)
            residuals = torch.randn(n, D2, generator=generator)
            ids = [f"f{i}" for i in range(start, start + n)]
            metadata = [{"subject": f"subject {i}", "prompt": "{} plays for", "target_new": f"target {i}"}
                        for i in range(start, start + n)]
            generate_s += time.perf_counter() - t
            t = time.perf_counter()
            db.add(keys, residuals, ids, metadata)
            build_s += time.perf_counter() - t
    return generate_s, build_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=100_000)
    parser.add_argument("--dir", required=True, help="a new directory for the database (removed unless --keep)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="measure the database kept in --dir by an earlier run")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    raw = args.facts * (D1 + D2) * torch.empty(0, dtype=dtype).element_size()
    path = os.path.join(args.dir, "db.ndb")
    generate_s = build_s = None
    if not args.reuse:
        os.makedirs(args.dir)
    free_disk, free_memory = shutil.disk_usage(args.dir).free, _available_memory()
    if (not args.reuse and free_disk < 1.2 * raw) or free_memory < 1.5 * raw:  # never push others out of memory
        raise SystemExit(f"{args.facts} facts in {args.dtype} need {raw / 1e9:.1f} GB of vectors: "
                         f"{free_disk / 1e9:.1f} GB of disk and {free_memory / 1e9:.1f} GB of memory are free")
    if not args.reuse:
        torch.set_num_threads(args.threads)
        generate_s, build_s = build(path, args.facts, dtype)
    on_disk = sum(os.path.getsize(os.path.join(args.dir, name)) for name in os.listdir(args.dir))
    measured = subprocess.run([sys.executable, "-c", MEASURE, path, str(args.facts), str(args.threads)],
                              capture_output=True, text=True, check=True)
    result = {"facts": args.facts, "dtype": args.dtype, "d1": D1, "d2": D2, "threads": args.threads,
              "build_s": build_s, "generate_vectors_s": generate_s, "on_disk_bytes": on_disk, "raw_vector_bytes": raw,
              "on_disk_over_raw": on_disk / raw, **json.loads(measured.stdout)}
    result["rss_after_open_over_raw"] = result["rss_after_open_bytes"] / raw
    result["peak_rss_during_open_over_raw"] = result["peak_rss_during_open_bytes"] / raw
    result["rss_over_raw"] = result["rss_after_first_retrieval_bytes"] / raw
    result["peak_rss_over_raw"] = result["peak_rss_bytes"] / raw
    result["load_average"] = os.getloadavg()
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
