"""common.engine.visualization: overlays for the three output formats, the labelled grid, and the
training-time VisualizationHook (EventStorage images, written to TensorBoard by a real Trainer)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from common.engine import Trainer, get_cfg, merge_config
from common.engine.visualization import (
    VisualizationHook,
    choose_task,
    draw_predictions,
    labelled_grid,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
MASK_RCNN = os.path.join(REPO, "common/configs/baselines/mask_rcnn_R_18_FPN_gn_scratch_shapes.yaml")
H, W = 48, 64


def _meta():
    return MetadataCatalog.get("__test_visualization").set(
        thing_classes=["a", "b"],
        stuff_classes=["a", "b", "sky"],
        thing_colors=[(255, 0, 0), (0, 255, 0)],
        stuff_colors=[(255, 0, 0), (0, 255, 0), (0, 0, 255)],
    )


def _instances(scores):
    inst = Instances((H, W))
    n = len(scores)
    masks = torch.zeros(n, H, W, dtype=torch.bool)
    for i in range(n):
        masks[i, 5 + 10 * i : 15 + 10 * i, 10:30] = True
    inst.pred_masks = masks
    inst.pred_boxes = Boxes(torch.tensor([[10.0, 5 + 10 * i, 30, 15 + 10 * i] for i in range(n)]))
    inst.pred_classes = torch.zeros(n, dtype=torch.long)
    inst.scores = torch.tensor(scores)
    return inst


def _image():
    return np.full((H, W, 3), 128, np.uint8)


@pytest.mark.parametrize("task", ["instance", "panoptic", "semantic"])
def test_draw_predictions_overlays_each_task(task):
    if task == "instance":
        outputs = {"instances": _instances([0.9])}
    elif task == "panoptic":
        seg = torch.zeros(H, W, dtype=torch.int32)
        seg[10:30, 10:30] = 1
        seg[30:, :] = 2
        outputs = {
            "panoptic_seg": (
                seg,
                [
                    {"id": 1, "category_id": 0, "isthing": True, "score": 0.9},
                    {"id": 2, "category_id": 2, "isthing": False},
                ],
            )
        }
    else:
        logits = torch.zeros(3, H, W)
        logits[2, 24:] = 5.0
        outputs = {"sem_seg": logits}
    assert choose_task(outputs) == task
    out = draw_predictions(_image(), outputs, _meta())
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert (out != 128).any(), "nothing was drawn"


def test_confidence_threshold_hides_low_scores():
    inst = _instances([0.9, 0.2])
    np.random.seed(0)  # the Visualizer picks random instance colours
    hi = draw_predictions(_image(), {"instances": inst}, _meta(), score_threshold=0.5)
    np.random.seed(0)
    only_first = draw_predictions(_image(), {"instances": inst[:1]}, _meta())
    np.random.seed(0)
    both = draw_predictions(_image(), {"instances": inst}, _meta(), score_threshold=0.1)
    assert np.array_equal(hi, only_first) and not np.array_equal(hi, both)


def test_choose_task_names_what_the_model_returned():
    with pytest.raises(KeyError, match="instances"):
        choose_task({"sem_seg": torch.zeros(1, 2, 2)}, "instance")


def test_labelled_grid_layout():
    panels = [np.zeros((H, W, 3), np.uint8), np.zeros((H // 2, W // 2, 3), np.uint8)] * 2
    grid = labelled_grid(panels, ["a", "b", "c", "d"], ncols=2, label_height=20, pad=4)
    assert grid.shape == (2 * (H + 20 + 4) - 4, 2 * (W + 4) - 4, 3)
    assert (grid[:20, :W] < 255).any()  # the label text is drawn in the white strip
    with pytest.raises(ValueError):
        labelled_grid(panels, ["a"])


def _tiny_cfg(shapes, out_dir):
    cfg = get_cfg()
    merge_config(
        cfg,
        MASK_RCNN,
        [
            *shapes.cfg_opts,
            "OUTPUT_DIR",
            str(out_dir),
            "MODEL.DEVICE",
            "cpu",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.MAX_ITER",
            "2",
            "SOLVER.WARMUP_ITERS",
            "1",
            "SOLVER.STEPS",
            "()",
            "DATALOADER.NUM_WORKERS",
            "0",
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)",
            "INPUT.MIN_SIZE_TEST",
            "64",
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            "20",
            "MODEL.ROI_BOX_HEAD.NUM_CONV",
            "0",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            "32",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            "0.0",
            "TEST.DETECTIONS_PER_IMAGE",
            "5",
        ],
    )
    return cfg


class _FixedModel(torch.nn.Module):
    """Returns one fixed instance per image and records the mode it was called in."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def forward(self, batched):
        self.modes.append(self.training)
        out = []
        for d in batched:
            inst = Instances((d["height"], d["width"]))
            inst.pred_masks = torch.ones(1, d["height"], d["width"], dtype=torch.bool)
            inst.pred_boxes = Boxes(torch.tensor([[0.0, 0, d["width"], d["height"]]]))
            inst.pred_classes = torch.zeros(1, dtype=torch.long)
            inst.scores = torch.ones(1)
            out.append({"instances": inst})
        return out


@pytest.mark.parametrize("dataset", ["shapes_val", "shapes_val_panoptic", "shapes_sem_seg_val"])
def test_hook_puts_gt_vs_prediction_panels_into_event_storage(dataset, shapes_tiny_env, tmp_path):
    cfg = _tiny_cfg(shapes_tiny_env, tmp_path)
    cfg.DATASETS.TEST = (dataset,)  # ground truth drawn from instance, panoptic or semantic dicts
    from common.data.shapes import configure_shapes_from_cfg

    configure_shapes_from_cfg(cfg)
    model = _FixedModel().train()
    hook = VisualizationHook(cfg, period=3, num_images=2)
    with EventStorage(0) as storage:
        hook.trainer = SimpleNamespace(model=model, storage=storage, iter=0, max_iter=10)
        for it in range(10):
            hook.trainer.iter = it
            storage.iter = it
            hook.after_step()
        names = [name for name, _, _ in storage._vis_data]
    # iterations 3, 6, 9 (period) and 10 (the last), 2 images each
    assert names == ["vis/gt_vs_pred_0", "vis/gt_vs_pred_1"] * 4
    img = storage._vis_data[0][1]
    assert img.shape[0] == 3 and img.shape[2] > 2 * 64, img.shape  # CHW, GT | prediction
    assert model.modes == [False] * 8 and model.training, "eval for drawing, training restored"


def test_trainer_with_vis_period_writes_images_to_tensorboard(shapes_tiny_env, tmp_path):
    """common.engine.Trainer adds the hook when VIS_PERIOD > 0 (before the writers)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common.data.shapes import configure_shapes_from_cfg

    cfg = _tiny_cfg(shapes_tiny_env, tmp_path)
    cfg.VIS_PERIOD = 1
    cfg.freeze()
    configure_shapes_from_cfg(cfg)
    trainer = Trainer(cfg)
    assert any(isinstance(h, VisualizationHook) for h in trainer._hooks)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert {"vis/gt_vs_pred_0", "vis/gt_vs_pred_1"} <= set(acc.Tags()["images"])
    assert {e.step for e in acc.Images("vis/gt_vs_pred_0")} == {0, 1}  # after both iterations
