"""The shared training mappers: fields per task, determinism, and clear errors on bad input."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from common.data.mappers import MAPPER_REGISTRY, build_mapper
from common.data.validation import DataError
from common.engine import get_cfg, merge_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _cfg(task, train_name, **extra):
    cfg = get_cfg()
    overlay = {"instance": "Instance", "panoptic": "Panoptic", "semantic": "Semantic"}[task]
    merge_config(cfg, os.path.join(REPO, f"common/configs/Shapes-{overlay}Segmentation.yaml"), [])
    cfg.INPUT.DATASET_MAPPER_NAME = task
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.INPUT.MIN_SIZE_TRAIN = (48, 64, 80)
    cfg.INPUT.MAX_SIZE_TRAIN = 160
    for k, v in extra.items():
        setattr(cfg.INPUT, k, v)
    return cfg


def _first_with_things(name):
    return next(
        d
        for d in DatasetCatalog.get(name)
        if d.get("annotations") or any(s.get("isthing", 0) for s in d.get("segments_info", []))
    )


def test_registry_lists_every_task():
    assert {"instance", "panoptic", "semantic", "detectron2"} <= {k for k, _ in MAPPER_REGISTRY}


def test_instance_fields(shapes_tiny):
    d = _first_with_things(shapes_tiny.train)
    out = build_mapper(_cfg("instance", shapes_tiny.train))(d)
    img, inst = out["image"], out["instances"]
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    assert inst.image_size == tuple(img.shape[1:])
    assert len(inst) > 0
    assert inst.gt_masks.tensor.shape == (len(inst), *img.shape[1:])
    assert inst.gt_classes.max() < len(MetadataCatalog.get(shapes_tiny.train).thing_classes)
    # boxes are recomputed from the augmented masks
    assert torch.allclose(inst.gt_boxes.tensor, inst.gt_masks.get_bounding_boxes().tensor)


def test_panoptic_fields(shapes_tiny):
    d = _first_with_things(shapes_tiny.train_panoptic)
    out = build_mapper(_cfg("panoptic", shapes_tiny.train_panoptic))(d)
    inst, sem = out["instances"], out["sem_seg"]
    meta = MetadataCatalog.get(shapes_tiny.train_panoptic)
    num_things = len(meta.thing_classes)
    assert sem.shape == out["image"].shape[1:] and sem.dtype == torch.int64
    assert inst.gt_is_thing.any() and (~inst.gt_is_thing).any()
    assert bool((inst.gt_classes[inst.gt_is_thing] < num_things).all())
    assert bool((inst.gt_classes[~inst.gt_is_thing] >= num_things).all())
    # every pixel of every segment carries that segment's class in sem_seg
    for m, c in zip(inst.gt_masks.tensor, inst.gt_classes):
        assert bool((sem[m] == c).all())
    # segments tile the image (shapes has no void pixels)
    assert bool((inst.gt_masks.tensor.sum(0) == 1).all())


def test_semantic_fields(shapes_tiny):
    d = DatasetCatalog.get(shapes_tiny.sem_seg_train)[0]
    cfg = _cfg("semantic", shapes_tiny.sem_seg_train)
    cfg.INPUT.CROP.SIZE = (48, 48)
    out = build_mapper(cfg)(d)
    sem, inst = out["sem_seg"], out["instances"]
    assert sem.shape == (48, 48)
    present = sorted(set(sem.unique().tolist()) - {255})
    assert inst.gt_classes.tolist() == present
    for m, c in zip(inst.gt_masks.tensor, inst.gt_classes):
        assert bool((sem[m] == c).all())


@pytest.mark.parametrize("task", ["instance", "panoptic", "semantic"])
def test_same_seed_same_batch(shapes_tiny, task):
    from detectron2.utils.env import seed_all_rng

    name = {
        "instance": shapes_tiny.train,
        "panoptic": shapes_tiny.train_panoptic,
        "semantic": shapes_tiny.sem_seg_train,
    }[task]
    cfg = _cfg(task, name)
    mapper = build_mapper(cfg)
    dicts = DatasetCatalog.get(name)[:4]

    def run(seed):
        seed_all_rng(seed)
        return [mapper(copy.deepcopy(d)) for d in dicts]

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    if task != "instance":
        assert all(torch.equal(x["sem_seg"], y["sem_seg"]) for x, y in zip(a, b))
    assert any(
        x["image"].shape != y["image"].shape or not torch.equal(x["image"], y["image"])
        for x, y in zip(a, c)
    )


def test_identical_batches_across_methods_sharing_a_base(shapes_tiny):
    """Two configs that differ only in model keys produce the same augmented inputs."""
    from detectron2.utils.env import seed_all_rng

    cfg_a = _cfg("instance", shapes_tiny.train)
    cfg_b = _cfg("instance", shapes_tiny.train)
    cfg_b.MODEL.META_ARCHITECTURE = "SomethingElse"
    d = DatasetCatalog.get(shapes_tiny.train)[0]
    seed_all_rng(3)
    a = build_mapper(cfg_a)(copy.deepcopy(d))
    seed_all_rng(3)
    b = build_mapper(cfg_b)(copy.deepcopy(d))
    assert torch.equal(a["image"], b["image"])
    assert torch.equal(a["instances"].gt_masks.tensor, b["instances"].gt_masks.tensor)


def test_unknown_mapper_name_is_reported():
    cfg = get_cfg()
    cfg.INPUT.DATASET_MAPPER_NAME = "instanse"
    with pytest.raises(KeyError, match="instanse"):
        build_mapper(cfg)


def test_missing_image_names_the_file(shapes_tiny):
    d = copy.deepcopy(DatasetCatalog.get(shapes_tiny.train)[0])
    d["file_name"] = "/nonexistent/dir/img.jpg"
    with pytest.raises(DataError, match="/nonexistent/dir/img.jpg"):
        build_mapper(_cfg("instance", shapes_tiny.train))(d)


def test_corrupt_image_names_the_file(shapes_tiny, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    d = copy.deepcopy(DatasetCatalog.get(shapes_tiny.train)[0])
    d["file_name"] = str(bad)
    with pytest.raises(DataError, match="corrupt.jpg"):
        build_mapper(_cfg("instance", shapes_tiny.train))(d)
    # the test-time mapper reports it too
    cfg = _cfg("instance", shapes_tiny.train)
    with pytest.raises(DataError, match="corrupt.jpg"):
        build_mapper(cfg, is_train=False)(d)


@pytest.mark.parametrize(
    "segmentation, match",
    [
        ([], "empty or invalid"),
        ([[1.0, 2.0, 3.0, 4.0]], "even number"),
        ([[1, 2, 3]], "even"),
        ([[1, 2, 3, 4, float("nan"), 6]], "finite"),
    ],
)
def test_invalid_polygon_names_image_and_annotation(shapes_tiny, segmentation, match):
    d = copy.deepcopy(_first_with_things(shapes_tiny.train))
    d["annotations"][0]["segmentation"] = segmentation
    with pytest.raises(DataError, match=match) as e:
        build_mapper(_cfg("instance", shapes_tiny.train))(d)
    assert os.path.basename(d["file_name"]) in str(e.value) and "annotation #0" in str(e.value)


def test_image_without_annotations_gives_empty_instances(shapes_tiny):
    d = copy.deepcopy(_first_with_things(shapes_tiny.train))
    d["annotations"] = []
    out = build_mapper(_cfg("instance", shapes_tiny.train))(d)
    assert len(out["instances"]) == 0
    assert out["instances"].gt_masks.tensor.shape[1:] == out["image"].shape[1:]


def test_lsj_and_detr_crop_chains(shapes_tiny):
    cfg = _cfg("instance", shapes_tiny.train)
    cfg.INPUT.LSJ.ENABLED = True
    cfg.INPUT.LSJ.IMAGE_SIZE = 96
    d = _first_with_things(shapes_tiny.train)
    out = build_mapper(cfg)(copy.deepcopy(d))
    assert tuple(out["image"].shape[1:]) == (96, 96)
    cfg = _cfg("instance", shapes_tiny.train)
    cfg.INPUT.DETR_CROP.PROB = 1.0
    cfg.INPUT.DETR_CROP.SHORT_EDGES = (64,)
    cfg.INPUT.CROP.TYPE = "absolute_range"
    cfg.INPUT.CROP.SIZE = (32, 48)
    out = build_mapper(cfg)(copy.deepcopy(d))
    assert min(out["image"].shape[1:]) in (48, 64, 80)


def test_annotation_json_loads_with_pycocotools(shapes_tiny):
    from pycocotools.coco import COCO

    meta = MetadataCatalog.get(shapes_tiny.train)
    coco = COCO(meta.json_file)
    with open(meta.json_file) as f:
        assert len(coco.getImgIds()) == len(json.load(f)["images"])
    ann = coco.loadAnns(coco.getAnnIds())[0]
    assert np.asarray(coco.annToMask(ann)).sum() == pytest.approx(ann["area"], rel=0.05)
