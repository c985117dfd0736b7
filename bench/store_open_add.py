"""One measurement of the store at SmolLM2 sizes (d1=1536, d2=576, float32, 1 thread): build 10k
facts in batches of 1,000, open them, 300 single on-disk adds with a live view, search(k=5).
Prints one JSON line. To compare two trees in one run, alternate them:
  for tree in OLD NEW OLD NEW; do PYTHONPATH=$tree python bench/store_open_add.py; done
"""

import json
import os
import shutil
import tempfile
import time

import torch

from neuraldb_kernels.store import NeuralDB

torch.set_num_threads(1)
D1, D2, N = 1536, 576, 10_000
g = torch.Generator().manual_seed(0)
keys, residuals = torch.randn(N, D1, generator=g), torch.randn(N, D2, generator=g)
d = tempfile.mkdtemp()
path = os.path.join(d, "db.ndb")
t = time.perf_counter()
with NeuralDB(path, d1=D1, d2=D2) as db:
    for s in range(0, N, 1000):
        db.add(keys[s:s+1000], residuals[s:s+1000], [f"f{i}" for i in range(s, s + 1000)],
               metadata=[{"subject": f"s{i}", "prompt": "{} is"} for i in range(s, s + 1000)])
build = time.perf_counter() - t
t = time.perf_counter()
db = NeuralDB.open(path)
open_s = time.perf_counter() - t
db.view()
t = time.perf_counter()
for i in range(300):
    db.add(keys[i], residuals[i], f"single{i}")
single = (time.perf_counter() - t) / 300
t = time.perf_counter()
for _ in range(20):
    db.search(keys[5], k=5)
search = (time.perf_counter() - t) / 20
db.close()
print(json.dumps({"build_10k_s": build, "open_10k_s": open_s, "single_add_ms": single * 1e3, "search_ms": search * 1e3}))
shutil.rmtree(d)
