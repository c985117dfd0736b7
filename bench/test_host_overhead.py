"""bench/host_overhead.py runs end to end (one tiny round, this tree against itself as the
baseline) and reports every case and the derived overheads."""

import json
from pathlib import Path

import host_overhead


def test_one_round_reports_every_case_for_both_trees(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    tree = str(Path(__file__).resolve().parents[1])
    assert host_overhead.main(["--baseline-tree", tree, "--rounds", "1", "--batches", "2", "--calls", "2",
                               "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    cases = {f"{backend}: {what}" for backend in host_overhead.BACKENDS
             for what in ("kernel", "op", "op, key gammas", "op, (1, 1, d1) query", "layer, bare", "layer + attach",
                          "layer + attach, key gammas", "layer + graph_safe")}
    for tree_name in ("this", "baseline"):
        assert set(report["medians_us"][tree_name]) == cases
        assert all(micros > 0 for micros in report["medians_us"][tree_name].values())
        assert set(report["overheads_us"][tree_name]) == set(host_overhead.BACKENDS)
    assert "host overhead (us):" in capsys.readouterr().out
