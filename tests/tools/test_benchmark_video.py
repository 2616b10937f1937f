"""tools/benchmark.py with the online VIS config as a row: it trains, evaluates on `shapes_vis`
and fills its own columns (video AP, AR@10, identity switches) next to the usual costs."""

from __future__ import annotations

import csv
import math

from tools import bench_report, benchmark

VIS = "projects/queryinst/configs/shapes/queryinst_vis_R18_FPN_shapes_vis.yaml"
TINY_VIS = [
    "DATASETS.SHAPES_VIS.NUM_TRAIN", "3", "DATASETS.SHAPES_VIS.NUM_VAL", "2",
    "DATASETS.SHAPES_VIS.NUM_FRAMES", "3", "DATASETS.SHAPES_VIS.IMAGE_SIZE", "48",
]  # fmt: skip


def test_video_row_has_its_own_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "bench"
    argv = [
        "--config", VIS, "--names", "QueryInst VIS tiny", "--max-iter", "5",
        "--ims-per-batch", "2", "--num-workers", "0", "--input-size", "48", "--warmup", "1",
        "--repeats", "2", "--output", str(out), *TINY_VIS,
    ]  # fmt: skip
    assert benchmark.main(argv) == 0
    md = (out / "benchmark.md").read_text()
    assert "video AP" in md and "ID switches" in md and "shapes_vis" in md
    with open(out / "benchmark.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["task"] == "video"
    for key in ("vAP", "vAR10", "IDSW", "params_m", "latency_ms", "train_s_iter"):
        assert math.isfinite(float(row[key])), (key, row[key])
    assert row["AP"] == "n/a" and row["PQ"] == "n/a"  # image metrics: not this model's
    assert [k for k, _ in bench_report.columns_for([row])][-3:] == ["vAP", "vAR10", "IDSW"]
