"""Cityscapes through Detectron2's builtin registration: a tiny Cityscapes-layout set written by
the test (polygons JSON, instance-id and label-id PNGs) loads through both of Detectron2's paths
(polygons, instance-id PNGs) with the same instances; its ground truth fed back as predictions
scores AP = AP50 = 100 through the evaluator factory (official cityscapesscripts evaluation),
and a wrong class or a missed instance scores less; the evaluation writes nowhere but its
temporary folder (not the current directory, not CITYSCAPES_DATASET); a missing
cityscapesscripts names the extra to install."""

from __future__ import annotations

import os
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import builtin
from detectron2.data.datasets.cityscapes import load_cityscapes_instances
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.structures import Boxes, Instances

from common.data.cityscapes import CityscapesInstanceEvaluator, require_cityscapesscripts
from common.data.evaluation import build_evaluator
from common.data.validation import check_dataset_files
from common.engine import get_cfg
from tests.cityscapes_tiny import LAYOUT, THING_CLASSES, write_tiny_cityscapes

TRAIN, VAL = "cityscapes_fine_instance_seg_train", "cityscapes_fine_instance_seg_val"


def _register_cityscapes(root: str) -> None:
    """(Re-)register Detectron2's builtin Cityscapes names under ``root``."""
    for key in builtin._RAW_CITYSCAPES_SPLITS:
        for task in ("instance_seg", "sem_seg"):
            name = key.format(task=task)
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
    builtin.register_all_cityscapes(root)


@pytest.fixture(scope="module")
def cityscapes_tiny(tmp_path_factory):
    """The tiny set under a DETECTRON2_DATASETS-style root, with the builtin names pointing at
    it for the module; afterwards they point where Detectron2's import left them."""
    root = str(tmp_path_factory.mktemp("datasets"))
    write_tiny_cityscapes(root)
    _register_cityscapes(root)
    yield root
    _register_cityscapes(builtin._root)


def _dirs(root: str, split: str) -> tuple[str, str]:
    base = os.path.join(root, "cityscapes")
    return os.path.join(base, "leftImg8bit", split), os.path.join(base, "gtFine", split)


def _masks(record: dict, height: int, width: int) -> list[tuple[int, bool, np.ndarray]]:
    out = []
    for a in record["annotations"]:
        seg = a["segmentation"]
        if isinstance(seg, list):
            rle = mask_util.merge(mask_util.frPyObjects(seg, height, width))
        else:
            rle = seg
        out.append((a["category_id"], bool(a["iscrowd"]), mask_util.decode(rle).astype(bool)))
    return sorted(out, key=lambda m: (m[0], m[1], np.argwhere(m[2])[0].tolist()))


def test_both_loader_paths_give_the_same_instances(cityscapes_tiny):
    image_dir, gt_dir = _dirs(cityscapes_tiny, "train")
    from_polygons = load_cityscapes_instances(image_dir, gt_dir, from_json=True, to_polygons=True)
    from_pngs = load_cityscapes_instances(image_dir, gt_dir, from_json=False, to_polygons=False)
    assert len(from_polygons) == len(from_pngs) == sum(LAYOUT["train"].values())
    by_file = {d["file_name"]: d for d in from_pngs}
    for poly_record in from_polygons:
        png_record = by_file[poly_record["file_name"]]
        h, w = png_record["height"], png_record["width"]
        assert (poly_record["height"], poly_record["width"]) == (h, w) == (64, 128)
        polys, pngs = _masks(poly_record, h, w), _masks(png_record, h, w)
        # three things per image (+ the crowd region in the first one; the deleted polygon gone)
        assert [(c, crowd) for c, crowd, _ in polys] == [(c, crowd) for c, crowd, _ in pngs]
        assert sum(not crowd for _, crowd, _ in polys) == 3
        for (_, _, a), (_, _, b) in zip(polys, pngs):
            # the polygons are dilated by 0.5 px to match the rasteriser: nearly the same pixels
            assert (a & b).sum() / (a | b).sum() > 0.8
    first = next(d for d in from_pngs if "aachen_000000_000019_" in d["file_name"])
    classes = sorted(THING_CLASSES[a["category_id"]] for a in first["annotations"])
    assert classes == ["car", "car", "person", "rider"]  # one car is the "cargroup" crowd
    assert MetadataCatalog.get(TRAIN).thing_classes == list(THING_CLASSES)


def test_builtin_name_loads_the_tiny_set(cityscapes_tiny):
    dicts = DatasetCatalog.get(TRAIN)  # Detectron2's registration: polygons from the JSON
    assert sorted(os.path.basename(d["file_name"]).split("_")[0] for d in dicts) == [
        "aachen", "aachen", "bochum", "bochum",
    ]  # fmt: skip
    check_dataset_files([TRAIN, VAL])


def _ground_truth_outputs(root: str) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of the val split with its ground truth as predictions (score 1)."""
    image_dir, gt_dir = _dirs(root, "val")
    inputs, outputs = [], []
    for d in load_cityscapes_instances(image_dir, gt_dir, from_json=False, to_polygons=False):
        annos = [a for a in d["annotations"] if not a["iscrowd"]]
        inst = Instances((d["height"], d["width"]))
        masks = np.stack([mask_util.decode(a["segmentation"]) for a in annos]).astype(bool)
        inst.pred_masks = torch.from_numpy(masks)
        inst.pred_boxes = Boxes(torch.tensor([list(a["bbox"]) for a in annos], dtype=torch.float))
        inst.pred_classes = torch.tensor([a["category_id"] for a in annos])
        inst.scores = torch.ones(len(annos))
        inputs.append({"file_name": d["file_name"], "image_id": d["image_id"]})
        outputs.append({"instances": inst})
    return inputs, outputs


def _evaluate(cfg, inputs, outputs, tmp_path):
    evaluator = build_evaluator(cfg, VAL, str(tmp_path))
    evaluator.reset()
    for i, o in zip(inputs, outputs):
        evaluator.process([i], [o])
    return evaluator.evaluate()


def test_ground_truth_scores_ap_100_and_mistakes_score_less(cityscapes_tiny, tmp_path, monkeypatch):
    # whatever these say, the official script must read and write nothing there
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("CITYSCAPES_DATASET", str(elsewhere))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(elsewhere))
    cwd = tmp_path / "cwd"  # the script writes matches.json into the current directory
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = get_cfg()
    cfg.TEST.EVAL_TASKS = ("segm",)
    inputs, outputs = _ground_truth_outputs(cityscapes_tiny)
    assert isinstance(build_evaluator(cfg, VAL, str(tmp_path)), CityscapesInstanceEvaluator)

    segm = _evaluate(cfg, inputs, outputs, tmp_path)["segm"]
    assert segm["AP"] == pytest.approx(100.0) and segm["AP50"] == pytest.approx(100.0)
    present = {THING_CLASSES[int(c)] for o in outputs for c in o["instances"].pred_classes}
    assert {k for k in segm if k.startswith("AP-")} == {f"AP-{c}" for c in present}
    assert len(present) == 6  # 2 val images x 3 things; absent classes are left out of the mean

    wrong = [{"instances": o["instances"][:]} for o in outputs]
    wrong[0]["instances"].pred_classes = wrong[0]["instances"].pred_classes.clone()
    wrong[0]["instances"].pred_classes[0] = (wrong[0]["instances"].pred_classes[0] + 1) % 8
    missed = [{"instances": o["instances"][1:]} for o in outputs]
    for bad in (wrong, missed):
        assert _evaluate(cfg, inputs, bad, tmp_path)["segm"]["AP"] < 90.0
    assert not os.listdir(elsewhere) and not os.listdir(cwd)


def test_bbox_task_adds_coco_box_evaluation(cityscapes_tiny, tmp_path):
    cfg = get_cfg()
    cfg.TEST.EVAL_TASKS = ("segm", "bbox")
    evaluator = build_evaluator(cfg, VAL, str(tmp_path))
    assert isinstance(evaluator, DatasetEvaluators)
    kinds = [type(e) for e in evaluator._evaluators]
    assert kinds == [CityscapesInstanceEvaluator, COCOEvaluator]


def test_a_problem_in_the_official_script_is_an_error_not_an_exit(cityscapes_tiny, tmp_path):
    cfg = get_cfg()
    cfg.TEST.EVAL_TASKS = ("segm",)
    evaluator = build_evaluator(cfg, VAL, str(tmp_path))
    evaluator.reset()  # nothing processed: the script finds no prediction file and would exit
    with pytest.raises(RuntimeError, match="Found no prediction for ground truth .*frankfurt"):
        evaluator.evaluate()


def test_missing_cityscapesscripts_names_the_extra(cityscapes_tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "cityscapesscripts", None)
    monkeypatch.setitem(sys.modules, "cityscapesscripts.helpers", None)
    monkeypatch.setitem(sys.modules, "cityscapesscripts.helpers.labels", None)
    with pytest.raises(ImportError, match=r"queryseg\[cityscapes\]"):
        require_cityscapesscripts("this test")
    with pytest.raises(ImportError, match=rf"dataset {TRAIN} needs .*queryseg\[cityscapes\]"):
        check_dataset_files([TRAIN])
    with pytest.raises(ImportError, match=rf"evaluating dataset {VAL} .*queryseg\[cityscapes\]"):
        CityscapesInstanceEvaluator(VAL)


def test_missing_folder_says_how_to_prepare_cityscapes(cityscapes_tiny, tmp_path):
    _register_cityscapes(str(tmp_path))  # an empty DETECTRON2_DATASETS
    try:
        with pytest.raises(FileNotFoundError, match="image_dir .* does not exist.*leftImg8bit"):
            check_dataset_files([TRAIN])
    finally:
        _register_cityscapes(cityscapes_tiny)
