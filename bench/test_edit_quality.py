"""bench/edit_quality.py's resumable evaluation: chunked scores equal one pass over all cases, an
interrupted evaluation resumes without scoring finished chunks again, editing invalidates the
edited model's saved scores, and superseded records are left out of the metrics in effect. A
stand-in scorer keeps these fast (no model)."""

import json
import math

import pytest
import torch
from edit_quality import DATA, Progress, chunked_case_scores, main, percent_metrics

import neuraldb_kernels.evaluation as evaluation
from neuraldb_kernels.evaluation import counterfact


def _case(i):
    # every third case has no paraphrase: its generalization score is NaN and must not count
    return counterfact.CounterFactCase(case_id=i, subject=f"S{i}", prompt=f"P{i}", target_new="new",
                                       target_true="true", paraphrase_prompts=() if i % 3 == 0 else (f"R{i}",),
                                       neighborhood=((f"N{i}", "t"),))


def _share(i, metric):
    """The stand-in per-case score: a fixed pseudo-random share in [0, 1]."""
    return ((i * 7 + len(metric) * 3) % 11) / 10.0


class _Scorer:
    """Stands in for `case_scores`; counts the cases it scores and can fail on a chosen call."""

    def __init__(self, fail_on_call=None):
        self.calls, self.scored, self.fail_on_call = 0, [], fail_on_call

    def __call__(self, model, tokenizer, cases, *, compare):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("interrupted")
        self.scored += [case.case_id for case in cases]
        ids = [case.case_id for case in cases]
        return {"efficacy": torch.tensor([_share(i, "efficacy") for i in ids], dtype=torch.float64),
                "generalization": torch.tensor([math.nan if i % 3 == 0 else _share(i, "generalization")
                                                for i in ids], dtype=torch.float64)}


def _expected(n):
    """The metrics of one pass over n cases, computed here in plain Python."""
    efficacy = [_share(i, "efficacy") for i in range(n)]
    generalization = [_share(i, "generalization") for i in range(n) if i % 3]
    return {"efficacy": 100 * sum(efficacy) / len(efficacy),
            "generalization": 100 * sum(generalization) / len(generalization)}


def test_chunked_scores_equal_one_pass_and_are_not_recomputed(tmp_path, monkeypatch):
    cases = [_case(i) for i in range(23)]  # 23 = 4 chunks of 6, the last one short
    scorer = _Scorer()
    monkeypatch.setattr(evaluation, "case_scores", scorer)
    path = tmp_path / "db.progress.json"
    first = chunked_case_scores(None, None, cases, compare="token_mean", chunk=6, progress=Progress(path), edited=False)
    assert percent_metrics(first, list(range(23))) == pytest.approx(_expected(23))
    assert scorer.scored == list(range(23)) and scorer.calls == 4
    again = chunked_case_scores(None, None, cases, compare="token_mean", chunk=6, progress=Progress(path), edited=False)
    assert scorer.calls == 4  # everything came from the file
    assert again.keys() == first.keys()
    assert all(torch.equal(again[m].nan_to_num(-1), first[m].nan_to_num(-1)) for m in first)
    # another comparison is another evaluation: scored anew, the first one kept
    chunked_case_scores(None, None, cases, compare="sequence", chunk=6, progress=Progress(path), edited=False)
    assert scorer.calls == 8 and len(json.loads(path.read_text())["evaluations"]) == 2


def test_interrupted_evaluation_resumes_where_it_stopped(tmp_path, monkeypatch):
    cases = [_case(i) for i in range(20)]
    path = tmp_path / "db.progress.json"
    monkeypatch.setattr(evaluation, "case_scores", _Scorer(fail_on_call=3))
    with pytest.raises(KeyboardInterrupt):
        chunked_case_scores(None, None, cases, compare="token_mean", chunk=5, progress=Progress(path), edited=True)
    scorer = _Scorer()
    monkeypatch.setattr(evaluation, "case_scores", scorer)
    result = chunked_case_scores(None, None, cases, compare="token_mean", chunk=5, progress=Progress(path), edited=True)
    assert scorer.scored == list(range(10, 20))  # the two finished chunks were kept
    assert percent_metrics(result, list(range(20))) == pytest.approx(_expected(20))


def test_editing_segments_are_kept_per_batch_and_drop_the_edited_models_scores(tmp_path, monkeypatch):
    cases = [_case(i) for i in range(4)]
    monkeypatch.setattr(evaluation, "case_scores", _Scorer())
    progress = Progress(tmp_path / "db.progress.json")
    for edited in (True, False):
        chunked_case_scores(None, None, cases, compare="token_mean", chunk=4, progress=progress, edited=edited)
    progress.start_edit_segment()  # an invocation that commits nothing: no segment, the scores hold
    assert progress.data["edit_segments"] == [] and len(progress.data["evaluations"]) == 2
    committed = progress.start_edit_segment()
    committed(["a", "b"])
    saved = json.loads((tmp_path / "db.progress.json").read_text())  # on disk after the first batch
    assert [json.loads(label)["edited"] for label in saved["evaluations"]] == [False]
    assert [segment["facts"] for segment in saved["edit_segments"]] == [2]
    committed(["c"])  # the same segment grows (an interruption now keeps 3 facts and their time)
    saved = json.loads((tmp_path / "db.progress.json").read_text())
    assert [segment["facts"] for segment in saved["edit_segments"]] == [3]
    assert saved["edit_segments"][0]["seconds"] > 0


def test_metrics_in_effect_leave_the_replaced_records_out():
    scores = {"efficacy": torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)}  # record 0 was replaced
    assert percent_metrics(scores, [1, 2]) == {"efficacy": 100.0}
    assert percent_metrics(scores, [0, 1, 2]) == pytest.approx({"efficacy": 200 / 3})


@pytest.mark.parametrize("arguments, message", [(["--start", "-1"], "--start must be >= 0"),
                                                (["--facts", "0"], "--facts >= 1"),
                                                (["--start", "2"], "no records from --start 2 on")])
def test_a_slice_outside_the_data_is_refused_before_any_model_loads(tmp_path, capsys, arguments, message):
    records = json.loads((DATA / "counterfact" / "counterfact-a.json").read_text())[:2]
    data = tmp_path / "two.json"
    data.write_text(json.dumps(records))
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--facts", "4", *arguments])
    assert message in capsys.readouterr().err
