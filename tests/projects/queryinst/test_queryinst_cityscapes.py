"""QueryInst's Cityscapes config trains 3 iterations and evaluates through ``train_net.py`` on a
tiny Cityscapes-layout set (Detectron2's builtin ``cityscapes_fine_instance_seg_{train,val}``,
found through DETECTRON2_DATASETS), with the model shrunk from the command line (R18-GN from
scratch, 64-channel FPN, 2 stages of 10 queries, 64-128 px inputs): the official Cityscapes mask
AP and the COCO box AP come back in metrics.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.cityscapes_tiny import write_tiny_cityscapes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CONFIG = "projects/queryinst/configs/queryinst_R50_FPN_300q_ms_24k_cityscapes.yaml"
TINY_MODEL = [
    "MODEL.WEIGHTS", "", "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "GN",
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.QUERYINST.NUM_PROPOSALS", "10",
    "MODEL.QUERYINST.NUM_STAGES", "2", "MODEL.QUERYINST.NUM_HEADS", "4",
    "MODEL.QUERYINST.DIM_FEEDFORWARD", "128", "MODEL.QUERYINST.DIM_DYNAMIC", "16",
    "MODEL.QUERYINST.MASK_CONV_DIM", "32", "MODEL.QUERYINST.MASK_NUM_CONVS", "1",
    "MODEL.QUERYINST.MASK_NORM", "GN", "TEST.DETECTIONS_PER_IMAGE", "10",
]  # fmt: skip
TINY_RUN = [
    "INPUT.MIN_SIZE_TRAIN", "(64, 80)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3",
    "SOLVER.STEPS", "(2,)", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def test_cityscapes_config_trains_and_evaluates_through_train_net(tmp_path):
    root = tmp_path / "datasets"
    write_tiny_cityscapes(str(root))
    out = tmp_path / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"),
           "--config-file", os.path.join(REPO, CONFIG), *TINY_MODEL, *TINY_RUN,
           "OUTPUT_DIR", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"train_net failed:\n{log[-4000:]}"
    assert "Loaded 4 images" in log and "Loaded 2 images" in log  # Detectron2's loader, both splits
    with open(out / "metrics.json") as f:
        records = [json.loads(line) for line in f]
    losses = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in losses][-1] == 2
    final = records[-1]
    assert 0.0 <= final["segm/AP"] <= 100.0 and 0.0 <= final["segm/AP50"] <= 100.0
    assert "bbox/AP" in final
    assert (out / "model_final.pth").exists()
    assert not os.path.exists(tmp_path / "matches.json")  # cityscapesscripts' stray file
