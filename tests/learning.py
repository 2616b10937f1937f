"""Shared body of the learning tests: train a config briefly on `shapes`, evaluate it through the
real evaluators, and return the loss curve and the metrics.

Used by ``tests/**/test_*_learning.py``. The run happens in-process with ``common.engine.Trainer``
(exactly what ``train_net.py`` runs), writing to a temporary OUTPUT_DIR.
"""

from __future__ import annotations

import json
import os

import torch
from detectron2.utils.events import EventStorage  # noqa: F401  (re-exported for tests)

from common.engine import Trainer, get_cfg, merge_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_and_evaluate(
    config_file: str, overrides: list[str], output_dir: str, threads: int | None = None
) -> tuple[list[float], dict]:
    """Train ``config_file`` (repo-relative) with ``overrides`` and evaluate on its test set.

    Returns:
        (total_loss per logged iteration, the evaluation results dict, e.g. {"segm": {"AP": ..}}).
    """
    from common.data.shapes import configure_shapes_from_cfg

    if threads:
        torch.set_num_threads(threads)
    cfg = get_cfg()
    merge_config(
        cfg,
        os.path.join(REPO, config_file),
        # a fixed seed (a test may override it) for the data order and augmentation. The
        # model's initial weights come from torch's global RNG, which this does not reseed (as
        # train_net.py's default_setup would): a test run alone in a fresh process repeats
        # exactly, but after other tests in the same process it starts from other weights (the
        # thresholds keep a margin for that; measured: docstrings of the learning tests)
        [
            "SEED",
            "42",
            *overrides,
            "OUTPUT_DIR",
            output_dir,
            "MODEL.DEVICE",
            "cpu",
            "TEST.EVAL_PERIOD",
            "0",
        ],  # fmt: skip
    )
    cfg.freeze()
    configure_shapes_from_cfg(cfg, generate=True)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()  # DefaultTrainer evaluates once after the last iteration
    losses = []
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            rec = json.loads(line)
            if "total_loss" in rec:
                losses.append(rec["total_loss"])
    if not results:
        results = Trainer.test(cfg, trainer.model)
    return losses, results


def loss_fell(losses: list[float], factor: float = 0.7) -> bool:
    """True when the mean of the last quarter is below ``factor`` x that of the first quarter."""
    q = max(len(losses) // 4, 1)
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
    return last < factor * first


def quick_schedule(iters: int = 600) -> list[str]:
    """Overrides that train like a row of ``tools/main_job.py``'s quick schedule: its preset,
    image size, splits, train/test sizes and batch (read from ``tools.benchmark``'s
    ``SCHEDULES["quick"]``, so the two cannot drift apart), ``iters`` iterations with the LR
    steps at 3/4 and 11/12 (the shapes schedule's 450 / 550 of 600) and 50 warm-up iterations,
    each config's own optimizer and LR. A learning test on this schedule is a quick-schedule
    row, so the table's numbers are what it measures."""
    from tools.benchmark import settings_for

    q = settings_for("quick")
    return [
        "DATASETS.SHAPES.PRESET", q.preset,
        "DATASETS.SHAPES.IMAGE_SIZE", str(q.image_size),
        "DATASETS.SHAPES.NUM_TRAIN", str(q.num_train),
        "DATASETS.SHAPES.NUM_VAL", str(q.num_val),
        *q.opts,  # train short sides and max sizes
        "INPUT.MIN_SIZE_TEST", str(q.input_size),
        "SOLVER.IMS_PER_BATCH", str(q.ims_per_batch),
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", f"({iters * 3 // 4}, {iters * 11 // 12})",
        "SOLVER.WARMUP_ITERS", "50",
        "SOLVER.CHECKPOINT_PERIOD", "100000",
        "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip
