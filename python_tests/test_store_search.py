"""NeuralDB.search against a float64 brute force over the stored keys: chunked top-k (several
chunks merged), exact ties (lower view row first), facts with several keys (counted once, with
their best key), k beyond the number of facts, and a delete racing a search in another thread."""

import threading

import pytest
import torch

import neuraldb_kernels.ops.torch_backend as torch_backend
from neuraldb_kernels.store import NeuralDB

D1, D2 = 12, 3


def _reference(db, q, k):
    """(id, cosine) of the k best facts by float64 cosine of each stored key with q, each fact with
    its best key; ties broken by the fact's first view row reaching that score."""
    snap = db.snapshot()
    keys = snap.keys.double()
    cosines = (keys @ q.double()) / (keys.norm(dim=1) * q.double().norm())
    best: dict[str, tuple[float, int]] = {}
    for row, (fact_id, score) in enumerate(zip(snap.ids_at(range(keys.shape[0])), cosines.tolist())):
        if fact_id not in best or score > best[fact_id][0]:
            best[fact_id] = (score, row)
    order = sorted(best, key=lambda fact_id: (-best[fact_id][0], best[fact_id][1]))
    return [(fact_id, best[fact_id][0]) for fact_id in order[:k]]


@pytest.mark.parametrize("chunk", [5, 16384])
def test_search_matches_a_float64_reference_with_ties_and_several_keys(monkeypatch, chunk):
    monkeypatch.setattr(torch_backend, "_CHUNK_ELEMENTS", chunk * D1)  # `chunk` key rows per chunk
    generator = torch.Generator().manual_seed(11)
    keys = torch.randn(40, D1, generator=generator, dtype=torch.float64)
    keys[[7, 23, 31]] = keys[3].clone()  # exact ties with fact 3 (and between themselves)
    extra = [torch.randn(i % 4, D1, generator=generator, dtype=torch.float64) for i in range(40)]
    extra[12] = keys[3:4].clone()  # a second key of fact 12 ties with them too
    db = NeuralDB(d1=D1, d2=D2)
    ids = [f"f{i}" for i in range(40)]
    db.add(keys, torch.zeros(40, D2), ids, extra_keys=extra, metadata=[{"subject": f"s{i}"} for i in range(40)])
    db.delete(["f0", "f5"])  # swap-remove: view rows no longer follow insertion order
    for q in [keys[3], *torch.randn(4, D1, generator=generator, dtype=torch.float64)]:
        for k in (1, 3, 6, 50):
            hits = db.search(q.float(), k=k)
            expected = _reference(db, q, k)
            assert [hit.id for hit in hits] == [fact_id for fact_id, _ in expected]
            assert [hit.cosine for hit in hits] == pytest.approx([score for _, score in expected], abs=1e-6)
            assert all(hit.metadata["subject"] == "s" + hit.id[1:] for hit in hits)
    tied = [hit.id for hit in db.search(keys[3].float(), k=5)]
    rows = db.snapshot().ids_at(range(db.key_rows))
    assert tied == sorted(["f3", "f7", "f23", "f31", "f12"], key=rows.index)  # every tie, lower row first


def test_search_never_sorts_all_scores(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.sort over every score")

    db = NeuralDB(d1=D1, d2=D2)
    db.add(torch.randn(300, D1), torch.zeros(300, D2))
    original_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda values, *a, **kw: refuse() if values.numel() >= 300 else original_sort(
        values, *a, **kw))
    assert len(db.search(torch.randn(D1), k=4)) == 4


def test_search_gives_a_consistent_answer_while_another_thread_deletes():
    generator = torch.Generator().manual_seed(2)
    db = NeuralDB(d1=D1, d2=D2)
    db.add(torch.randn(400, D1, generator=generator), torch.zeros(400, D2), [f"f{i}" for i in range(400)])
    query = torch.randn(D1, generator=generator)
    stop, errors = threading.Event(), []

    def delete_best():
        while not stop.is_set() and len(db) > 5:
            db.delete(db.search(query, k=1)[0].id)

    def search():
        try:
            while not stop.is_set():
                hits = db.search(query, k=5)
                assert len({hit.id for hit in hits}) == 5
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            stop.set()

    threads = [threading.Thread(target=delete_best), threading.Thread(target=search)]
    for thread in threads:
        thread.start()
    threads[0].join(timeout=60)
    stop.set()
    threads[1].join(timeout=60)
    assert not errors, errors[0]
