"""K-Net learns on `shapes` (standard preset) through the real evaluators: instance (mask AP),
panoptic (PQ) and semantic (mIoU), the shapes configs otherwise unchanged. Instance: the quick
schedule (``learning.quick_schedule``, 96 px) for 1200 x 8 images (~6 min on an idle 2-core CPU).
Semantic: 96 px, 250 iterations (~4 min). Panoptic: 128 px, 400 images, 16 kernels and 1500
iterations (~12 min): from scratch, the thing classes separate slowly (projects/knet/README.md,
"Known gap")."""

from __future__ import annotations

import pytest
from learning import loss_fell, quick_schedule, train_and_evaluate

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


def _long() -> list[str]:
    # The thing classes separate slowly from scratch (README, "Known gap"): 128 px, 400 images,
    # 16 kernels, lr 1e-3, 1500 iterations — about 11-12 minutes each on an idle 2-core CPU, the
    # longest learning tests.
    return [*_small(128, 1500, 1e-3), "DATASETS.SHAPES.NUM_TRAIN", "400",
            "MODEL.KNET.NUM_PROPOSALS", "16"]  # fmt: skip


@pytest.mark.slow
def test_knet_instance_learns_on_shapes(tmp_path):
    # On the quick schedule's 600 iterations K-Net varies a lot between runs: seed 42 measured
    # segm AP 11.5 (0.3 / 4.6 / 9.4 after 150 / 300 / 450) in one run and 5.6 in `make demo`'s
    # (docs/benchmark.md). The test runs the same schedule twice as long: seed 42 measured
    # segm / bbox AP 30.3 / 29.8 (647 s, beside another job).
    losses, results = train_and_evaluate(
        SHAPES + "knet_R18_shapes_instance.yaml", quick_schedule(1200), str(tmp_path), threads=2
    )
    assert loss_fell(losses, 0.5), losses
    assert results["segm"]["AP"] > 15.0, results["segm"]
    assert results["bbox"]["AP"] > 15.0, results["bbox"]


@pytest.mark.slow
def test_knet_panoptic_learns_on_shapes(tmp_path):
    # On the hard preset seed 42 measured PQ 40.2, stuff 89.1, things 1.2 (708 s): the things'
    # class scores stayed ~0.2, below the merge's 0.3 score threshold (kept, as the official
    # code). On the standard preset the things' threshold is 4x that one's.
    losses, results = train_and_evaluate(
        SHAPES + "knet_R18_shapes_panoptic.yaml", _long(), str(tmp_path), threads=2
    )
    assert loss_fell(losses, 0.5), losses
    pq = results["panoptic_seg"]
    # a single stuff class painted everywhere scores PQ < 12 (1 of 9 categories)
    assert pq["PQ"] > 30.0, pq
    assert pq["PQ_st"] > 60.0, pq
    assert pq["PQ_th"] > 2.0, pq


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
