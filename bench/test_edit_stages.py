"""bench/edit_stages.py --compare: per-stage ratios, per-fact differences and residual rows of two
runs, computed here by hand from small run files (no model)."""

import json

import pytest
import torch
from edit_stages import StagePeaks, compare, main, resident_peak_mb


def _run(path, seconds, probs, steps, rows=None):
    path.write_text(json.dumps({"facts": len(probs), "stage_seconds": seconds, "peak_rss_mb": 100.0,
                                "target_prob": probs, "steps": steps}))
    if rows is not None:
        torch.save({"ids": [str(i) for i in range(len(rows))], "residuals": rows}, path.with_suffix(".pt"))
    return str(path)


def test_compare_reports_ratios_and_differences(tmp_path, capsys):
    old = _run(tmp_path / "old.json", {"prefixes": 40.0, "residuals": 300.0, "total": 350.0}, [0.95, 0.91, 0.88],
               [7, 12, 25], torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]))
    new = _run(tmp_path / "new.json", {"prefixes": 8.0, "residuals": 150.0, "total": 170.0}, [0.95, 0.93, 0.88],
               [7, 10, 25], torch.tensor([[3.0, 4.0], [1.0, 0.5], [0.0, 2.0]]))
    summary = compare(old, new)
    assert summary["stages"]["prefixes"]["ratio"] == pytest.approx(5.0)
    assert summary["stages"]["residuals"]["ratio"] == pytest.approx(2.0)
    assert summary["stages"]["total"]["ratio"] == pytest.approx(350 / 170)
    assert summary["target_prob_max_abs_diff"] == pytest.approx(0.02)
    assert summary["steps_total"] == [44, 42] and summary["facts_with_other_steps"] == 1
    assert summary["target_prob_at_least_0.9"] == [2, 2]
    assert summary["residual_relative_diff"]["max"] == pytest.approx(0.5)  # |(0, .5)| / |(1, 0)|
    assert summary["residual_relative_diff"]["median"] == 0.0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(summary))


def test_compare_refuses_runs_of_different_sizes(tmp_path):
    old = _run(tmp_path / "old.json", {"total": 1.0}, [0.9], [1])
    new = _run(tmp_path / "new.json", {"total": 1.0}, [0.9, 0.9], [1, 1])
    with pytest.raises(SystemExit, match="different numbers of facts: 1 and 2"):
        compare(old, new)


def test_a_run_needs_an_output_file(capsys):
    with pytest.raises(SystemExit):
        main(["--facts", "2"])
    assert "give --out" in capsys.readouterr().err


def test_stage_peaks_tell_the_wrapped_call_from_the_rest():
    if resident_peak_mb() is None:
        pytest.skip("no /proc/self/status VmHWM here")
    peaks = StagePeaks()
    resident_peak_mb(reset=True)
    base = resident_peak_mb()

    def allocate(megabytes):
        block = torch.ones(megabytes * 2**18)  # float32: touched, so resident
        return float(block[-1])

    assert peaks.wrap(allocate)(300) == 1.0
    allocate(100)  # between calls: the work outside the optimisation
    measured = peaks.finish()
    assert measured["residuals"] >= base + 280
    assert base + 80 <= measured["outside_residuals"] < base + 280
