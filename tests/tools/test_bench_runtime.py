"""tools/bench_runtime.py (``benchmark.py --runtime``) and the demo's ``--fast``: the runtime
table has every runtime side by side with its speed-up, memory, GFLOP/s against the measured
conv rate, and its agreement with eager; ``--fast`` prepares the demo's model."""

from __future__ import annotations

import argparse

import pytest
import torch

from tools import bench_runtime, benchmark

FASTINST = "projects/fastinst/configs/shapes/fastinst_R18_D1_shapes_instance.yaml"


def test_conv_rate_is_positive():
    rate = bench_runtime.conv_rate(1, size=(16, 16), channels=32, iters=2)
    assert 0.1 < rate < 1e5


def test_runtime_rows_side_by_side(shapes_tiny_env):
    pytest.importorskip("onnxruntime")
    rows = bench_runtime.measure_model(
        "FastInst shapes",
        FASTINST,
        (64, 64),
        bench_runtime.RUNTIMES,
        [1],
        iters=1,
        opts=shapes_tiny_env.cfg_opts,
        conv_rates={1: 100.0},
    )
    assert [r.runtime for r in rows] == ["eager", "fast", "onnxruntime"]
    assert rows[0].speedup == 1.0 and rows[0].max_abs_diff == 0.0
    for r in rows:
        assert r.latency_ms > 0 and r.peak_mb > 0 and r.gflop > 0
        assert r.agreement.startswith("same"), r.agreement
        assert r.max_abs_diff < 1e-4
    table = bench_runtime.format_table(rows)
    assert table.count("\n") == 4 and "of 3x3-conv rate" in table and "of 100 |" in table


def test_benchmark_dispatches_runtime_mode(monkeypatch, tmp_path):
    seen = {}

    def fake_run(models, runtimes, threads, iters, opts, profile, repo):
        seen.update(models=models, runtimes=runtimes, threads=threads, iters=iters)
        return "| table |"

    monkeypatch.setattr(benchmark, "run_runtimes", fake_run)
    argv = ["--fast", "--runtime-threads", "1", "--output", str(tmp_path)]
    assert benchmark.main([*argv, "--runtime-models", "FastInst-D1 R50"]) == 0
    assert seen == {
        "models": ["FastInst-D1 R50"],
        "runtimes": ["eager", "fast"],
        "threads": [1],
        "iters": 3,
    }
    assert (tmp_path / "runtimes.md").read_text() == "| table |\n"


def test_demo_fast_flag_prepares_the_model(shapes_tiny_env):
    from demo import demo

    args = demo.build_parser().parse_args(
        [
            "--config-file",
            FASTINST,
            "--input",
            "x.png",
            "--fast",
            "--opts",
            *shapes_tiny_env.cfg_opts,
        ]
    )
    assert isinstance(args, argparse.Namespace)
    (built,) = demo.build_demos(args)
    model = built.predictor.model
    assert built.cfg.MODEL.FAST_INFERENCE and model.fast_inference
    assert model.queryseg_fast_inference
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
