"""The evaluator factory: ground truth fed back as predictions through the real Detectron2
evaluators scores 100; wrong predictions score less; bad names/types/tasks give clear errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)
from detectron2.structures import Boxes, BoxMode, Instances, polygons_to_bitmask
from PIL import Image

import common.data  # noqa: F401  (registers the datasets)
from common.data.evaluation import build_evaluator, load_sem_seg_label
from common.data.shapes import register_shapes
from common.engine.defaults import add_common_config


@pytest.fixture
def cfg(tmp_path):
    c = get_cfg()
    add_common_config(c)
    c.OUTPUT_DIR = str(tmp_path)
    return c


def _instances(d: dict, shuffle_classes: bool = False) -> Instances:
    """GT annotations of a Detectron2 dataset dict as predictions (score 1)."""
    h, w = d["height"], d["width"]
    annos = d["annotations"]
    inst = Instances((h, w))
    masks = [polygons_to_bitmask(a["segmentation"], h, w) for a in annos]
    inst.pred_masks = torch.as_tensor(np.stack(masks) if masks else np.zeros((0, h, w), bool))
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    classes = torch.tensor([a["category_id"] for a in annos], dtype=torch.int64)
    inst.pred_classes = (classes + 1) % 5 if shuffle_classes else classes
    inst.scores = torch.ones(len(annos))
    return inst


def _panoptic(d: dict) -> tuple[torch.Tensor, list[dict]]:
    """(segment-id map [H,W] int32, segments_info) from the panoptic PNG of a standard dict."""
    rgb = np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB"), dtype=np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    info = [
        {"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
        for s in d["segments_info"]
    ]
    return torch.as_tensor(ids, dtype=torch.int32), info


def _sem_logits(path: str, num_classes: int) -> torch.Tensor:
    """One-hot logits [K,H,W] of a label PNG."""
    label = torch.as_tensor(np.asarray(Image.open(path), dtype=np.int64))
    return torch.nn.functional.one_hot(label, num_classes).permute(2, 0, 1).float()


@pytest.fixture(params=["shapes_tiny", "shapes_tiny_hard"])
def shapes_any(request):
    """Each ``shapes`` preset: the ground truth must score 100 under every one."""
    return request.getfixturevalue(request.param)


def _run(evaluator, pairs) -> dict:
    evaluator.reset()
    for inp, out in pairs:
        evaluator.process([inp], [out])
    return evaluator.evaluate()


def test_coco_ground_truth_scores_ap_100(cfg, shapes_any):
    cfg.TEST.EVAL_TASKS = ("segm", "bbox")
    evaluator = build_evaluator(cfg, shapes_any.val)
    assert isinstance(evaluator, COCOEvaluator)
    assert evaluator._output_dir == os.path.join(cfg.OUTPUT_DIR, "inference")
    dicts = DatasetCatalog.get(shapes_any.val)
    assert any(not d["annotations"] for d in dicts)  # the empty-image path is exercised
    res = _run(evaluator, [(d, {"instances": _instances(d)}) for d in dicts])
    for task in ("segm", "bbox"):
        assert res[task]["AP"] == pytest.approx(100.0)
        assert res[task]["AP75"] == pytest.approx(100.0)

    wrong = _run(evaluator, [(d, {"instances": _instances(d, True)}) for d in dicts])
    assert wrong["segm"]["AP"] < 50


def test_panoptic_dataset_all_tasks_score_100(cfg, shapes_any):
    cfg.TEST.EVAL_TASKS = ("panoptic_seg", "segm", "bbox", "sem_seg")
    name = shapes_any.val_panoptic
    evaluator = build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "ev"))
    assert isinstance(evaluator, DatasetEvaluators)
    kinds = [type(e) for e in evaluator._evaluators]
    assert kinds == [COCOPanopticEvaluator, COCOEvaluator, SemSegEvaluator]
    num_classes = len(MetadataCatalog.get(name).stuff_classes)
    inst_dicts = {d["image_id"]: d for d in DatasetCatalog.get(shapes_any.val)}
    pairs = []
    for d in DatasetCatalog.get(name):
        out = {
            "panoptic_seg": _panoptic(d),
            "instances": _instances(inst_dicts[d["image_id"]]),
            "sem_seg": _sem_logits(d["sem_seg_file_name"], num_classes),
        }
        pairs.append(
            (
                {"image_id": d["image_id"], "file_name": d["file_name"], "height": 64, "width": 64},
                out,
            )
        )
    res = _run(evaluator, pairs)
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert res["panoptic_seg"]["PQ_th"] == pytest.approx(100.0)
    assert res["panoptic_seg"]["PQ_st"] == pytest.approx(100.0)
    assert res["segm"]["AP"] == pytest.approx(100.0)
    assert res["bbox"]["AP"] == pytest.approx(100.0)
    assert res["sem_seg"]["mIoU"] == pytest.approx(100.0)


def test_separated_panoptic_pq_100_and_missing_segments_lower_it(cfg, shapes_tiny):
    cfg.TEST.EVAL_TASKS = ("panoptic_seg",)
    evaluator = build_evaluator(cfg, shapes_tiny.val_panoptic_separated)
    assert isinstance(evaluator, COCOPanopticEvaluator)
    unified = MetadataCatalog.get(shapes_tiny.val_panoptic).stuff_dataset_id_to_contiguous_id
    to_dataset_id = {v: k for k, v in unified.items()}
    separated = MetadataCatalog.get(shapes_tiny.val_panoptic_separated)
    std = DatasetCatalog.get(shapes_tiny.val_panoptic)  # PNG + segments in unified ids

    def pairs(drop_things: bool):
        for d in std:
            ids, info = _panoptic(d)
            for s in info:  # stuff: unified contiguous id -> the separated dataset's 1..4
                if not s["isthing"]:
                    dataset_id = to_dataset_id[s["category_id"]]
                    s["category_id"] = separated.stuff_dataset_id_to_contiguous_id[dataset_id]
            if drop_things:
                for s in info:
                    if s["isthing"]:
                        ids[ids == s["id"]] = 0
                info = [s for s in info if not s["isthing"]]
            yield (
                {"image_id": d["image_id"], "file_name": d["file_name"]},
                {"panoptic_seg": (ids, info)},
            )

    assert _run(evaluator, pairs(False))["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert _run(evaluator, pairs(True))["panoptic_seg"]["PQ_th"] == pytest.approx(0.0)


def test_sem_seg_ground_truth_scores_miou_100(cfg, shapes_any):
    cfg.TEST.EVAL_TASKS = ("sem_seg",)
    evaluator = build_evaluator(cfg, shapes_any.sem_seg_val)
    assert isinstance(evaluator, SemSegEvaluator)
    k = len(MetadataCatalog.get(shapes_any.sem_seg_val).stuff_classes)
    dicts = DatasetCatalog.get(shapes_any.sem_seg_val)
    good = [(d, {"sem_seg": _sem_logits(d["sem_seg_file_name"], k)}) for d in dicts]
    res = _run(evaluator, good)["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0) and res["pACC"] == pytest.approx(100.0)

    bad = [(d, {"sem_seg": o["sem_seg"].roll(1, dims=0)}) for d, o in good]  # class c -> c+1
    assert _run(evaluator, bad)["sem_seg"]["mIoU"] < 10


def test_label_loader_is_numpy2_safe_and_writable(shapes_tiny):
    d = DatasetCatalog.get(shapes_tiny.sem_seg_val)[0]
    gt = load_sem_seg_label(d["sem_seg_file_name"], dtype=int)
    assert gt.dtype == np.int64 and gt.shape == (64, 64) and gt.flags.writeable
    gt[gt == 255] = 9  # what SemSegEvaluator does


def test_build_evaluator_generates_a_lazy_shapes_split(cfg, tmp_path):
    spec = register_shapes(
        root=str(tmp_path), image_size=32, num_train=1, num_val=2, seed=2, prefix="shapes_evlazy"
    )
    assert not os.path.exists(spec.dataset_dir)
    assert isinstance(build_evaluator(cfg, "shapes_evlazy_val"), COCOEvaluator)
    assert os.path.isfile(spec.path("val", "instances_json"))


def test_unknown_dataset_name(cfg):
    with pytest.raises(KeyError, match="shapes_vall"):
        build_evaluator(cfg, "shapes_vall")


@pytest.mark.parametrize("evaluator_type", ["cityscapes_sem_seg", None])
def test_unknown_evaluator_type(cfg, evaluator_type):
    name = f"qs_test_type_{evaluator_type}"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        if evaluator_type is not None:
            MetadataCatalog.get(name).set(evaluator_type=evaluator_type)
    with pytest.raises(ValueError, match=f"{name}.*{evaluator_type}"):
        build_evaluator(cfg, name)


def test_bad_or_mismatched_eval_tasks(cfg, shapes_tiny):
    cfg.TEST.EVAL_TASKS = ("segm", "keypoints")
    with pytest.raises(ValueError, match="EVAL_TASKS.*keypoints"):
        build_evaluator(cfg, shapes_tiny.val)
    cfg.TEST.EVAL_TASKS = ("panoptic_seg",)
    with pytest.raises(ValueError, match=f"{shapes_tiny.val}.*'segm'"):
        build_evaluator(cfg, shapes_tiny.val)
