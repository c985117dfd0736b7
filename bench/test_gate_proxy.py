"""bench/gate_proxy.py on a tiny random Llama and a hand-made database whose keys are queries of the
cases' own prompts (read here by a hook, in float64), so the gate decisions are known: every
setting's numbers equal a float64 brute-force reference, the cached queries are reused (and a cache
made for other cases refused), and the database file is only read."""

import hashlib
import json

import pytest
import torch
from gate_proxy import main
from tiny_models import token_queries

CASES = 3
LAYER = 1
STRICT = 0.999  # a stored threshold only the query a key was read from (and its copies) passes


def _last_subject_token(encoded, start, end):
    return max(i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start and b > a)


def _case_queries(model, tokenizer, cases):
    """Float64 reference queries: bare (n, d1), paraphrase list of (case, query), neighbourhood list of
    (case, query) at every token."""
    bare, paraphrase, neighbourhood = [], [], []
    for number, case in enumerate(cases):
        start = case.prompt.index(case.subject)
        encoded, queries = token_queries(model, tokenizer, case.prompt, LAYER)
        bare.append(queries[_last_subject_token(encoded, start, start + len(case.subject))])
        for text in case.paraphrase_prompts:
            encoded, queries = token_queries(model, tokenizer, text, LAYER)
            found = text.find(case.subject)
            at = len(queries) - 1 if found < 0 else _last_subject_token(encoded, found, found + len(case.subject))
            paraphrase.append((number, queries[at]))
        for prompt, true in case.neighborhood:
            _, queries = token_queries(model, tokenizer, f"{prompt} {true}", LAYER)
            neighbourhood += [(number, query) for query in queries]
    return torch.stack(bare), paraphrase, neighbourhood


def _reference(keys, subjects, thresholds, cases, bare, paraphrase, neighbourhood):
    """The proxy's numbers from float64 cosines: argmax key, fired iff above its threshold."""
    unit_keys = torch.nn.functional.normalize(keys, dim=1)

    def fired(query):
        scores = unit_keys @ torch.nn.functional.normalize(query, dim=0)
        best = int(scores.argmax())
        return best if scores[best] > thresholds[best] else None

    def owns(number, query):
        row = fired(query)
        return row is not None and subjects[row] == cases[number].subject

    bare_own = sum(owns(n, q) for n, q in enumerate(bare)) / len(cases)
    per_case = [[owns(n, q) for m, q in paraphrase if m == n] for n in range(len(cases))]
    paraphrase_own = sum(sum(hits) / len(hits) for hits in per_case) / len(cases)
    fires = [(n, fired(q) is not None) for n, q in neighbourhood]
    return {"bare_own": 100 * bare_own, "paraphrase_own": 100 * paraphrase_own,
            "fire_rate": 100 * sum(f for _, f in fires) / len(fires), "fired_tokens": sum(f for _, f in fires),
            "cases_fired": len({n for n, f in fires if f})}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, counterfact_path):
    """The database (keys: case 0's bare query under its subject, case 1's first paraphrase query
    under its subject, the query at the 3rd token of case 2's first neighbourhood text under a
    subject no case has; thresholds STRICT), the cases and the reference queries."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuraldb_kernels import NeuralDB
    from neuraldb_kernels.editing import read_facts
    from neuraldb_kernels.evaluation.counterfact import case_from_fact
    from neuraldb_kernels.integration import model_fingerprint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cases = [case_from_fact(fact, n) for n, fact in enumerate(read_facts(counterfact_path, limit=CASES))]
    bare, paraphrase, neighbourhood = _case_queries(model, tokenizer, cases)
    case2 = [q for n, q in neighbourhood if n == 2]
    keys = torch.stack([bare[0], next(q for n, q in paraphrase if n == 1), case2[2]])
    subjects = [cases[0].subject, cases[1].subject, "Nobody Atall"]
    path = tmp_path_factory.mktemp("proxy") / "facts.sqlite"
    db = NeuralDB(path, d1=keys.shape[1], d2=32, layer=LAYER, gamma=0.5,
                  fingerprint=model_fingerprint(model, LAYER))
    db.add(keys.float(), torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), ["a", "b", "c"],
           [{"subject": subject} for subject in subjects], key_gammas=[torch.tensor([STRICT])] * 3)
    db.close()
    return {"path": path, "keys": keys, "subjects": subjects, "cases": cases,
            "queries": (bare, paraphrase, neighbourhood)}


def test_every_setting_equals_a_float64_reference_and_the_cache_is_reused(tmp_path, setup, tiny_model_dir,
                                                                           counterfact_path, monkeypatch):
    import gate_proxy

    before = hashlib.sha256(setup["path"].read_bytes()).hexdigest()
    cache, out = tmp_path / "queries.pt", tmp_path / "proxy.json"
    common = ["--data", str(counterfact_path), "--cases", str(CASES), "--cache", str(cache), "--model-dir",
              str(tiny_model_dir), "--threads", "1", "--db", f"hand={setup['path']}", "--gammas", "-1", "1",
              "--at-least", "-1", "0.9995", "--out", str(out)]
    report = main(common)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert hashlib.sha256(setup["path"].read_bytes()).hexdigest() == before  # read only
    entry = report["databases"]["hand"]
    assert (entry["facts"], entry["key_rows"]) == (3, 3)
    thresholds = {"global -1": torch.full((3,), -1.0), "global 1": torch.full((3,), 1.0),
                  "stored": torch.full((3,), STRICT), "stored, at least -1": torch.full((3,), STRICT),
                  "stored, at least 0.9995": torch.full((3,), 0.9995)}
    rows = {row["setting"]: row for row in entry["settings"]}
    assert sorted(rows) == sorted(thresholds)
    for name, threshold in thresholds.items():
        expected = _reference(setup["keys"], setup["subjects"], threshold.double(), setup["cases"],
                              *setup["queries"])
        assert {key: rows[name][key] for key in expected} == pytest.approx(expected), name
    # what the database was built for: at the stored thresholds case 0's bare prompt, case 1's first
    # paraphrase and a token of case 2's neighbourhood fire; at global 1 nothing, at -1 every token
    stored, nothing, everything = rows["stored"], rows["global 1"], rows["global -1"]
    assert stored["bare_own"] == pytest.approx(100 / 3) and stored["fired_tokens"] >= 1
    assert stored["paraphrase_own"] > 0 and stored["cases_fired"] >= 1
    assert (nothing["bare_own"], nothing["paraphrase_own"], nothing["fire_rate"], nothing["cases_fired"]) == (0, 0, 0, 0)
    assert everything["fire_rate"] == 100.0 and everything["cases_fired"] == CASES
    unit_keys = torch.nn.functional.normalize(setup["keys"], dim=1)
    best = (torch.nn.functional.normalize(setup["queries"][0], dim=1) @ unit_keys.T).argmax(dim=1).tolist()
    assert [miss["case"] for miss in entry["bare_misses"]] == [
        n for n in range(CASES) if setup["subjects"][best[n]] != setup["cases"][n].subject]
    # the cached queries are reused: nothing is computed again
    monkeypatch.setattr(gate_proxy, "case_queries", lambda *a, **k: pytest.fail("queries recomputed"))
    again = main(common)
    assert again["databases"] == report["databases"]


def test_a_cache_of_other_cases_and_bad_arguments_are_refused(tmp_path, setup, tiny_model_dir, counterfact_path,
                                                              capsys):
    cache = tmp_path / "queries.pt"
    common = ["--data", str(counterfact_path), "--cache", str(cache), "--model-dir", str(tiny_model_dir),
              "--threads", "1", "--out", str(tmp_path / "out.json")]
    main(common + ["--cases", "1", "--db", str(setup["path"])])
    with pytest.raises(SystemExit):
        main(common + ["--cases", "2", "--db", str(setup["path"])])
    assert "holds the queries of" in capsys.readouterr().err
    for bad, message in ((["--cases", "0"], "--cases must be >= 1"), (["--gammas", "1.5"], "must lie in"),
                         (["--db", f"x={setup['path']}", f"x={setup['path']}"], "names must differ"),
                         (["--db", str(tmp_path / "missing.sqlite")], "no database file")):
        argv = common + ["--cases", "1"] + (["--db", str(setup["path"])] if "--db" not in bad else []) + bad
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
