"""tools/benchmark.py: the latency/memory measuring functions, and the benchmark end to end on a
tiny `shapes` split with the Mask R-CNN baseline (table, CSV and PNG with every column filled)."""

from __future__ import annotations

import csv
import math
import os
import time

import cv2
import pytest
import torch

from tools import (
    bench_core,
    bench_measure,
    bench_report,
    benchmark,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MASK_RCNN = "common/configs/baselines/mask_rcnn_R_18_FPN_gn_scratch_shapes.yaml"
#: a few iterations, tiny batches, few proposals, no box-head convs: a row costs seconds
TINY_ARGS = [
    "--max-iter",
    "5",
    "--ims-per-batch",
    "2",
    "--num-workers",
    "0",
    "--input-size",
    "64",
    "--warmup",
    "2",
    "--repeats",
    "3",
    "--timing-iters",
    "4",
]
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "MODEL.ROI_BOX_HEAD.NUM_CONV",
    "0",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "20",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "50",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "32",
    "TEST.DETECTIONS_PER_IMAGE",
    "10",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "0.0",
]
NUMERIC = ("params_m", "gflops", "latency_ms", "memory_mb", "train_s_iter")


class SlowStart:
    """A fake model: the first ``cold`` calls take ``slow`` s (lazy init, cold caches), then
    ``fast`` s, except that call number ``spike`` (1-based, if any) takes ``slow`` again."""

    def __init__(self, cold: int, slow: float = 0.15, fast: float = 0.005, spike: int = 0):
        self.calls, self.cold, self.slow, self.fast, self.spike = 0, cold, slow, fast, spike

    def __call__(self) -> None:
        self.calls += 1
        time.sleep(self.slow if self.calls <= self.cold or self.calls == self.spike else self.fast)


def test_latency_is_the_median_after_warmup():
    model = SlowStart(cold=3)
    stats = bench_measure.measure_latency(model, warmup=3, repeats=7)
    assert model.calls == 10
    assert len(stats.times_ms) == 7
    assert stats.median_ms < 60, "the slow first calls must fall in the untimed warm-up"
    assert stats.median_ms == pytest.approx(sorted(stats.times_ms)[3])


def test_latency_median_ignores_a_timed_outlier_that_a_mean_would_not():
    model = SlowStart(cold=0, slow=0.3, spike=4)  # one slow timed call
    stats = bench_measure.measure_latency(model, warmup=1, repeats=5)
    assert stats.max_ms > 250
    assert stats.median_ms < 60 < stats.mean_ms


def test_latency_synchronises_around_every_timed_call():
    syncs = []
    bench_measure.measure_latency(
        lambda: None, warmup=2, repeats=3, synchronize=lambda: syncs.append(1)
    )
    assert len(syncs) == 2 + 2 * 3  # after each warm-up call; before and after each timed call


def test_cpu_peak_memory_counts_weights_and_the_forward_peak():
    model = torch.nn.Linear(1000, 1000)  # 4 MB of weights

    def forward():
        x = torch.ones(64, 1024, 1024)  # 256 MiB, freed at once
        return float(x[0, 0, 0])

    mb, method = bench_measure.peak_memory_mb(forward, model, torch.device("cpu"))
    assert method.startswith("weights +")
    assert 256 <= mb < 400, mb


def test_default_entries_name_existing_baselines_and_report_missing_configs(capsys):
    present, missing = benchmark.split_present(benchmark.DEFAULT_ENTRIES)
    assert {e.config for e in present} >= {
        MASK_RCNN,
        "common/configs/baselines/panoptic_fpn_R_18_gn_scratch_shapes.yaml",
    }
    fake = benchmark.Entry("not yet", "projects/nope/configs/shapes/nope.yaml")
    benchmark.report_missing([fake], [fake], discover=False)
    assert "skipping 'not yet'" in capsys.readouterr().err


def test_quick_schedule_keeps_lr_steps_inside_the_shorter_schedule():
    settings = benchmark.settings_for("quick", max_iter=40, ims_per_batch=4)
    entry = benchmark.Entry("m", MASK_RCNN)
    cfg = bench_core.Measurer(settings, "/tmp/unused").build_cfg(entry, "/tmp/unused")
    assert cfg.SOLVER.MAX_ITER == 40
    assert all(0 < s < 40 for s in cfg.SOLVER.STEPS) and len(cfg.SOLVER.STEPS) == 2
    assert cfg.SOLVER.IMS_PER_BATCH == 4
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.02 * 4 / 8)  # linear scaling from batch 8
    assert cfg.INPUT.MIN_SIZE_TEST == settings.input_size


PANOPTIC_FPN = "common/configs/baselines/panoptic_fpn_R_18_gn_scratch_shapes.yaml"


@pytest.mark.parametrize(
    "config, overrides",
    [
        (PANOPTIC_FPN, ()),  # its YAML sets INPUT.DATASET_MAPPER_NAME "detectron2"
        (MASK_RCNN, ("TEST.EVAL_TASKS", "('segm',)")),  # a row's override of a derived key
    ],
    ids=["yaml", "override"],
)
def test_build_cfg_keeps_the_derived_keys_a_row_sets(config, overrides):
    """The run-wide settings must not re-derive keys the row set (a second, separate merge did:
    finalised with only the settings explicit, it reset the mapper / eval tasks to the task's)."""
    from common.engine import get_cfg, merge_config

    row = merge_config(get_cfg(), os.path.join(REPO, config), list(overrides))
    settings = benchmark.settings_for("quick", max_iter=40, ims_per_batch=4)
    entry = benchmark.Entry("row", config, overrides=overrides)
    cfg = bench_core.Measurer(settings, "/tmp/unused").build_cfg(entry, "/tmp/unused")
    assert cfg.INPUT.DATASET_MAPPER_NAME == row.INPUT.DATASET_MAPPER_NAME
    assert tuple(cfg.TEST.EVAL_TASKS) == tuple(row.TEST.EVAL_TASKS)
    assert (cfg.MODEL.TASK, cfg.MODEL.NUM_CLASSES) == (row.MODEL.TASK, row.MODEL.NUM_CLASSES)
    if config == PANOPTIC_FPN:
        assert cfg.INPUT.DATASET_MAPPER_NAME == "detectron2"
    else:
        assert tuple(cfg.TEST.EVAL_TASKS) == ("segm",)
    assert cfg.SOLVER.MAX_ITER == 40 and cfg.SOLVER.IMS_PER_BATCH == 4  # the settings still win


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_benchmark_end_to_end_writes_table_csv_and_plot(shapes_tiny_env, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "--config",
        MASK_RCNN,
        "--names",
        "Mask R-CNN tiny",
        *TINY_ARGS,
        "--output",
        str(out),
        *shapes_tiny_env.cfg_opts,
        *TINY_OPTS,
    ]
    assert benchmark.main(argv) == 0
    captured = capsys.readouterr()
    assert "[1/1] Mask R-CNN tiny" in captured.err and "100%" in captured.err  # progress + ETA

    md = (out / "benchmark.md").read_text()
    assert f"torch {torch.__version__}" in md and f"{torch.get_num_threads()} threads" in md
    assert "seed 42" in md and "64x64, batch 1" in md and "2 images/batch, 0 workers" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| Mask R-CNN tiny")]
    assert len(table) == 1
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert len(cells) == len(bench_report.COLUMNS) and all(cells), cells
    assert cells[1] == "instance"

    (row,) = _read_csv(out / "benchmark.csv")
    for key in NUMERIC + ("AP",):
        value = float(row[key])
        assert math.isfinite(value) and (value > 0 or key == "AP"), (key, row[key])
    assert row["PQ"] == "n/a" and row["mIoU"] == "n/a"  # not produced by an instance model
    assert row["setting_device"].startswith(("cpu", "cuda")) and row["setting_torch"]
    assert all(row[k] != "" for k, _ in bench_report.COLUMNS)

    png = (out / "benchmark.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000
    # the Visualizer grid: a ground-truth line and the row's line, 4 panels of >= 256 px each
    grid = cv2.imread(str(out / "benchmark_grid.png"))
    panel = 256 + 26 + 4
    assert grid.shape[0] == 2 * panel - 4 and grid.shape[1] == 4 * (256 + 4) - 4, grid.shape
    gt, pred = grid[26:282, :256], grid[panel + 26 : panel + 282, :256]
    assert gt.std() > 10 and pred.std() > 10  # drawn images, not blank panels
    assert os.path.exists(out / "rows" / "00_Mask_R-CNN_tiny" / "model_final.pth")

    # --weights: the saved checkpoint is evaluated instead of trained
    out2 = tmp_path / "weights"
    weights = str(out / "rows" / "00_Mask_R-CNN_tiny" / "model_final.pth")
    argv = [
        "--config",
        MASK_RCNN,
        "--weights",
        weights,
        *TINY_ARGS,
        "--no-progress",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--timing-iters",
        "0",
        "--output",
        str(out2),
        *shapes_tiny_env.cfg_opts,
        *TINY_OPTS,
    ]
    assert benchmark.main(argv) == 0
    (row2,) = _read_csv(out2 / "benchmark.csv")
    assert row2["weights"] == weights
    assert float(row2["AP"]) == pytest.approx(float(row["AP"]), abs=1e-6)  # same model


def test_a_failing_row_is_recorded_instead_of_raised(shapes_tiny_env, tmp_path):
    rows, _ = benchmark.run_entries(
        [benchmark.Entry("broken", MASK_RCNN, overrides=("MODEL.BACKBONE.NAME", "no_such"))],
        benchmark.settings_for("quick", max_iter=5, opts=tuple(shapes_tiny_env.cfg_opts)),
        str(tmp_path),
        title="t",
        progress=False,
    )
    assert "no_such" in rows[0]["error"]
    assert "failed" in (tmp_path / "benchmark.md").read_text()
    assert (tmp_path / "rows" / "00_broken" / "error.txt").exists()


class _Attention(torch.nn.Module):
    """q = k = v = the input image [heads, L, E] (batch 1), through fused attention."""

    def forward(self, batched):
        x = batched[0]["image"][None]
        return [{"out": torch.nn.functional.scaled_dot_product_attention(x, x, x)}]


def test_gflops_count_fused_attention_as_its_two_matrix_products():
    gflops, uncounted = bench_measure.count_gflops(_Attention(), [{"image": torch.rand(2, 10, 8)}])
    assert "aten::scaled_dot_product_attention" not in uncounted
    assert gflops * 1e9 == pytest.approx(2 * 10 * 10 * (8 + 8))  # heads * Lq * Lk * (E + Ev)


def test_progress_weights_each_rows_passes_by_its_cost_for_the_eta():
    bar = bench_core.Progress([(10, 1.0), (10, 5.0)], enabled=False)
    assert bar._bar.total == 10 + 50
    bar.start_row(0, "light")
    bar.advance(4)
    assert bar.done == 4
    bar.finish_row()  # the estimate was off: jump to the row's end
    bar.start_row(1, "heavy")
    bar.advance(2)
    assert bar.done == 10 + 2 * 5.0
    bar.advance(100)  # never past the row's share
    assert bar.done == 60


def test_rows_train_in_parallel_workers_then_are_measured_alone(shapes_tiny_env, tmp_path):
    out = tmp_path / "jobs"
    names = ["a", "b", "c"]  # 3 rows on 2 workers: one worker trains two rows
    argv = ["--config", *[MASK_RCNN] * 3, "--names", *names, "--jobs", "2", *TINY_ARGS,
            "--no-progress", "--repeats", "1", "--warmup", "0", "--output", str(out),
            *shapes_tiny_env.cfg_opts, *TINY_OPTS]  # fmt: skip
    assert benchmark.main(argv) == 0
    rows = _read_csv(out / "benchmark.csv")
    assert [r["name"] for r in rows] == names
    for r, sub in zip(rows, ("00_a", "01_b", "02_c")):
        assert float(r["train_s_iter"]) > 0 and math.isfinite(float(r["AP"]))
        assert os.path.isfile(out / "rows" / sub / "model_final.pth")
        log = (out / "rows" / sub / "log.txt").read_text()
        assert log.count("Starting training") == 1, sub  # each row's log holds that row only
    assert "2 rows trained at once" in (out / "benchmark.md").read_text()
