"""K-Net learns on `shapes` through the real evaluators: instance (mask AP), panoptic (PQ) and
semantic (mIoU). Each run is sized for <= 4 minutes on an idle 2-core CPU: 64 px images (200 train
/ 50 val) for instance/panoptic, 96 px for semantic, the shapes configs otherwise unchanged."""

from __future__ import annotations

import pytest
from learning import loss_fell, train_and_evaluate

SHAPES = "projects/knet/configs/shapes/"


def _small(size: int, iters: int, lr: float) -> list[str]:
    return [
        "DATASETS.SHAPES.IMAGE_SIZE", str(size),
        "DATASETS.SHAPES.NUM_TRAIN", "200",
        "DATASETS.SHAPES.NUM_VAL", "50",
        "INPUT.MIN_SIZE_TRAIN", f"({size},)",
        "INPUT.MAX_SIZE_TRAIN", str(2 * size),
        "INPUT.MIN_SIZE_TEST", str(size),
        "INPUT.MAX_SIZE_TEST", str(2 * size),
        "SOLVER.IMS_PER_BATCH", "8",
        "SOLVER.BASE_LR", str(lr),
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", f"({int(iters * 0.85)},)",
        "SOLVER.WARMUP_ITERS", "20",
        "SOLVER.CHECKPOINT_PERIOD", "100000",
        "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip


_CLASSES_GAP = pytest.mark.xfail(
    reason="thing classes stay near chance in this budget (masks learn); projects/knet/README.md, "
    "'Known gap'",
    strict=False,
)


@pytest.mark.slow
def test_knet_instance_learns_on_shapes(tmp_path):
    # The thing classes separate slowly from scratch (README, "Known gap"): 128 px, 400 images,
    # 1500 iterations, 16 kernels, lr 1e-3 — about 11 minutes on an idle 2-core CPU, the longest
    # learning test. Seed 42 measured segm / bbox AP 4.51 / 4.44 (500 iterations: 1.58 / 1.67).
    overrides = [*_small(128, 1500, 1e-3), "DATASETS.SHAPES.NUM_TRAIN", "400",
                 "MODEL.KNET.NUM_PROPOSALS", "16",
                 "MODEL.KNET.TEST.MAX_PER_IMAGE", "16"]  # fmt: skip
    losses, results = train_and_evaluate(
        SHAPES + "knet_R18_shapes_instance.yaml", overrides, str(tmp_path), threads=2
    )
    assert loss_fell(losses, 0.5), losses
    assert results["segm"]["AP"] > 2.0, results["segm"]
    assert results["bbox"]["AP"] > 2.0, results["bbox"]


@pytest.mark.slow
@_CLASSES_GAP
def test_knet_panoptic_learns_on_shapes(tmp_path):
    losses, results = train_and_evaluate(
        SHAPES + "knet_R18_shapes_panoptic.yaml", _small(64, 300, 3e-4), str(tmp_path), threads=2
    )
    assert loss_fell(losses, 0.5), losses
    assert results["panoptic_seg"]["PQ"] > 20.0, results["panoptic_seg"]


@pytest.mark.slow
def test_knet_semantic_learns_on_shapes(tmp_path):
    overrides = [*_small(96, 250, 6e-4), "INPUT.CROP.SIZE", "(96, 96)", "INPUT.SIZE_DIVISIBILITY",
                 "96"]  # fmt: skip
    losses, results = train_and_evaluate(
        SHAPES + "knet_upernet_R18_shapes_semantic.yaml", overrides, str(tmp_path), threads=2
    )
    assert loss_fell(losses, 0.5), losses
    # chance level: a constant prediction scores mIoU < 10 on 9 classes
    assert results["sem_seg"]["mIoU"] > 30.0, results["sem_seg"]
