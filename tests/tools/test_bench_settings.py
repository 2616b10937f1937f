"""Benchmark plumbing without training: schedule overrides, --weights for the default entries,
and GFLOPs of a model whose output does not depend on the computation."""

import os

import pytest
import torch
from torch import nn

from tools import (
    bench_measure,
    benchmark,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_schedule_opts_come_before_the_callers():
    s = benchmark.settings_for("cpu", opts=("INPUT.MIN_SIZE_TRAIN", "(96,)"))
    assert s.opts[:2] == ("INPUT.MIN_SIZE_TRAIN", "(80, 88, 96, 104, 112)")  # the schedule's
    assert s.opts[-2:] == ("INPUT.MIN_SIZE_TRAIN", "(96,)")  # the caller's, applied last
    assert (s.image_size, s.max_iter, s.input_size, s.seeds) == (96, 600, 96, (1, 2, 3))
    assert s.backbone == "shapes" and s.rows == benchmark.QUICK_ROWS
    q = benchmark.settings_for("quick")
    assert q.preset == "standard" and q.jobs == 2 and len(q.rows) == 7
    assert q.backbone == "scratch"


def test_weights_without_config_map_onto_the_default_entries():
    n = len(benchmark.DEFAULT_ENTRIES)
    args = benchmark.build_parser().parse_intermixed_args(["--weights", *["-"] * (n - 1), "x.pth"])
    entries = benchmark.entries_from_args(args)
    assert [e.method for e in entries] == [e.method for e in benchmark.DEFAULT_ENTRIES]
    assert entries[-1].weights == os.path.abspath("x.pth") and entries[0].weights is None


class ConstantOutput(nn.Module):
    """Computes a convolution but returns a constant (like an empty panoptic map)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, batched_inputs):
        x = batched_inputs[0]["image"].float()[None]
        self.conv(x)
        return [{"sem_seg": torch.zeros(1, 4, 4)}]


def test_gflops_fall_back_when_the_trace_is_empty():
    model = ConstantOutput()
    gflops, uncounted = bench_measure.count_gflops(model, [{"image": torch.ones(3, 16, 16)}])
    assert bench_measure.FLOP_COUNTER_FALLBACK in uncounted
    assert gflops * 1e9 == 8 * 3 * 9 * 16 * 16  # multiply-adds of the conv


def _run(name, task, metric, value, **extra):
    row = {
        "name": name,
        "method": name,
        "config": "c.yaml",
        "task": task,
        metric: value,
        "train_s_iter": 1.0,
        "latency_ms": 10.0,
        "memory_mb": 50.0,
        "wall_s": 1,
        "cpu_s": 2,
    }
    row.update(extra)
    return row


def test_seeds_aggregate_into_mean_std_and_close_means_are_ties():
    from tools import bench_core, bench_report

    a = bench_core.aggregate_seeds(
        [_run("A", "instance", "AP", v) for v in (40.0, 42.0, 44.0)], [1, 2, 3]
    )
    assert a["AP"] == 42.0 and a["AP_std"] == 2.0 and a["AP_runs"] == [40.0, 42.0, 44.0]
    assert a["seeds"] == [1, 2, 3] and a["wall_s"] == 3
    b = bench_core.aggregate_seeds(
        [_run("B", "instance", "AP", v) for v in (44.0, 45.0, 46.0)], [1, 2, 3]
    )
    c = bench_core.aggregate_seeds(
        [_run("C", "instance", "AP", v) for v in (60.0, 61.0, 62.0)], [1, 2, 3]
    )
    assert bench_report.ties([a, b, c]) == [("AP", "A", "B")]  # |42 - 45| < 2 * 2; C is apart
    header = {
        k: "x"
        for k in (
            "device",
            "torch",
            "threads",
            "date",
            "elapsed",
            "seed",
            "loader",
            "schedule",
            "dataset",
            "train_sizes",
            "input",
            "latency",
            "gflops",
            "memory",
            "train_s_iter",
        )
    }
    md = bench_report.render_markdown([a, b, c], header, title="t")
    assert "| A ≈ |" in md and "| C |" in md and "42.0 ± 2.0" in md
    assert "tie (AP, means closer than 2 std): A ≈ B" in md
    assert "A: AP per seed 40.0, 42.0, 44.0" in md

    failed = bench_core.aggregate_seeds(
        [_run("D", "instance", "AP", 1.0), _run("D", "instance", "AP", None, error="boom")], [1, 2]
    )
    assert failed["error"] == "seed 2: boom"


def test_schedule_rows_select_default_entries_and_preset_reaches_the_config(tmp_path):
    s = benchmark.settings_for("quick", seeds=(1, 2), preset="hard")
    assert s.seeds == (1, 2) and s.preset == "hard"
    names = {e.name for e in benchmark.DEFAULT_ENTRIES}
    for sched in benchmark.SCHEDULES.values():
        assert set(sched.get("rows", ())) <= names
    from tools import bench_core

    entry = benchmark.DEFAULT_ENTRIES[0]
    cfg = bench_core.Measurer(s, str(tmp_path)).build_cfg(entry, str(tmp_path))
    assert cfg.DATASETS.SHAPES.PRESET == "hard"
    assert benchmark.settings_for("cpu").preset == "standard"


def test_schedule_rows_keep_the_default_order_and_name_what_is_left_out():
    entries = benchmark.DEFAULT_ENTRIES
    s = benchmark.settings_for("quick", rows=(entries[3].name, entries[0].name))
    shown, notes = benchmark.schedule_rows(entries, s)
    assert shown == [entries[0], entries[3]]
    assert "shows 2 of the" in notes[0] and entries[1].name in notes[0]
    assert benchmark.schedule_rows(entries, benchmark.settings_for("full"))[0] == list(entries)
    with pytest.raises(SystemExit, match="unknown rows"):
        benchmark.schedule_rows(entries, benchmark.settings_for("quick", rows=("nope",)))
