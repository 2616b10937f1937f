"""train_net.py end to end on a tiny `shapes` split with the Detectron2 baselines: single process,
two CPU processes over gloo, and --resume continuing at the right iteration."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK_RCNN = "common/configs/baselines/mask_rcnn_R_18_FPN_gn_scratch_shapes.yaml"
PANOPTIC_FPN = "common/configs/baselines/panoptic_fpn_R_18_gn_scratch_shapes.yaml"
TINY = [
    "DATASETS.SHAPES.IMAGE_SIZE",
    "64",
    "DATASETS.SHAPES.NUM_TRAIN",
    "16",
    "DATASETS.SHAPES.NUM_VAL",
    "4",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "SOLVER.WARMUP_ITERS",
    "1",
]


def run_train_net(args, out_dir, datasets_root, timeout=600):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), *args, "OUTPUT_DIR", str(out_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"train_net failed:\n{log[-4000:]}"
    return log


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets")


def test_single_process_trains_and_evaluates(tmp_path, datasets_root):
    log = run_train_net(
        ["--config-file", MASK_RCNN, *TINY, "SOLVER.MAX_ITER", "3",
         "SOLVER.CHECKPOINT_PERIOD", "2"],
        tmp_path, datasets_root,
    )  # fmt: skip
    assert os.path.exists(tmp_path / "model_final.pth")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    assert "copypaste: Task: segm" in log and "copypaste: Task: bbox" in log
    assert any("total_loss" in m for m in read_metrics(tmp_path))


def test_resume_continues_at_the_right_iteration(tmp_path, datasets_root):
    first = [*TINY, "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0"]
    run_train_net(
        ["--config-file", MASK_RCNN, *first, "SOLVER.MAX_ITER", "4"], tmp_path, datasets_root
    )
    log = run_train_net(
        ["--config-file", MASK_RCNN, "--resume", *first, "SOLVER.MAX_ITER", "6"],
        tmp_path,
        datasets_root,
    )
    assert "Starting training from iteration 4" in log
    iters = [m["iteration"] for m in read_metrics(tmp_path) if "total_loss" in m]
    assert max(iters) == 5


def test_two_cpu_processes_over_gloo(tmp_path, datasets_root):
    log = run_train_net(
        ["--config-file", MASK_RCNN, "--num-gpus", "2", *TINY, "SOLVER.MAX_ITER", "2"],
        tmp_path,
        datasets_root,
    )
    assert "copypaste: Task: segm" in log
    assert os.path.exists(tmp_path / "model_final.pth")


def test_panoptic_fpn_trains_and_evaluates(tmp_path, datasets_root):
    log = run_train_net(
        ["--config-file", PANOPTIC_FPN, *TINY, "SOLVER.MAX_ITER", "2"], tmp_path, datasets_root
    )
    assert "PQ" in log


def test_eval_only_reloads_weights(tmp_path, datasets_root):
    run_train_net(
        ["--config-file", MASK_RCNN, *TINY, "SOLVER.MAX_ITER", "2"], tmp_path, datasets_root
    )
    log = run_train_net(
        [
            "--config-file",
            MASK_RCNN,
            "--eval-only",
            *TINY,
            "MODEL.WEIGHTS",
            str(tmp_path / "model_final.pth"),
        ],
        tmp_path / "eval",
        datasets_root,
    )
    assert "copypaste: Task: segm" in log


def test_unknown_dataset_name_is_reported(tmp_path, datasets_root):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root))
    cmd = [
        sys.executable,
        "train_net.py",
        "--config-file",
        MASK_RCNN,
        *TINY,
        "DATASETS.TRAIN",
        "('shapes_trian',)",
        "SOLVER.MAX_ITER",
        "1",
        "OUTPUT_DIR",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "shapes_trian" in proc.stderr
