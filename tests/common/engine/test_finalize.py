"""Config finalisation (common.engine.finalize): the task and the class count stated once (by the
dataset or by MODEL.TASK / MODEL.NUM_CLASSES), the rest derived, contradictions refused naming
both keys; and the one padding policy (common.modeling.meta_arch.padding_multiples)."""

from __future__ import annotations

import os

import pytest
from detectron2.layers import ShapeSpec
from torch import nn

from common.engine import get_cfg, merge_config
from common.engine.finalize import ConfigFinalizer, explicit_keys, finalize_config
from common.modeling.meta_arch import backbone_size_divisibility, num_classes, padding_multiples

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SHAPES = os.path.join(REPO, "common/configs/Shapes-{}Segmentation.yaml")
FASTINST = os.path.join(REPO, "projects/fastinst/configs/shapes/fastinst_R18_D1_shapes_{}.yaml")
PANOPTIC_FPN = os.path.join(
    REPO, "common/configs/baselines/panoptic_fpn_R_18_gn_scratch_shapes.yaml"
)


@pytest.mark.parametrize(
    "overlay, task, count, eval_tasks",
    [
        ("Instance", "instance", 5, ("segm", "bbox")),
        ("Panoptic", "panoptic", 9, ("panoptic_seg",)),
        ("Semantic", "semantic", 9, ("sem_seg",)),
    ],
)
def test_the_dataset_states_task_and_class_count(overlay, task, count, eval_tasks):
    cfg = merge_config(get_cfg(), SHAPES.format(overlay), [])
    assert cfg.MODEL.TASK == task and cfg.MODEL.NUM_CLASSES == count
    assert cfg.INPUT.DATASET_MAPPER_NAME == task
    assert tuple(cfg.TEST.EVAL_TASKS) == eval_tasks


def test_a_contradicting_derived_key_is_an_error_naming_both_keys():
    with pytest.raises(ValueError, match="DATASET_MAPPER_NAME='panoptic' contradicts MODEL.TASK"):
        merge_config(
            get_cfg(), SHAPES.format("Instance"), ["INPUT.DATASET_MAPPER_NAME", "panoptic"]
        )
    with pytest.raises(ValueError, match=r"TEST.EVAL_TASKS=.*sem_seg.* contradicts MODEL.TASK"):
        merge_config(get_cfg(), SHAPES.format("Panoptic"), ["TEST.EVAL_TASKS", "('sem_seg',)"])
    with pytest.raises(ValueError, match="MODEL.NUM_CLASSES=4 but dataset 'shapes_sem_seg_train'"):
        merge_config(get_cfg(), SHAPES.format("Semantic"), ["MODEL.NUM_CLASSES", "4"])
    with pytest.raises(ValueError, match="MODEL.TASK='stuff'"):
        merge_config(get_cfg(), SHAPES.format("Semantic"), ["MODEL.TASK", "stuff"])


def test_explicit_values_that_agree_are_kept():
    # Detectron2's own mapper serves any task; a panoptic model may add instance evaluation.
    cfg = merge_config(
        get_cfg(),
        SHAPES.format("Panoptic"),
        ["INPUT.DATASET_MAPPER_NAME", "detectron2", "TEST.EVAL_TASKS", "('panoptic_seg','segm')"],
    )
    assert cfg.INPUT.DATASET_MAPPER_NAME == "detectron2"
    assert tuple(cfg.TEST.EVAL_TASKS) == ("panoptic_seg", "segm")
    # MODEL.TASK stated, no dataset: everything follows it
    cfg = merge_config(get_cfg(), None, ["DATASETS.TRAIN", "()", "MODEL.TASK", "semantic"])
    assert cfg.INPUT.DATASET_MAPPER_NAME == "semantic" and cfg.MODEL.NUM_CLASSES == -1


def test_refinalising_follows_a_changed_dataset():
    cfg = merge_config(get_cfg(), SHAPES.format("Instance"), [])
    merge_config(cfg, None, ["DATASETS.TRAIN", "('shapes_sem_seg_train',)"])
    assert (cfg.MODEL.TASK, cfg.MODEL.NUM_CLASSES) == ("semantic", 9)


def test_unresolved_class_count_is_reported_by_the_model():
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ()
    finalize_config(cfg)
    with pytest.raises(ValueError, match="MODEL.NUM_CLASSES is -1"):
        num_classes(cfg)


def test_explicit_keys_come_from_the_yaml_chain_and_the_overrides():
    keys = explicit_keys({"MODEL": {"KNET": {"TASK": "panoptic"}}}, ["TEST.EVAL_TASKS", "()"])
    assert {"MODEL.KNET.TASK", "MODEL.KNET", "TEST.EVAL_TASKS"} <= keys
    assert "MODEL.NUM_CLASSES" not in keys


def test_alias_supplies_or_must_agree():
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ()
    cfg.MODEL.QUERYINST.NUM_CLASSES = 7
    fin = ConfigFinalizer(cfg, {"MODEL.QUERYINST.NUM_CLASSES"})
    fin.resolve_task()
    fin.resolve_num_classes()
    fin.num_classes_alias("MODEL.QUERYINST.NUM_CLASSES")
    assert cfg.MODEL.NUM_CLASSES == 7
    cfg.MODEL.NUM_CLASSES = 8
    fin = ConfigFinalizer(cfg, {"MODEL.QUERYINST.NUM_CLASSES", "MODEL.NUM_CLASSES"})
    with pytest.raises(
        ValueError, match="QUERYINST.NUM_CLASSES=7 .* contradicts MODEL.NUM_CLASSES"
    ):
        fin.num_classes_alias("MODEL.QUERYINST.NUM_CLASSES")


# ---- a project's own derived keys (FastInst's outputs) -------------------------------------
OUTPUTS = [
    ("instance", (True, False, False)),
    ("panoptic", (True, False, True)),
    ("semantic", (False, True, False)),
]


@pytest.mark.parametrize("leaf, outputs", OUTPUTS)
def test_fastinst_outputs_follow_the_task(leaf, outputs):
    cfg = merge_config(get_cfg(), FASTINST.format(leaf), [])
    t = cfg.MODEL.FASTINST.TEST
    assert (t.INSTANCE_ON, t.SEMANTIC_ON, t.PANOPTIC_ON) == outputs
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == cfg.MODEL.NUM_CLASSES  # the deprecated alias


def test_fastinst_output_that_contradicts_the_task_is_an_error():
    with pytest.raises(ValueError, match="FASTINST.TEST.PANOPTIC_ON=True contradicts MODEL.TASK"):
        merge_config(
            get_cfg(), FASTINST.format("instance"), ["MODEL.FASTINST.TEST.PANOPTIC_ON", "True"]
        )
    # the panoptic model may also output sem_seg
    cfg = merge_config(
        get_cfg(), FASTINST.format("panoptic"), ["MODEL.FASTINST.TEST.SEMANTIC_ON", "True"]
    )
    assert cfg.MODEL.FASTINST.TEST.SEMANTIC_ON


def test_detectron2_models_keep_their_own_keys():
    cfg = merge_config(get_cfg(), PANOPTIC_FPN, [])
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 5 and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 5
    assert cfg.INPUT.DATASET_MAPPER_NAME == "detectron2"


# ---- the padding policy ----------------------------------------------------------------------
class _Backbone(nn.Module):
    def __init__(self, div: int, strides: tuple[int, ...]):
        super().__init__()
        self.size_divisibility = div
        self.strides = strides

    def output_shape(self):
        return {f"res{i}": ShapeSpec(channels=8, stride=s) for i, s in enumerate(self.strides)}


def test_padding_multiples():
    assert backbone_size_divisibility(_Backbone(0, (4, 8, 32))) == 32  # coarsest stride
    assert backbone_size_divisibility(_Backbone(128, (8, 16))) == 128  # its own attribute
    cfg = get_cfg()
    assert padding_multiples(_Backbone(0, (8,)), cfg) == (8, 8)
    cfg.INPUT.SIZE_DIVISIBILITY = 128
    assert padding_multiples(_Backbone(0, (8,)), cfg) == (128, 128)
    cfg.INPUT.SIZE_DIVISIBILITY_TEST = 32
    assert padding_multiples(_Backbone(0, (8,)), cfg) == (128, 32)
    assert padding_multiples(_Backbone(64, (8,)), cfg) == (128, 64)
