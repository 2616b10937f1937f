"""EmbedMask learns on `shapes`: the loss falls and box/mask AP rise through the COCO evaluator.

Sized for <= 4 minutes on an idle 2-core CPU: 64 px images (200 train / 50 val), the shapes config
(AdamW 5e-4, no sample-in-mask) with a 128-channel FPN and 2-conv towers, 500 iterations x 8
images, coordinates in units of 8 px (POSITION_UNIT = 100 x 64 / 800, the COCO ratio; see the
README). Measured on this schedule (one thread, load ~4 on 2 cores, 262 s): quarter means of the
total loss 2.31 -> 1.67 (x0.72; cls + loc + mask x0.63; centerness 0.67 -> 0.63, its floor being
~0.61), box AP 6.7, mask AP 3.8.
"""

from __future__ import annotations

import json
import os

import pytest
from learning import loss_fell, train_and_evaluate

CONFIG = "projects/embedmask/configs/shapes/embedmask_R18_shapes.yaml"
OVERRIDES = [
    "DATASETS.SHAPES.IMAGE_SIZE", "64",
    "DATASETS.SHAPES.NUM_TRAIN", "200",
    "DATASETS.SHAPES.NUM_VAL", "50",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
    "MODEL.FPN.OUT_CHANNELS", "128",
    "MODEL.FCOS.NUM_CONVS", "2",
    "MODEL.EMBEDMASK.MASK_NUM_CONVS", "2",
    "MODEL.EMBEDMASK.POSITION_UNIT", "8.0",
    "SOLVER.IMS_PER_BATCH", "8",
    "SOLVER.MAX_ITER", "500",
    "SOLVER.STEPS", "(400,)",
    "SOLVER.WARMUP_ITERS", "20",
    "SOLVER.CHECKPOINT_PERIOD", "100000",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def _curve(output_dir: str, keys: tuple[str, ...]) -> list[float]:
    """Sum of the logged ``keys`` at every logged iteration of ``output_dir/metrics.json``."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    return [sum(r[k] for k in keys) for r in records if all(k in r for k in keys)]


@pytest.mark.slow
def test_embedmask_learns_on_shapes(tmp_path):
    losses, results = train_and_evaluate(CONFIG, OVERRIDES, str(tmp_path))
    # The centerness BCE cannot fall below the entropy of its soft targets (~0.61 here; it only
    # goes 0.67 -> 0.63), which is over a third of the final total: the total gets 0.8, and the
    # terms that can fall (classification, GIoU, mask) together get the usual 0.7.
    assert loss_fell(losses, factor=0.8), f"loss did not fall: {losses}"
    reducible = _curve(str(tmp_path), ("loss_fcos_cls", "loss_fcos_loc", "loss_mask"))
    assert loss_fell(reducible), f"cls + loc + mask losses did not fall: {reducible}"
    assert results["bbox"]["AP"] > 3.0, results["bbox"]
    assert results["segm"]["AP"] > 1.5, results["segm"]
