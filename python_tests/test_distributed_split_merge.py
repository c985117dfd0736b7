"""Split a NeuralDB into shards and merge them back, in one process: every fact bit for bit,
each in the shard its id hashes to (the owner recomputed here with hashlib), nothing left
half-written on failure, manifests checked. (Sharded writes and retrieval across processes:
test_distributed_attach.py and test_distributed_retrieval.py.)"""

import hashlib
import json

import pytest
import torch

from neuraldb_kernels import NeuralDB
from neuraldb_kernels.distributed import ShardedNeuralDB, merge_shards, read_manifest, shard_of, split_database
from neuraldb_kernels.store import ModelFingerprint

D1, D2 = 12, 6


def owner(fact_id: str, shards: int) -> int:
    """The owner rule written out independently: BLAKE2b-64 of the UTF-8 id, little-endian, mod N."""
    return int.from_bytes(hashlib.blake2b(fact_id.encode(), digest_size=8).digest(), "little") % shards


def make_source(path, count=40, dtype=torch.bfloat16):
    """A database with every kind of fact: extra keys, per-key thresholds, EditRecord metadata,
    non-ASCII text, a fingerprint."""
    fingerprint = ModelFingerprint("llama", 1, D1, D2, "ab" * 32, {"name": "tiny"})
    db = NeuralDB(path, d1=D1, d2=D2, gamma=0.7, dtype=dtype, fingerprint=fingerprint)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        extra = torch.randn(i % 3, D1, generator=generator) if i % 3 else None
        gammas = torch.rand(1 + i % 3, generator=generator) if i % 2 else None
        metadata = {"subject": f"Sübject {i}", "prompt": "{} lives in", "target_new": "Zürich",
                    "edit": {"version": 1, "layer": 1, "steps": i, "hparams": {"lr": 0.5}}, "score": i / 7}
        db.add(torch.randn(D1, generator=generator), torch.randn(D2, generator=generator), f"fact-{i}", metadata,
               extra_keys=extra, key_gammas=gammas)
    db.close()


def fact_bits(fact):
    """Everything a fact stores, as bytes / JSON text (created_at included)."""
    return (fact.keys.view(torch.uint8).numpy().tobytes(), fact.residual.view(torch.uint8).numpy().tobytes(),
            None if fact.key_gammas is None else fact.key_gammas.numpy().tobytes(),
            json.dumps(fact.metadata, ensure_ascii=False))


def files(folder):
    """The names in `folder`, without SQLite's -wal / -shm companions (readers may leave them)."""
    return [p.name for p in folder.iterdir() if not p.name.endswith(("-wal", "-shm"))]


def all_facts(path):
    with NeuralDB.open(path, readonly=True) as db:
        return {fact.id: fact_bits(fact) for fact in db.facts()}, (db.d1, db.d2, db.layer, db.gamma, db.dtype,
                                                                   db.fingerprint)


def test_the_owner_is_a_stable_hash_of_the_id():
    ids = [f"fact-{i}" for i in range(200)] + ["Zürich", "東京", "x" * 1000]
    for shards in (1, 2, 3, 4, 7):
        assert [shard_of(fact_id, shards) for fact_id in ids] == [owner(fact_id, shards) for fact_id in ids]
    assert sorted({shard_of(fact_id, 4) for fact_id in ids}) == [0, 1, 2, 3]
    with pytest.raises(TypeError, match="non-empty str"):
        shard_of("", 2)
    with pytest.raises(ValueError, match="positive"):
        shard_of("a", 0)


@pytest.mark.parametrize("shards", [1, 3])
def test_split_then_merge_gives_back_every_fact_bit_for_bit(tmp_path, shards):
    make_source(tmp_path / "source.sqlite")
    original, settings = all_facts(tmp_path / "source.sqlite")
    report = split_database(tmp_path / "source.sqlite", shards, tmp_path / "shards")
    assert report.manifest.num_shards == shards and sum(report.facts_per_shard) == len(original)
    for shard, path in enumerate(report.manifest.shards):
        held, shard_settings = all_facts(path)
        assert shard_settings == settings
        assert sorted(held) == sorted(i for i in original if owner(i, shards) == shard)
        assert all(held[i] == original[i] for i in held)
    merged = merge_shards(tmp_path / "shards" / "manifest.json", tmp_path / "merged.sqlite")
    assert merged.facts_per_shard == report.facts_per_shard
    facts, merged_settings = all_facts(tmp_path / "merged.sqlite")
    assert merged_settings == settings
    assert facts == original
    # the merged file lists shard 0's facts first, then shard 1's, ...: the sharded global row order
    with NeuralDB.open(tmp_path / "merged.sqlite", readonly=True) as db:
        assert [owner(i, shards) for i in db] == sorted(owner(i, shards) for i in db)
    assert sorted(files(tmp_path)) == ["merged.sqlite", "merged.sqlite-vectors", "shards", "source.sqlite",
                                       "source.sqlite-vectors"]
    assert sorted(files(tmp_path / "shards")) == sorted(
        ["manifest.json", *(name for path in report.manifest.shards for name in (path.name, path.name + "-vectors"))])


def test_split_and_merge_never_overwrite_and_leave_nothing_half_written(tmp_path, monkeypatch):
    make_source(tmp_path / "source.sqlite", count=8)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        split_database(tmp_path / "source.sqlite", 2, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="positive int"):
        split_database(tmp_path / "source.sqlite", 0, tmp_path / "zero")

    calls = []
    real_add = NeuralDB.add

    def failing_add(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(NeuralDB, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        split_database(tmp_path / "source.sqlite", 2, tmp_path / "failed")
    assert not (tmp_path / "failed").exists()
    monkeypatch.setattr(NeuralDB, "add", real_add)

    split_database(tmp_path / "source.sqlite", 2, tmp_path / "shards")
    (tmp_path / "exists.sqlite").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="already exists"):
        merge_shards(tmp_path / "shards", tmp_path / "exists.sqlite")
    assert (tmp_path / "exists.sqlite").read_bytes() == b"mine"
    (tmp_path / "orphan.sqlite-vectors").write_bytes(b"mine too")  # a vector file is a database's file too
    with pytest.raises(FileExistsError):
        merge_shards(tmp_path / "shards", tmp_path / "orphan.sqlite")
    assert (tmp_path / "orphan.sqlite-vectors").read_bytes() == b"mine too"
    assert not (tmp_path / "orphan.sqlite").exists()
    (tmp_path / "orphan.sqlite-vectors").unlink()
    calls.clear()
    monkeypatch.setattr(NeuralDB, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        merge_shards(tmp_path / "shards", tmp_path / "merged.sqlite")
    assert sorted(files(tmp_path)) == ["exists.sqlite", "full", "shards", "source.sqlite", "source.sqlite-vectors"]


def test_merge_refuses_shards_that_disagree_and_bad_manifests(tmp_path):
    make_source(tmp_path / "source.sqlite", count=8)
    report = split_database(tmp_path / "source.sqlite", 2, tmp_path / "shards")
    with NeuralDB.open(report.manifest.shards[1]) as shard:
        shard.gamma = 0.5
    with pytest.raises(ValueError, match="shard 1 .* gamma 0.5"):
        merge_shards(report.manifest, tmp_path / "merged.sqlite")
    assert not (tmp_path / "merged.sqlite").exists()

    manifest = tmp_path / "shards" / "manifest.json"
    document = json.loads(manifest.read_text())
    bad = {"not JSON": "{", "format": json.dumps({**document, "format": "other"}),
           "num_shards": json.dumps({**document, "num_shards": 3}),
           "settings": json.dumps({**document, "settings": {"d1": D1}}),
           "owner_function": json.dumps({**document, "owner_function": "python-hash"})}
    for why, text in bad.items():
        manifest.write_text(text)
        with pytest.raises(ValueError, match="not a valid NeuralDB shard manifest"):
            read_manifest(manifest)
    manifest.write_text(json.dumps({**document, "settings": {**document["settings"], "d1": D1 + 1}}))
    with pytest.raises(ValueError, match="has settings"):
        merge_shards(manifest, tmp_path / "merged.sqlite")
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        read_manifest(tmp_path / "missing.json")


def test_opening_checks_the_world_size_and_the_shard(tmp_path, one_rank_group):
    make_source(tmp_path / "source.sqlite", count=8)
    report = split_database(tmp_path / "source.sqlite", 2, tmp_path / "two")
    with pytest.raises(ValueError, match="2 shards but the process group has 1 ranks"):
        ShardedNeuralDB.open(report.manifest)
    one = split_database(tmp_path / "source.sqlite", 1, tmp_path / "one")
    with ShardedNeuralDB.open(one.manifest.path.parent) as sharded:
        assert (sharded.rank, sharded.num_shards, len(sharded.local)) == (0, 1, 8)
        assert sharded.get("fact-3").id == "fact-3"


def test_cli_split_and_merge(tmp_path, neuraldb):
    (tmp_path / "workspace").mkdir()
    make_source(tmp_path / "workspace" / "neuraldb.sqlite", count=10)
    code, out, err = neuraldb("db", "split", "--db", tmp_path / "workspace", "--shards", 3, "--out", tmp_path / "shards")
    assert code == 0, err
    assert out.startswith("split 10 facts of ") and "into 3 shards" in out and "manifest.json" in out
    code, out, err = neuraldb("db", "merge", "--manifest", tmp_path / "shards" / "manifest.json",
                              "--out", tmp_path / "merged.sqlite")
    assert code == 0, err
    assert out.strip() == f"merged 10 facts from 3 shards into {tmp_path / 'merged.sqlite'}"
    assert all_facts(tmp_path / "merged.sqlite") == all_facts(tmp_path / "workspace" / "neuraldb.sqlite")
    code, _, err = neuraldb("db", "merge", "--manifest", tmp_path / "shards", "--out", tmp_path / "merged.sqlite")
    assert code == 1 and err.startswith("neuraldb: error: ") and "already exists" in err
    code, _, err = neuraldb("db", "split", "--db", tmp_path / "workspace", "--shards", 2, "--out", tmp_path / "shards")
    assert code == 1 and "not an empty folder" in err
    code, _, err = neuraldb("db", "merge", "--manifest", tmp_path / "nowhere.json", "--out", tmp_path / "m2.sqlite")
    assert code == 1 and "no shard manifest" in err
    code, _, err = neuraldb("db", "split", "--db", tmp_path / "workspace", "--shards", 0, "--out", tmp_path / "s0")
    assert code == 2 and "positive integer" in err
