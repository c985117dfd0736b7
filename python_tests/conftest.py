"""Test session setup shared by every test module.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; TRITON_INTERPRET
must be set before triton is first imported, so it is set here, before any test module loads.
"""

import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """../shared/data beside the repository (CounterFact, ZsRE); tests skip when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"the shared data folder {DATA_DIR} is not present")
    return DATA_DIR


@pytest.fixture
def legacy_database():
    """A writer of NeuralDB files in format version 1 or 2, built by hand with SQL as those versions
    wrote them (no checksum column): `write(path, version, rows, d1=, d2=, dtype="float32", gamma=0.65,
    layer=None)`, rows given as (id, keys (k, d1) or (d1,), residual (d2,), metadata dict)."""
    import json
    import sqlite3

    def write(path, version, rows, *, d1, d2, dtype="float32", gamma=0.65, layer=None):
        storage = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        conn = sqlite3.connect(path)
        conn.executescript(f"""
            PRAGMA application_id={0x4E44424B}; PRAGMA user_version={version}; PRAGMA journal_mode=WAL;
            CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE facts (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                                rev INTEGER NOT NULL, key BLOB NOT NULL, residual BLOB NOT NULL,
                                metadata TEXT NOT NULL);""")
        meta = {"format": "neuraldb", "format_version": version, "d1": d1, "d2": d2, "layer": layer,
                "gamma": gamma, "dtype": dtype, "fingerprint": None, "revision": len(rows),
                "created_at": "2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T00:00:00+00:00"}
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [(name, json.dumps(value)) for name, value in meta.items()])
        for rev, (fact_id, keys, residual, metadata) in enumerate(rows, start=1):
            key_blob = keys.reshape(-1, d1).to(storage).contiguous().view(torch.uint8).numpy().tobytes()
            residual_blob = residual.to(storage).contiguous().view(torch.uint8).numpy().tobytes()
            conn.execute("INSERT INTO facts(id, rev, key, residual, metadata) VALUES (?, ?, ?, ?, ?)",
                         (fact_id, rev, key_blob, residual_blob, json.dumps(metadata)))
        conn.commit()
        conn.close()

    return write
