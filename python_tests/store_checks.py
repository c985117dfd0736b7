"""Shared check of the store's damage tests: what a possibly damaged database reads back."""

import torch

from neuraldb_kernels.store import NeuralDB


def reads_back_wrong_vectors(path, ids, keys, residuals) -> bool:
    """Open the database at `path` and say whether any key row's key or residual differs from what
    was stored for its fact (`ids[i]` stored with `keys[i]`, `residuals[i]`); the errors of opening
    or reading a damaged file propagate (a refusal is what the tests expect)."""
    with NeuralDB.open(path) as db:
        snap = db.snapshot()
        for row, fact_id in enumerate(snap.ids_at(range(db.key_rows))):
            i = ids.index(fact_id)
            if not (torch.equal(snap.keys[row], keys[i]) and torch.equal(snap.residuals[row], residuals[i])):
                return True
    return False
