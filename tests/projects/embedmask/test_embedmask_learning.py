"""EmbedMask learns on `shapes`: the loss falls and box/mask AP rise through the COCO evaluator.

Sized for <= 4 minutes on an idle 2-core CPU: 64 px images (200 train / 50 val), the shapes config
(AdamW 5e-4) with a 128-channel FPN and 2-conv towers, 300 iterations x 8 images.
"""

from __future__ import annotations

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
    "SOLVER.IMS_PER_BATCH", "8",
    "SOLVER.MAX_ITER", "300",
    "SOLVER.STEPS", "(240,)",
    "SOLVER.WARMUP_ITERS", "20",
    "SOLVER.CHECKPOINT_PERIOD", "100000",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


@pytest.mark.slow
def test_embedmask_learns_on_shapes(tmp_path):
    losses, results = train_and_evaluate(CONFIG, OVERRIDES, str(tmp_path))
    assert loss_fell(losses), f"loss did not fall: {losses}"
    assert results["bbox"]["AP"] > 10.0, results["bbox"]
    assert results["segm"]["AP"] > 10.0, results["segm"]
