"""Why specificity drops as a NeuralDB grows: which facts fire on the CounterFact neighbourhood
prompts of the first N cases, and how many lost cases name a subject the database edits.

    python bench/neighbourhood_firings.py DATABASE.sqlite [--cases 1000] [--threads 2] [--out FILE.json]

Scores the cases' specificity (per case, compare="token_mean") on the bare model and with the
database attached, then runs every neighbourhood prompt once attached and records the facts that
fired on it. A lost case whose prompt contains the subject of a fired fact is one where the edit
applies as intended (the neighbour is itself edited, or shares the edited subject's tokens).
Prints JSON: counts, the facts that fire most often (and at which positions), and examples.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

import torch

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact" / "counterfact-a.json"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("database")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from neuraldb_kernels.editing import read_counterfact
    from neuraldb_kernels.evaluation import case_scores, cases_from_facts
    from neuraldb_kernels.integration import attach, load_default_model
    from neuraldb_kernels.store import NeuralDB

    model, tokenizer = load_default_model()
    db = NeuralDB.open(args.database)
    facts = read_counterfact(args.data, limit=args.cases)
    cases = cases_from_facts(facts)
    prompts = [case.neighborhood[0][0] for case in cases]  # flattened CounterFact: one per case
    before = case_scores(model, tokenizer, cases, compare="token_mean")["specificity"]
    fired_by = [set() for _ in prompts]
    positions = collections.Counter()
    with attach(model, db) as handle:
        after = case_scores(model, tokenizer, cases, compare="token_mean")["specificity"]
        tokenizer.padding_side = "right"
        for start in range(0, len(prompts), 32):
            batch = tokenizer(prompts[start : start + 32], return_tensors="pt", padding=True)
            with torch.no_grad():
                model(**batch)
            for firing in handle.fired():
                if batch["attention_mask"][firing.batch, firing.position]:
                    fired_by[start + firing.batch].add(firing.fact_id)
                    positions[(firing.fact_id, firing.position)] += 1
    subject = {fact_id: db.get(fact_id).metadata.get("subject") or "\0" for fired in fired_by for fact_id in fired}

    def names_a_fired_subject(i: int) -> bool:
        return any(subject[fact_id] in prompts[i] for fact_id in fired_by[i])

    lost = [i for i in range(len(cases)) if before[i] > after[i]]
    named = [i for i in lost if names_a_fired_subject(i)]
    often = collections.Counter(fact_id for fired in fired_by for fact_id in fired).most_common(8)
    report = {
        "database": args.database, "facts_in_database": len(db), "key_rows": db.key_rows, "cases": len(cases),
        "specificity_before": float(before.mean()) * 100, "specificity_after": float(after.mean()) * 100,
        "cases_lost": len(lost), "cases_gained": int((before < after).sum()),
        "lost_naming_a_fired_subject": len(named),
        "prompts_with_a_firing": sum(1 for fired in fired_by if fired),
        "firings_at_position_0": sum(n for (_, position), n in positions.items() if position == 0),
        "firings": sum(positions.values()),
        "most_frequent": [{"subject": subject[fact_id], "prompts": n, "keys": len(db.get(fact_id).keys),
                           "positions": sorted({p for (f, p) in positions if f == fact_id})[:5]}
                          for fact_id, n in often],
        "lost_examples": [{"prompt": prompts[i], "fired": sorted(subject[f] for f in fired_by[i]),
                           "names_a_fired_subject": i in named} for i in lost[:10]],
    }
    print(json.dumps(report, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
