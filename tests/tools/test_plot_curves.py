"""tools/plot_curves.py: learning curves from train_net.py's metrics.json."""

from __future__ import annotations

import json

import pytest

from tools import plot_curves


def _run(tmp_path, name, records):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(d)


def test_curves_follow_the_task_metric_and_count_completed_iterations(tmp_path, capsys):
    inst = _run(tmp_path, "inst", [
        {"iteration": 19, "total_loss": 3.0},
        {"iteration": 149, "segm/AP": 5.0, "bbox/AP": 6.0},
        {"iteration": 299, "segm/AP": 20.0},
        {"iteration": 300, "segm/AP": 21.0},
    ])  # fmt: skip
    pan = _run(tmp_path, "pan", [{"iteration": 99, "panoptic_seg/PQ": 30.0}])
    assert plot_curves.read_curve(inst) == ("segm/AP", [(150, 5.0), (300, 20.0), (300, 21.0)])
    assert plot_curves.read_curve(pan) == ("panoptic_seg/PQ", [(100, 30.0)])
    assert plot_curves.read_curve(inst, "bbox/AP") == ("bbox/AP", [(150, 6.0)])

    out = tmp_path / "c.png"
    assert plot_curves.main([inst, pan, "--labels", "A", "B", "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "c.csv").read_text().splitlines()
    assert rows[0] == "run,metric,iteration,value" and "B,panoptic_seg/PQ,100,30.0000" in rows
    assert "| A | segm/AP |" in capsys.readouterr().out


def test_runs_without_evaluations_or_metrics_are_named(tmp_path):
    bare = _run(tmp_path, "bare", [{"iteration": 19, "total_loss": 3.0}])
    with pytest.raises(ValueError, match="bare.*TEST.EVAL_PERIOD"):
        plot_curves.read_curve(bare)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        plot_curves.read_curve(str(tmp_path / "nowhere"))
    broken = _run(tmp_path, "broken", [{"iteration": 1}])
    with open(f"{broken}/metrics.json", "a") as f:
        f.write("{oops\n")
    with pytest.raises(ValueError, match="metrics.json:2"):
        plot_curves.read_curve(broken)
