"""The gate decisions of edited databases on CounterFact's test prompts, without scoring: which key
fires where, for global gammas and for the keys' own thresholds, in seconds once the queries are
cached.

Exact at the database's layer l*: a NeuralDB adds its residual to the output of layer l*'s
down-projection, after that layer's queries are read, so the queries of the unedited model are
the ones the gate sees with any database attached. Per case (the first --cases records of --data):
  bare prompt          the query at the subject's last token of the edit prompt
  paraphrase prompts   the query at the subject's last token (the last token when the subject is
                       not in the paraphrase)
  neighbourhood        every token of each neighbourhood prompt + its true answer (the text
                       `neuraldb eval` measures the fire rate on)
are computed once on the unedited model and cached in --cache (reused when it was made for the
same data, number of cases, layer and model; recomputed otherwise only if it does not exist).

For each database and each threshold setting (--gammas: every key at that gamma; "stored": each
key's own threshold, the database's gamma where it has none; --at-least X: the stored thresholds
raised to at least X), through `gated_retrieve` itself (argmax, lowest row on ties, then the
winner's threshold):
  bare_own, paraphrase_own   percent of cases (paraphrases: mean over a case's prompts) whose query
                             fires a key of the case's subject (a fact whose metadata "subject" is
                             the case's: the facts sharing its residual); necessary for efficacy
                             and generalization
  fire_rate                  percent of neighbourhood tokens that fire any key
  cases_fired                neighbourhood cases with at least one firing token (each a candidate
                             specificity loss)
and per database the bare prompts whose best key (any threshold) is another subject's, with the
winning fact and its cosine: no threshold can make those fire their own fact.

    python bench/gate_proxy.py --data ../shared/data/counterfact/counterfact-a.json --cases 1000 \\
        --cache /tmp/a1000.pt --db before=old.sqlite after=new.sqlite --at-least 0.7 0.75 --out proxy.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import torch

from neuraldb_kernels._files import write_text_atomically

CACHE_FORMAT = 1
BATCH = 64  # prompts per forward pass when the queries are computed


def _subject_span(text: str, subject: str) -> tuple[int, int] | None:
    start = text.find(subject)
    return None if start < 0 or not subject.strip() else (start, start + len(subject))


def case_queries(model, tokenizer, facts, cases, layer: int, *, module_path=None) -> dict:
    """The layer-`layer` down-projection inputs of the cases' test prompts on `model` as it is (the
    caller detaches or pauses any database): "bare" (n, d1) float32; "paraphrase" (p, d1) with
    "paraphrase_case" (p,) int64; "neighbourhood" (t, d1) with "neighbourhood_case" (t,) int64."""
    from neuraldb_kernels.editing.keys import down_proj_inputs, pad_token_id
    from neuraldb_kernels.editing.tokens import subject_last_token

    pad_id = pad_token_id(tokenizer)

    def at_positions(rows, positions):
        found = [down_proj_inputs(model, rows[s : s + BATCH], positions[s : s + BATCH], layer, pad_id=pad_id,
                                  module_path=module_path) for s in range(0, len(rows), BATCH)]
        return torch.cat(found).cpu() if found else torch.zeros(0, 0)

    bare = [subject_last_token(tokenizer, fact.filled_prompt, fact.subject_span) for fact in facts]
    paraphrase_rows, paraphrase_positions, paraphrase_case = [], [], []
    for number, case in enumerate(cases):
        for text in case.paraphrase_prompts:
            span = _subject_span(text, case.subject)
            if span is None:
                ids = list(tokenizer(text)["input_ids"])
                last = len(ids) - 1
            else:
                ids, last = subject_last_token(tokenizer, text, span)
            paraphrase_rows.append(ids)
            paraphrase_positions.append(last)
            paraphrase_case.append(number)
    neighbourhood, neighbourhood_case = [], []
    texts = [(number, f"{prompt} {true}") for number, case in enumerate(cases) for prompt, true in case.neighborhood]
    for start in range(0, len(texts), BATCH):
        chunk = texts[start : start + BATCH]
        rows = [list(tokenizer(text)["input_ids"]) for _, text in chunk]
        neighbourhood.append(down_proj_inputs(model, rows, None, layer, pad_id=pad_id, module_path=module_path).cpu())
        neighbourhood_case += [number for (number, _), row in zip(chunk, rows) for _ in row]
    return {"bare": at_positions([ids for ids, _ in bare], [last for _, last in bare]),
            "paraphrase": at_positions(paraphrase_rows, paraphrase_positions),
            "paraphrase_case": torch.tensor(paraphrase_case, dtype=torch.long),
            "neighbourhood": torch.cat(neighbourhood) if neighbourhood else torch.zeros(0, 0),
            "neighbourhood_case": torch.tensor(neighbourhood_case, dtype=torch.long)}


def cached_queries(path, identity: dict, compute) -> dict:
    """The queries cached at `path` for `identity` (data, cases, layer, model), else `compute()`'s,
    saved there. A cache made for something else is an error (it is never overwritten)."""
    path = pathlib.Path(path)
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached.get("identity") != {**identity, "format": CACHE_FORMAT}:
            raise ValueError(f"--cache {path} holds the queries of {cached.get('identity')}, not of {identity}: "
                             f"give another --cache path or delete it")
        return cached["queries"]
    queries = compute()
    temporary = path.with_name(path.name + ".partial")
    torch.save({"identity": {**identity, "format": CACHE_FORMAT}, "queries": queries}, temporary)
    os.replace(temporary, path)
    return queries


def setting_decisions(queries: dict, cases, snapshot, row_subjects: list, gamma) -> dict:
    """The proxy metrics (module docstring) of `snapshot`'s keys at threshold `gamma` (a number or
    a (m,) float32 tensor), row_subjects[i] the subject of view row i's fact (None: unknown)."""
    from neuraldb_kernels.ops import gated_retrieve

    keys, residuals = snapshot.keys, snapshot.residuals
    subject_ids = {subject: number for number, subject in enumerate(dict.fromkeys(row_subjects)) if subject is not None}
    row_subject = torch.tensor([subject_ids.get(subject, -1) for subject in row_subjects] + [-2], dtype=torch.long)
    case_subject = torch.tensor([subject_ids.get(case.subject, -3) for case in cases], dtype=torch.long)

    def fired(q):  # the fired row, -1 where the gate stays closed (index -1 maps to row_subject[-1] = -2)
        if not len(q):
            return torch.zeros(0, dtype=torch.long)
        return gated_retrieve(q.float(), keys, residuals, gamma, return_index=True)[1]

    bare_own = row_subject[fired(queries["bare"])] == case_subject
    paraphrase_own = (row_subject[fired(queries["paraphrase"])] == case_subject[queries["paraphrase_case"]]).double()
    per_case = torch.zeros(len(cases), dtype=torch.float64).index_add_(0, queries["paraphrase_case"], paraphrase_own)
    counts = torch.bincount(queries["paraphrase_case"], minlength=len(cases)).double()
    with_paraphrases = counts > 0
    neighbourhood = fired(queries["neighbourhood"]) >= 0
    cases_fired = torch.unique(queries["neighbourhood_case"][neighbourhood])
    return {"bare_own": 100.0 * float(bare_own.double().mean()),
            "paraphrase_own": 100.0 * float((per_case[with_paraphrases] / counts[with_paraphrases]).mean()),
            "fire_rate": 100.0 * float(neighbourhood.double().mean()) if len(neighbourhood) else 0.0,
            "fired_tokens": int(neighbourhood.sum()), "cases_fired": int(len(cases_fired))}


def bare_misses(queries: dict, cases, snapshot, row_subjects: list) -> list[dict]:
    """The cases whose bare-prompt query's best key row (no threshold) is not of their subject."""
    from neuraldb_kernels.ops import gated_retrieve

    if not len(snapshot.keys):
        return []
    _, best, score = gated_retrieve(queries["bare"].float(), snapshot.keys, snapshot.residuals, -1.0,
                                    return_index=True)
    row_ids = snapshot.ids_at(best)
    return [{"case": number, "prompt": case.prompt, "winner": row_ids[number], "winner_row": int(best[number]),
             "winner_subject": row_subjects[int(best[number])], "cosine": float(score[number])}
            for number, case in enumerate(cases) if row_subjects[int(best[number])] != case.subject]


def database_report(db, queries: dict, cases, gammas, at_least) -> dict:
    """Every threshold setting of one database (module docstring)."""
    snapshot = db.snapshot()
    metadata = db.metadata()
    row_ids = snapshot.ids_at(range(len(snapshot.keys)))
    row_subjects = [metadata.get(fact_id, {}).get("subject") for fact_id in row_ids]
    settings = [{"setting": f"global {gamma:g}", "gamma": gamma} for gamma in gammas]
    settings.append({"setting": "stored", "mean_threshold": float(snapshot.gammas.mean()) if len(row_ids) else None})
    settings += [{"setting": f"stored, at least {bound:g}", "at_least": bound,
                  "mean_threshold": float(snapshot.gammas.clamp(min=bound).mean()) if len(row_ids) else None}
                 for bound in at_least]
    rows = []
    for entry in settings:
        threshold = entry["gamma"] if "gamma" in entry else snapshot.gammas.clamp(min=entry.get("at_least", -1.0))
        rows.append({**entry, **setting_decisions(queries, cases, snapshot, row_subjects, threshold)})
    return {"path": str(db.path), "facts": len(db), "key_rows": len(row_ids), "settings": rows,
            "bare_misses": bare_misses(queries, cases, snapshot, row_subjects)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", nargs="+", required=True, metavar="[NAME=]PATH",
                        help="edited NeuralDB files (opened read-only), all at the same layer")
    parser.add_argument("--data", required=True, help="CounterFact records with paraphrase and neighbourhood prompts")
    parser.add_argument("--cases", type=int, default=1000, help="the first N records of --data")
    parser.add_argument("--cache", required=True, help="file of the cases' queries (made if absent)")
    parser.add_argument("--gammas", type=float, nargs="*", default=[0.65, 0.7, 0.75, 0.8, 0.85])
    parser.add_argument("--at-least", type=float, nargs="*", default=[0.7, 0.75, 0.8], dest="at_least",
                        help="also the stored thresholds raised to at least each of these")
    parser.add_argument("--model-dir", default=None, help="a Hugging Face model directory (default: SmolLM2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", required=True, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases must be >= 1, got {args.cases}")
    for value in [*args.gammas, *args.at_least]:
        if not -1.0 <= value <= 1.0:
            parser.error(f"--gammas and --at-least must lie in [-1, 1], got {value}")
    named = [entry.split("=", 1) if "=" in entry else [entry, entry] for entry in args.db]
    if len({name for name, _ in named}) != len(named):
        parser.error(f"--db names must differ, got {[name for name, _ in named]}")
    torch.set_num_threads(args.threads)

    from neuraldb_kernels import NeuralDB
    from neuraldb_kernels.editing import read_facts
    from neuraldb_kernels.evaluation.counterfact import CounterFactCase, case_from_fact
    from neuraldb_kernels.workspace import load_model, model_spec

    databases = {}
    for name, path in named:
        if not pathlib.Path(path).is_file():
            parser.error(f"--db {name}: no database file at {path}")
        databases[name] = NeuralDB.open(path, readonly=True)
    layers = {db.layer for db in databases.values()}
    if len(layers) != 1 or None in layers:
        parser.error(f"--db: the databases must share one layer, got {sorted(map(str, layers))}")
    [layer] = layers
    facts = read_facts(args.data, limit=args.cases)
    cases = [case_from_fact(fact, number) for number, fact in enumerate(facts)]
    if not all(isinstance(case, CounterFactCase) and case.paraphrase_prompts and case.neighborhood for case in cases):
        parser.error(f"--data {args.data}: every case needs paraphrase and neighbourhood prompts (CounterFact)")
    started = time.perf_counter()
    identity = {"data": str(pathlib.Path(args.data).resolve()), "cases": len(cases), "layer": layer,
                "model": str(pathlib.Path(args.model_dir).resolve()) if args.model_dir else "default"}

    def compute() -> dict:
        model, tokenizer = load_model(model_spec(args.model_dir or "default"))
        return case_queries(model, tokenizer, facts, cases, layer)

    try:
        queries = cached_queries(args.cache, identity, compute)
    except ValueError as error:
        parser.error(str(error))
    query_seconds = time.perf_counter() - started
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg(), "command": " ".join(sys.argv),
              **identity, "query_seconds": query_seconds, "neighbourhood_tokens": len(queries["neighbourhood"]),
              "paraphrase_prompts": len(queries["paraphrase"]), "metrics_unit": "percent",
              "databases": {name: database_report(db, queries, cases, args.gammas, args.at_least)
                            for name, db in databases.items()}}
    report["seconds"] = time.perf_counter() - started
    write_text_atomically(args.out, json.dumps(report, indent=1))
    for name, entry in report["databases"].items():
        print(f"{name}: {entry['facts']} facts, {entry['key_rows']} key rows, "
              f"{len(entry['bare_misses'])} bare prompts won by another subject's key")
        for row in entry["settings"]:
            print(f"  {row['setting']:24} bare {row['bare_own']:5.1f}  paraphrase {row['paraphrase_own']:5.1f}  "
                  f"fire {row['fire_rate']:5.2f} %  cases {row['cases_fired']}")
    return report


if __name__ == "__main__":
    main()
