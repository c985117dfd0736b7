"""A tiny random Llama replicated on 2 gloo processes with a sharded NeuralDB: every rank's
logits equal those of the same model attached to the whole database in one process (the
reference, itself tested against independent hooks in test_integration.py), before and after
edits made on several ranks (each routed to its owner shard, several to the other rank's), and
greedy `generate(synced_gpus=True)` of different lengths per rank gives the same tokens; the
shards then merge into exactly the facts of the reference database."""

import json

import pytest
import torch

from neuraldb_kernels import NeuralDB, attach
from neuraldb_kernels.distributed import ShardedNeuralDB, merge_shards, shard_of, split_database

LAYER, GAMMA, WORLD = 1, 0.95, 2
SHAPES = [(2, 6), (1, 5)]  # each rank's own input (batch, tokens)


def _inputs(rank):
    return torch.randint(0, 128, SHAPES[rank], generator=torch.Generator().manual_seed(10 + rank))


def _id_owned_by(prefix, shard):
    return next(f"{prefix}-{i}" for i in range(1000) if shard_of(f"{prefix}-{i}", WORLD) == shard)


def _fact(key, seed, extra=None):
    """(key, residual, metadata with a fixed created_at) of a planted fact."""
    residual = torch.randn(32, generator=torch.Generator().manual_seed(seed))
    metadata = {"subject": f"s{seed}", "created_at": "2026-01-01T00:00:00+00:00", **(extra or {})}
    return key, residual, metadata


def _edits(keys):
    """The edits: (rank that makes it, method, arguments); every rank applies all of them, in this
    order, to its single-process reference. keys[r][b, t]: the down-projection input at rank r's token."""
    return [
        (1, "add", (_id_owned_by("new-for-rank0", 0), *_fact(keys[0][1, 4], 101))),   # rank 1 writes shard 0
        (0, "upsert", ("planted-0-1", *_fact(keys[0][0, 2], 102, {"upserted": True}), torch.tensor([0.5]))),
        (1, "delete", ("planted-1-0",)),
        (0, "add", (_id_owned_by("new-for-rank1", 0), *_fact(keys[1][0, 1], 103))),    # rank 0, its own shard
        (1, "add", (_id_owned_by("closed", 1), *_fact(keys[1][0, 3], 104), torch.tensor([1.0]))),  # never fires
    ]


def _apply(db, method, arguments):
    if method == "delete":
        db.delete(arguments[0])
    else:
        fact_id, key, residual, metadata, *key_gammas = arguments
        getattr(db, method)(key, residual, fact_id, metadata, key_gammas=key_gammas[0] if key_gammas else None)


def _forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rank_worker(rank, world_size, model_dir, folder, keys):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    ids = _inputs(rank)
    with pytest.raises(ValueError, match="owned by other shards"):
        ShardedNeuralDB.open(f"{folder}/swapped.json")
    reference = NeuralDB.open(f"{folder}/reference-{rank}.sqlite")
    bare = _forward(model, ids)
    with attach(model, reference) as single:
        expected_before = _forward(model, ids)
        single_fired_before = [(f.batch, f.position, f.fact_id) for f in single.fired()]

    sharded = ShardedNeuralDB.open(f"{folder}/shards", timeout=30)
    handle = attach(model, sharded)
    before = _forward(model, ids)
    fired_before = [(f.batch, f.position, f.fact_id) for f in handle.fired()]
    for who, method, arguments in _edits(keys):
        _apply(reference, method, arguments)
        if who == rank:
            _apply(sharded, method, arguments)
    refused = []  # a batch with one bad id changes nothing on any shard
    for attempt in (lambda: sharded.delete(["planted-0-0", "planted-1-1", "missing"]),
                    lambda: sharded.add(keys[0][0, 1:3], torch.zeros(2, 32), ["fresh", "planted-1-1"])):
        try:
            attempt()
        except (KeyError, ValueError) as error:
            refused.append(type(error).__name__)
    after = _forward(model, ids)  # the other rank's writes may still be committing when this rank starts
    fired_after = [(f.batch, f.position, f.fact_id) for f in handle.fired()]
    # generate: each step is a collective forward; synced_gpus keeps every rank stepping until all are done
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3 + rank, do_sample=False,
                               synced_gpus=True, pad_token_id=0)
    handle.detach()
    sharded.close()
    with attach(model, reference) as single:
        expected_after = _forward(model, ids)
        single_fired_after = [(f.batch, f.position, f.fact_id) for f in single.fired()]
        expected_generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3 + rank,
                                            do_sample=False, pad_token_id=0)
    reference.close()
    return {"before": torch.equal(before, expected_before), "after": torch.equal(after, expected_after),
            "edited": not torch.equal(expected_before, bare), "changed": not torch.equal(expected_after, expected_before),
            "fired": (fired_before, fired_after), "single_fired": (single_fired_before, single_fired_after),
            "generated": torch.equal(generated, expected_generated), "refused": refused}


def _capture_keys(model):
    """keys[r]: the layer's down-projection input (batch, tokens, d1) for rank r's input."""
    seen = []
    handle = model.model.layers[LAYER].mlp.down_proj.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    try:
        for rank in range(WORLD):
            _forward(model, _inputs(rank))
    finally:
        handle.remove()
    return [x.detach().clone() for x in seen]


def _facts(path):
    with NeuralDB.open(path, readonly=True) as db:
        return {fact.id: (fact.keys.numpy().tobytes(), fact.residual.numpy().tobytes(), json.dumps(fact.metadata))
                for fact in db.facts()}


def test_two_ranks_give_the_single_process_logits_and_edits_round_trip(tmp_path, spawn_ranks):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "model")
    keys = _capture_keys(model)
    db = NeuralDB.for_model(model, layer=LAYER, gamma=GAMMA, path=tmp_path / "full.sqlite")
    # planted-r-j fires at token j+1 of rank r's first row; ids owned by either shard
    for rank in range(WORLD):
        for j in range(2):
            key, residual, metadata = _fact(keys[rank][0, j + 1], 10 * rank + j)
            db.add(key, residual, f"planted-{rank}-{j}", metadata)
    generator = torch.Generator().manual_seed(5)
    db.add(torch.randn(6, 48, generator=generator), torch.randn(6, 32, generator=generator),
           [f"distractor-{i}" for i in range(6)], [{"created_at": "2026-01-01T00:00:00+00:00"}] * 6)
    for rank in range(WORLD):
        db.save(tmp_path / f"reference-{rank}.sqlite")
    db.close()
    owners = {f"planted-{r}-{j}": shard_of(f"planted-{r}-{j}", WORLD) for r in range(WORLD) for j in range(2)}
    assert set(owners.values()) == {0, 1}, f"test premise: planted facts on both shards {owners}"
    report = split_database(tmp_path / "full.sqlite", WORLD, tmp_path / "shards")
    manifest = json.loads(report.manifest.path.read_text())
    manifest["shards"] = [str(path) for path in reversed(report.manifest.shards)]
    (tmp_path / "swapped.json").write_text(json.dumps(manifest))

    results = spawn_ranks(_rank_worker, WORLD, str(tmp_path / "model"), str(tmp_path), keys, timeout=240)
    for rank, result in enumerate(results):
        assert result["edited"] and result["changed"], f"test premise: facts fire and edits matter (rank {rank})"
        assert result["before"] and result["after"], f"rank {rank}: {result}"
        assert result["fired"] == result["single_fired"], f"rank {rank}"
        assert result["generated"], f"rank {rank}: generate differs from the single-process database's"
        assert result["refused"] == ["KeyError", "ValueError"]
    assert ("planted-1-0" in str(results[1]["fired"][0])) and ("planted-1-0" not in str(results[1]["fired"][1]))

    merge_shards(report.manifest, tmp_path / "merged.sqlite")
    assert _facts(tmp_path / "merged.sqlite") == _facts(tmp_path / "reference-0.sqlite")
    for path in report.manifest.shards:
        with NeuralDB.open(path, readonly=True) as shard:
            assert shard.verify().ok


def test_one_rank_attach_equals_attach_and_bad_arguments_are_refused(tmp_path, one_rank_group):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    keys = _capture_keys(model)
    with NeuralDB.for_model(model, layer=LAYER, gamma=GAMMA, path=tmp_path / "full.sqlite") as db:
        db.add(keys[0][0, 1:4], torch.randn(3, 32), ["a", "b", "c"], key_gammas=[None, torch.tensor([0.2]), None])
    report = split_database(tmp_path / "full.sqlite", 1, tmp_path / "shards")
    ids = _inputs(0)
    with NeuralDB.open(tmp_path / "full.sqlite", readonly=True) as db, attach(model, db) as single:
        expected = _forward(model, ids)
        expected_fired = single.fired()
    with ShardedNeuralDB.open(report.manifest, timeout=10) as sharded:
        for exchange in ("allreduce", "gather"):
            with attach(model, sharded, exchange=exchange) as handle:
                assert torch.equal(_forward(model, ids), expected)
                assert handle.fired() == expected_fired and {f.fact_id for f in expected_fired} == {"a", "b", "c"}
                assert "rank 0 of 1" in repr(handle) and handle.last_retrieval.communication.collectives == 4
        with pytest.raises(ValueError, match="exchange must be one of"):
            attach(model, sharded, exchange="broadcast")
        with NeuralDB.open(tmp_path / "full.sqlite", readonly=True) as db:
            with pytest.raises(ValueError, match="ShardedNeuralDB only"):
                attach(model, db, exchange="gather")
        with pytest.raises(ValueError, match="already has a NeuralDB attached"), attach(model, sharded):
            attach(model, sharded)
