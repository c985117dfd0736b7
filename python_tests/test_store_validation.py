"""Every rejected input of NeuralDB: a clear error naming the problem, and nothing stored (the
database, its views and its file unchanged)."""

import json
import sqlite3
import warnings

import pytest
import torch

from neuraldb_kernels.store import NeuralDB

D1, D2 = 6, 4


def _ok(n):
    return torch.randn(n, D1), torch.randn(n, D2)


@pytest.fixture
def db(tmp_path):
    db = NeuralDB(tmp_path / "v.ndb", d1=D1, d2=D2, dtype=torch.float16)
    keys, residuals = _ok(3)
    db.add(keys, residuals, ["a", "b", "c"])
    db.view(dtype=torch.float64)  # a second view that must stay unchanged too
    yield db
    db.close()


def _with_nan(tensor, row, col=1, value=float("nan")):
    tensor = tensor.clone()
    tensor[row, col] = value
    return tensor


K3, R3 = _ok(3)
BAD_ADDS = [
    (dict(keys=torch.randn(3, D1 + 1), residuals=R3), ValueError, r"keys must have shape \(6,\) .* got \(3, 7\)"),
    (dict(keys=K3, residuals=torch.randn(3, 5)), ValueError, r"residuals must have shape \(4,\) .* got \(3, 5\)"),
    (dict(keys=torch.randn(2, 3, D1), residuals=R3), ValueError, r"keys must have shape"),
    (dict(keys=K3, residuals=torch.randn(2, D2)), ValueError, r"different numbers of facts"),
    (dict(keys=K3[0], residuals=R3), ValueError, r"different numbers of facts"),
    (dict(keys=K3.tolist(), residuals=R3), TypeError, r"keys must be a torch.Tensor, got list"),
    (dict(keys=K3.to(torch.int32), residuals=R3), TypeError, r"float16/bfloat16/float32/float64 tensor, got torch.int32"),
    (dict(keys=_with_nan(K3, 2), residuals=R3, ids=["x", "y", "z"]), ValueError,
     r"key of fact 'z' \(batch position 2\) contains NaN or Inf"),
    (dict(keys=K3, residuals=_with_nan(R3, 1, value=float("inf")), ids=["x", "y", "z"]), ValueError,
     r"residual of fact 'y' \(batch position 1\) contains NaN or Inf"),
    # finite in float32 but overflows the float16 storage dtype
    (dict(keys=_with_nan(K3, 0, value=1e6), residuals=R3, ids=["x", "y", "z"]), ValueError,
     r"key of fact 'x' \(batch position 0\) contains NaN or Inf \(in storage dtype float16\)"),
    (dict(keys=torch.cat([K3[:2], torch.zeros(1, D1)]), residuals=R3, ids=["x", "y", "z"]), ValueError,
     r"key of fact 'z' \(batch position 2\) has zero norm"),
    # non-zero in float32, zero after conversion to float16
    (dict(keys=torch.cat([K3[:2], torch.full((1, D1), 1e-9)]), residuals=R3, ids=["x", "y", "z"]), ValueError,
     r"key of fact 'z' .* has zero norm"),
    (dict(keys=K3, residuals=R3, ids=["x", "y", "x"]), ValueError, r"duplicate id 'x' in the batch \(positions 0 and 2\)"),
    (dict(keys=K3, residuals=R3, ids=["x", "y"]), ValueError, r"got 2 ids for 3 facts"),
    (dict(keys=K3, residuals=R3, ids=["x", "", "z"]), TypeError, r"id at batch position 1 must be a non-empty str"),
    (dict(keys=K3, residuals=R3, ids=["x", 7, "z"]), TypeError, r"id at batch position 1 must be a non-empty str, got 7"),
    (dict(keys=K3, residuals=R3, ids=["x", "b", "z"]), ValueError, r"already in the database, e.g. 'b'; use upsert"),
    (dict(keys=K3, residuals=R3, metadata=[{}, {}]), ValueError, r"got 2 metadata entries for 3 facts"),
    (dict(keys=K3, residuals=R3, metadata={"subject": "s"}), ValueError, r"metadata is one mapping but the batch has 3"),
    (dict(keys=K3, residuals=R3, ids=["x", "y", "z"], metadata=[{}, {"when": object()}, {}]), ValueError,
     r"metadata of fact 'y' \(batch position 1\) is not JSON-serialisable"),
    (dict(keys=K3, residuals=R3, ids=["x", "y", "z"], metadata=[{}, {}, {"score": float("nan")}]), ValueError,
     r"metadata of fact 'z' .* is not JSON-serialisable"),
    (dict(keys=K3, residuals=R3, ids=["x", "y", "z"], metadata=[{}, {"subject": 3}, {}]), TypeError,
     r"metadata field 'subject' of fact 'y' .* must be a str or None, got int"),
    (dict(keys=K3, residuals=R3, ids=["x", "y", "z"], metadata=[{}, {1: "a"}, {}]), TypeError, r"non-str field name 1"),
    (dict(keys=K3, residuals=R3, ids=["x", "y", "z"], metadata=[{}, "subject", {}]), TypeError,
     r"metadata of fact 'y' .* must be a mapping or None, got str"),
    (dict(keys=K3, residuals=R3, metadata="subject"), TypeError, r"metadata must be a mapping, a sequence"),
]


BAD_UPSERTS = [case for case in BAD_ADDS if "already in the database" not in case[2]]  # upsert replaces those


@pytest.mark.parametrize("kwargs, error, message", BAD_ADDS, ids=[m for _, _, m in BAD_ADDS])
def test_bad_add_is_rejected_whole(db, kwargs, error, message):
    _assert_rejected_whole(db, db.add, kwargs, error, message)


@pytest.mark.parametrize("kwargs, error, message", BAD_UPSERTS, ids=[m for _, _, m in BAD_UPSERTS])
def test_bad_upsert_is_rejected_whole(db, kwargs, error, message):
    _assert_rejected_whole(db, db.upsert, {"ids": ["x", "y", "z"], **kwargs}, error, message)


def _assert_rejected_whole(db, method, kwargs, error, message):
    before_keys, before_residuals = (t.clone() for t in db.view())
    before_64 = db.view(dtype=torch.float64)[0].clone()
    version, length = db.version, len(db)
    with pytest.raises(error, match=message):
        method(**kwargs)
    assert (db.version, len(db), list(db)) == (version, length, ["a", "b", "c"])
    assert torch.equal(db.view()[0], before_keys) and torch.equal(db.view()[1], before_residuals)
    assert torch.equal(db.view(dtype=torch.float64)[0], before_64)
    conn = sqlite3.connect(db.path)
    assert sorted(row[0] for row in conn.execute("SELECT id FROM facts")) == ["a", "b", "c"]
    conn.close()


def test_delete_errors_and_missing_ok(db):
    with pytest.raises(KeyError, match=r"1 id\(s\) not in the database, e.g. 'nope' \(pass missing_ok=True"):
        db.delete(["a", "nope"])
    assert len(db) == 3 and "a" in db  # nothing deleted
    with pytest.raises(ValueError, match="duplicate ids"):
        db.delete(["a", "a"])
    with pytest.raises(TypeError, match="id at position 0 must be a str"):
        db.delete([1])
    with pytest.raises(TypeError, match="ids must be a str or a sequence"):
        db.delete(5)
    assert db.delete(["a", "nope"], missing_ok=True) == ["a"]
    assert db.delete("nope", missing_ok=True) == [] and len(db) == 2


def test_get_missing_and_upsert_without_ids(db):
    with pytest.raises(KeyError, match="no fact with id 'zz'"):
        db.get("zz")
    with pytest.raises(ValueError, match="upsert needs the ids"):
        db.upsert(*_ok(1), ids=None)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(d1=0, d2=4), ValueError, "d1 must be a positive int, got 0"),
    (dict(d1=4, d2=2.5), ValueError, "d2 must be a positive int, got 2.5"),
    (dict(d1=4, d2=4, layer=-1), ValueError, "layer must be None or a non-negative int"),
    (dict(d1=4, d2=4, gamma=float("nan")), ValueError, "gamma must be a finite float"),
    (dict(d1=4, d2=4, dtype=torch.float64), ValueError, "unsupported storage dtype torch.float64"),
    (dict(d1=4, d2=4, dtype="int8"), ValueError, "unsupported storage dtype 'int8'"),
    (dict(d1=4, d2=4, dtype=3), TypeError, "dtype must be a torch.dtype or its name"),
])
def test_bad_settings(kwargs, error, message):
    with pytest.raises(error, match=message):
        NeuralDB(**kwargs)


def test_string_dtype_names_are_accepted():
    assert NeuralDB(d1=2, d2=2, dtype="bfloat16").dtype == torch.bfloat16


def test_create_open_and_path_errors(tmp_path):
    path = tmp_path / "x.ndb"
    NeuralDB(path, d1=2, d2=2).close()
    with pytest.raises(FileExistsError, match="already exists; open an existing database with NeuralDB.open"):
        NeuralDB(path, d1=2, d2=2)
    with pytest.raises(FileNotFoundError, match="no NeuralDB database at"):
        NeuralDB.open(tmp_path / "missing.ndb")
    (tmp_path / "text.ndb").write_text("hello, not a database " * 100)
    with pytest.raises(ValueError, match="is not a NeuralDB database"):
        NeuralDB.open(tmp_path / "text.ndb")
    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    conn.close()
    header = foreign.read_bytes()[:100]
    with pytest.raises(ValueError, match=r"is not a NeuralDB database \(SQLite application_id 0x0, tables \['t'\]\)"):
        NeuralDB.open(foreign)
    assert foreign.read_bytes()[:100] == header  # not switched to WAL or otherwise touched


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "new.ndb"
    NeuralDB(path, d1=2, d2=2).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE name = 'format_version'", (json.dumps(99),))
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="format version 99, newer than the newest this neuraldb_kernels reads"):
        NeuralDB.open(path)


def test_closed_database_refuses_work(tmp_path):
    db = NeuralDB(d1=2, d2=2)
    db.close()
    db.close()  # idempotent
    assert db.closed
    for call in (lambda: db.add(torch.ones(2), torch.ones(2)), lambda: db.view(), lambda: db.delete("a"),
                 lambda: db.save(tmp_path / "c.ndb"), lambda: db.refresh()):
        with pytest.raises(ValueError, match="this NeuralDB is closed"):
            call()


def test_view_search_and_ids_at_arguments(db):
    with pytest.raises(TypeError, match="view dtype must be a floating torch.dtype"):
        db.view(dtype=torch.int64)
    with pytest.raises(IndexError, match=r"row index 3 out of range for a view of 3 rows"):
        db.ids_at([3])
    with pytest.raises(IndexError, match=r"row index -2 out of range"):
        db.snapshot().ids_at(torch.tensor([-2]))
    with pytest.raises(ValueError, match=r"q must have shape \(6,\), got \(2, 6\)"):
        db.search(torch.ones(2, D1))
    with pytest.raises(TypeError, match="q must be a floating torch.Tensor"):
        db.search(torch.ones(D1, dtype=torch.int64))
    with pytest.raises(ValueError, match="q must be finite with a non-zero norm"):
        db.search(torch.zeros(D1))
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        db.search(torch.ones(D1), k=0)


def test_export_import_errors(tmp_path, db):
    with pytest.raises(ValueError, match="must end in .safetensors"):
        db.export(tmp_path / "out.bin")
    db.export(tmp_path / "out.safetensors")
    with pytest.raises(FileExistsError, match="export never overwrites"):
        db.export(tmp_path / "out.safetensors")

    sidecar = tmp_path / "out.json"
    document = json.loads(sidecar.read_text())

    def rewrite(**changes):
        sidecar.write_text(json.dumps({**document, **changes}))

    def refused(error, message):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(error, match=message):
                NeuralDB.import_(tmp_path / "out.safetensors", tmp_path / "imported.ndb")
        assert not (tmp_path / "imported.ndb").exists()

    rewrite(format_version=99)
    refused(ValueError, "format_version 99; this neuraldb_kernels reads up to")
    rewrite(format="zip")
    refused(ValueError, "is not a NeuralDB export sidecar")
    rewrite(safetensors_sha256="0" * 64)
    refused(ValueError, r"does not match its sidecar .*\(SHA-256 differs\)")
    rewrite(d1=D1 + 1)
    refused(ValueError, r"tensor 'keys' is torch.float16 \(3, 6\), the sidecar describes torch.float16 \(3, 7\)")
    rewrite(dtype="bfloat16")
    refused(ValueError, r"tensor 'keys' is torch.float16 \(3, 6\), the sidecar describes torch.bfloat16")
    rewrite(dtype="float64")
    refused(ValueError, "unsupported storage dtype 'float64'")
    rewrite(ids=["a", "b", "a"])
    refused(ValueError, r"duplicate id 'a' in the batch \(positions 0 and 2\)")
    rewrite(metadata=[{}, {}])
    refused(ValueError, "has 3 ids but 2 metadata entries")
    rewrite(ids=["a", "b"], key_counts=[1, 1])
    refused(ValueError, r"the sidecar describes torch.float16 \(2, 6\)")
    rewrite(key_counts=[1, 2, 1])  # four key rows described, three stored
    refused(ValueError, r"tensor 'keys' is torch.float16 \(3, 6\), the sidecar describes torch.float16 \(4, 6\)")
    for bad in ([1, 1], [1, 0, 1], [1, True, 1], "1,1,1"):
        rewrite(key_counts=bad)
        refused(ValueError, "'key_counts' must be a list of 3 positive ints")
    sidecar.write_text(json.dumps({key: value for key, value in document.items() if key != "key_counts"}))
    refused(ValueError, r"lacks the field 'key_counts' \(format version 3\)")
    sidecar.write_text(json.dumps({key: value for key, value in document.items() if key != "gamma"}))
    refused(ValueError, r"lacks the fields \['gamma'\]")
    sidecar.write_text("{not json")
    refused(ValueError, "is not valid JSON")
    sidecar.unlink()
    refused(FileNotFoundError, "export file .*out.json not found")
