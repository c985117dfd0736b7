"""Edit CounterFact facts into SmolLM2 with NeuralDB and measure quality and throughput.

Quality (CounterFact, paper appendix D.2, scored by neuraldb_kernels.evaluation; by default targets
compare by mean per-token log-probability, ROME/MEMIT's convention; --compare sequence for whole
targets), in percent:
  efficacy        P(target_new | prompt)          > P(ground_truth | prompt)
  generalization  P(target_new | rephrase_prompt) > P(ground_truth | rephrase_prompt)
  specificity     P(locality_ground_truth | locality_prompt) > P(target_new | locality_prompt)
measured on the edited model (NeuralDB attached, live gated retrieval) and on the unedited model.

Throughput: facts/s of the batched Editor vs the per-fact loop of existing tools (ROME/MEMIT
style: one fact at a time, the full model over every context and all logits at every step), same
hyperparameters, same machine, same run. Each run also records the seconds of each editing stage
of this invocation (`stage_seconds`) and the process's peak RSS in MB.

Examples (from the repository root; the data is read from ../shared/data):
  python bench/edit_quality.py --facts 1000 --out /tmp/edit_1k.json
  python bench/edit_quality.py --facts 128 --layers 2 4 6 8 --gammas 0.55 0.65 0.75 0.85 --out /tmp/sweep.json
  python bench/edit_quality.py --facts 64 --baseline-facts 8 --out /tmp/throughput.json
  python bench/edit_quality.py --facts 64 --start 64 --out /tmp/next64.json   # records 64..127

The edited model is evaluated first and the unedited one last (all attachments detached), so that
a long run with --db saves its edits before any evaluation. With --db the run is resumable as a
whole: the database keeps the finished facts, <db>.progress.json the time each invocation spent
editing and the scores of each finished evaluation chunk (--eval-chunk cases); the report then
covers every invocation (edit_s, edited_facts and facts_per_s summed over `edit_segments`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

import torch
import torch.nn.functional as F

from neuraldb_kernels.cli import hparam_argument

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ---------------------------------------------------------------------- progress of a long run


class Progress:
    """What a run with --db has done, in `<db>.progress.json`, so that an interrupted run resumes
    its evaluation too and the report covers the whole job: the editing segments of every
    invocation (facts edited, seconds, threads) and the per-case scores of each finished
    evaluation chunk, keyed by what was evaluated. Without a path nothing is written."""

    def __init__(self, path):
        self.path = pathlib.Path(path) if path else None
        self.data = {"edit_segments": [], "evaluations": {}}
        if self.path is not None and self.path.exists():
            self.data = json.loads(self.path.read_text())

    def save(self) -> None:
        if self.path is not None:
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps(self.data))
            os.replace(temporary, self.path)  # a crash leaves the old file or the new one, never half

    def start_edit_segment(self):
        """Begin this invocation's editing segment; returns the Editor callback that records each
        committed batch in it (facts so far, seconds since now) and saves, so an interrupted
        invocation keeps what it did. An invocation that commits nothing adds no segment; the
        first commit drops the saved scores of the edited model (the database changed)."""
        start = time.perf_counter()
        segment = {"facts": 0, "seconds": 0.0, "threads": torch.get_num_threads(),
                   "date": time.strftime("%Y-%m-%d %H:%M")}

        def committed(ids) -> None:
            if not segment["facts"]:
                self.data["edit_segments"].append(segment)
                self.data["evaluations"] = {label: chunks for label, chunks in self.data["evaluations"].items()
                                            if not json.loads(label)["edited"]}
            segment["facts"] += len(ids)
            segment["seconds"] = time.perf_counter() - start
            self.save()

        return committed


def chunked_case_scores(model, tokenizer, cases, *, compare: str, chunk: int, progress: Progress,
                        **label) -> dict[str, torch.Tensor]:
    """`case_scores` of `cases` (per metric, (n,) float64, NaN where a case has no such test),
    scored `chunk` cases at a time, each finished chunk kept in `progress` under `label` (plus
    compare, chunk, number of cases); chunks already there are not scored again."""
    from neuraldb_kernels.evaluation import case_scores
    from neuraldb_kernels.evaluation.counterfact import PROBABILITY_METRICS

    key = json.dumps({**label, "compare": compare, "chunk": chunk, "cases": len(cases)}, sort_keys=True)
    done = progress.data["evaluations"].setdefault(key, {})
    for start in range(0, len(cases), chunk):
        if str(start) not in done:
            scores = case_scores(model, tokenizer, cases[start : start + chunk], compare=compare)
            done[str(start)] = case_score_lists(scores)
            progress.save()
    starts = sorted(map(int, done))
    metrics = [metric for metric in PROBABILITY_METRICS if any(metric in done[str(start)] for start in starts)]
    combined = {}
    for metric in metrics:
        values = []
        for start in starts:
            size = min(chunk, len(cases) - start)
            values += done[str(start)].get(metric, [None] * size)
        combined[metric] = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)
    return combined


def percent_metrics(scores: dict[str, torch.Tensor], positions: list[int]) -> dict[str, float]:
    """Percent metrics over the cases at `positions` (see metrics_from_case_scores)."""
    from neuraldb_kernels.evaluation import metrics_from_case_scores

    return metrics_from_case_scores({metric: values[positions] for metric, values in scores.items()})


def case_score_lists(scores: dict[str, torch.Tensor]) -> dict[str, list]:
    """Per metric, each case's score as a JSON list (None where the case has no such test), so
    two runs can be compared case by case."""
    return {metric: [None if math.isnan(v) else v for v in values.tolist()] for metric, values in scores.items()}


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------- per-fact baseline loop


def per_fact_residual(model, tokens, hparams, module) -> torch.Tensor:
    """One fact's residual the way existing tools compute it: every step runs the full model over
    its contexts and the KL prompt (right-padded) and the full logits; same contexts (those
    `optimize_residuals` trains on), loss, Adam, clamp and early stop as `optimize_residuals`."""
    from neuraldb_kernels.editing.residuals import _trained_contexts

    trained = _trained_contexts(tokens)
    contexts = [context for context, _ in trained]
    rows = [list(c) + list(tokens.target[:-1]) for c in contexts] + [list(tokens.kl_ids)]
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    at = torch.tensor([last for _, last in trained] + [tokens.kl_subject_last], device=device)
    n = len(contexts)
    # (context, position, token) of every target token: what the NLL reads from the logits
    picks = [(c, len(context) - 1 + t, token) for c, context in enumerate(contexts)
             for t, token in enumerate(tokens.target)]
    pick_row, pick_pos, pick_token = torch.tensor(picks, device=device).T
    d2 = model.get_output_embeddings().weight.shape[1]
    r = torch.zeros(d2, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([r], lr=hparams.lr)
    state = {}

    def inject(_module, _args, output):
        state["v"] = output[0, at[0]].detach()
        output = output.clone()
        output[torch.arange(len(rows)), at] += r
        return output

    handle = module.register_forward_hook(inject)
    try:
        kl_reference = None
        for step in range(hparams.steps):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = logits.log_softmax(-1)
            nll = -logp[pick_row, pick_pos, pick_token].sum() / (n * len(tokens.target))
            kl_logp = logp[n, len(tokens.kl_ids) - 1]
            if kl_reference is None:
                kl_reference = kl_logp.detach()
            kl = F.kl_div(kl_reference, kl_logp, log_target=True, reduction="sum")
            v_norm = state["v"].norm()
            loss = nll + hparams.kl_factor * kl + hparams.weight_decay * r.pow(2).sum() / v_norm ** 2
            if float(nll.detach()) <= -math.log(hparams.stop_prob) or step == hparams.steps - 1:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                limit = hparams.clamp_norm_factor * v_norm
                if r.norm() > limit:
                    r.mul_(limit / r.norm())
    finally:
        handle.remove()
    return r.detach()


def per_fact_throughput(model, tokenizer, facts, hparams) -> float:
    """facts/s of the per-fact loop (keys included, like the Editor)."""
    from neuraldb_kernels.editing import compute_keys, generate_prefixes, tokenize_fact
    from neuraldb_kernels.integration import locate_down_proj

    prefixes = generate_prefixes(model, tokenizer, count=hparams.n_prefixes, length=hparams.prefix_length,
                                 seed=hparams.prefix_seed)
    module = locate_down_proj(model, hparams.layer)
    for p in model.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    for index, fact in enumerate(facts):
        tokens = tokenize_fact(tokenizer, fact, prefixes, index=index, kl_template=hparams.kl_template)
        compute_keys(model, [tokens], hparams.layer, pad_id=0)
        per_fact_residual(model, tokens, hparams, module)
    return len(facts) / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ main


def load_model(model_dir):
    if model_dir is None:
        from neuraldb_kernels.integration import load_default_model

        return load_default_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-a.json"))
    parser.add_argument("--facts", type=int, default=1000, help="edit N facts of --data together")
    parser.add_argument("--start", type=int, default=0,
                        help="the facts are records START..START+N-1 of --data (another slice of the same file)")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="layers to try (default: the preset)")
    parser.add_argument("--gammas", type=float, nargs="*", default=None, help="gammas to evaluate (default: preset)")
    parser.add_argument("--baseline-facts", type=int, default=0, help="time the per-fact loop on this many facts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model-dir", default=None, help="a Hugging Face model directory (default: SmolLM2)")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--compare", choices=["token_mean", "sequence"], default="token_mean",
                        help="target comparison (neuraldb_kernels.evaluation): token_mean is ROME/MEMIT's "
                             "convention, as in the published tables (default); sequence compares whole targets")
    parser.add_argument("--db", default=None,
                        help="keep the edits in this database file (one layer only): an interrupted run "
                             "started again with the same --db resumes without redoing finished facts")
    parser.add_argument("--hparam", type=hparam_argument, action="append", default=[], metavar="NAME=VALUE",
                        help="override an EditHParams field, e.g. --hparam steps=20")
    parser.add_argument("--eval-chunk", type=int, default=250,
                        help="cases scored per evaluation chunk; with --db each finished chunk is kept in "
                             "<db>.progress.json and a resumed run skips it")
    args = parser.parse_args(argv)
    if args.start < 0 or args.facts < 1:
        parser.error(f"--start must be >= 0 and --facts >= 1, got --start {args.start} --facts {args.facts}")
    torch.set_num_threads(args.threads)

    from neuraldb_kernels.editing import Editor, read_counterfact
    from neuraldb_kernels.editing.editor import superseded_facts
    from neuraldb_kernels.evaluation import cases_from_facts
    from neuraldb_kernels.editing.hparams import resolve_hparams

    overrides = dict(args.hparam)
    facts = read_counterfact(args.data, limit=args.start + args.facts)[args.start :]
    if not facts:
        parser.error(f"--data holds no records from --start {args.start} on")
    model, tokenizer = load_model(args.model_dir)
    model.to(args.device)
    cases = cases_from_facts(facts)
    preset = resolve_hparams(model, overrides)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if torch.device(args.device).type == "cuda":
        machine = f"{torch.cuda.get_device_name(args.device)} ({machine} on the host)"
    report = {"machine": machine,
              "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "facts": len(facts),
              "start": args.start,
              "data": args.data, "compare": args.compare, "metrics_unit": "percent", "hparams": {**preset.__dict__, **overrides}, "runs": []}
    layers = args.layers or [preset.layer]
    if args.db and len(layers) > 1:
        parser.error("--db holds one layer's edits: give at most one --layers value with --db")
    progress = Progress(args.db + ".progress.json" if args.db else None)
    # a later record with the same subject and prompt replaces an earlier one (CounterFact repeats
    # some with other targets): the metrics "in_effect" leave the replaced records out
    replaced = {earlier for earlier, _ in superseded_facts(enumerate(facts))}
    everything = list(range(len(cases)))
    effective = [position for position in everything if position not in replaced]
    report["superseded_records"] = len(replaced)
    for layer in layers:
        if not args.db:
            progress = Progress(None)  # each layer of a sweep is timed on its own
        evaluate = dict(compare=args.compare, chunk=args.eval_chunk, progress=progress, data=args.data,
                        **({"start": args.start} if args.start else {}))
        db = None
        if args.db:
            from neuraldb_kernels import NeuralDB
            from neuraldb_kernels.integration import down_proj_dims, model_fingerprint

            fingerprint = model_fingerprint(model, layer)
            if pathlib.Path(args.db).exists():
                db = NeuralDB.open(args.db, fingerprint=fingerprint)
            else:
                d1, d2 = down_proj_dims(model, layer)
                db = NeuralDB(args.db, d1=d1, d2=d2, layer=layer, gamma=preset.gamma, fingerprint=fingerprint)
            report["resumed_with_facts"] = len(db)
        editor = Editor(model, tokenizer, db=db, **{**overrides, "layer": layer})
        edited = editor.edit(facts, progress=True, callback=progress.start_edit_segment())
        ids = edited.ids
        segments = progress.data["edit_segments"]  # every invocation's, with --db
        edit_s = sum(segment["seconds"] for segment in segments)
        edited_facts = sum(segment["facts"] for segment in segments)
        stats = [editor.db.get(i).metadata["edit"] for i in ids]
        converged = sum(stat["converged"] for stat in stats)
        mean_steps = sum(stat["steps"] for stat in stats) / max(len(stats), 1)
        for gamma in args.gammas or [preset.gamma]:
            editor.db.gamma = gamma
            scores = chunked_case_scores(model, tokenizer, cases, edited=True, layer=layer, gamma=gamma,
                                         db_rows=len(editor.db), **evaluate)
            run = {"layer": layer, "gamma": gamma, "edit_s": edit_s, "edited_facts": edited_facts,
                   "facts_per_s": edited_facts / edit_s if edit_s else None, "edit_segments": segments,
                   "converged": converged, "mean_steps": mean_steps, "peak_rss_mb": peak_rss_mb(),
                   "stage_seconds": edited.seconds, **percent_metrics(scores, everything),
                   "case_scores": case_score_lists(scores)}
            if report["superseded_records"]:
                run["in_effect"] = percent_metrics(scores, effective)
            report["runs"].append(run)
            print({key: value for key, value in run.items() if key not in ("edit_segments", "case_scores")}, flush=True)
        editor.detach()
    # The unedited model last, once every attachment is off: an interrupted run (--db) has then
    # already saved its edits, and a resumed one spends no time before editing.
    start = time.perf_counter()
    scores = chunked_case_scores(model, tokenizer, cases, edited=False, **evaluate)
    report["unedited"] = percent_metrics(scores, everything)
    report["unedited_case_scores"] = case_score_lists(scores)
    if report["superseded_records"]:
        report["unedited_in_effect"] = percent_metrics(scores, effective)
    report["unedited_eval_s"] = time.perf_counter() - start
    print("unedited", report["unedited"], flush=True)
    if args.baseline_facts:
        first = report["runs"][0]
        hparams = resolve_hparams(model, {**overrides, "layer": first["layer"]})
        report["per_fact_loop_facts_per_s"] = per_fact_throughput(model, tokenizer, facts[:args.baseline_facts],
                                                                  hparams)
        report["batched_facts_per_s"] = first["facts_per_s"]
        report["speedup"] = first["facts_per_s"] / report["per_fact_loop_facts_per_s"]
        print({key: report[key] for key in ("per_fact_loop_facts_per_s", "batched_facts_per_s", "speedup")},
              flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
