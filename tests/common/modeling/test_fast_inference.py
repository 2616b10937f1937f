"""The inference fast path (MODEL.FAST_INFERENCE): logits within 1e-4 of eager, final results
identical, for every method and task on `shapes` (ResNet with FrozenBN so that folding acts)."""

from __future__ import annotations

import copy

import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

from common.modeling.export import compare_results, core_inputs, max_abs_diff
from common.modeling.fast_inference import fast_inference, fold_batchnorm, prepare_fast_inference
from tools import export_model

CONFIGS = {
    "fastinst": "projects/fastinst/configs/shapes/fastinst_R18_D1_shapes_instance.yaml",
    "knet": "projects/knet/configs/shapes/knet_R18_shapes_instance.yaml",
    "queryinst": "projects/queryinst/configs/shapes/queryinst_R18_FPN_shapes.yaml",
    "queryinst_1stage": "projects/queryinst/configs/shapes/queryinst_R18_FPN_shapes.yaml",
    "embedmask": "projects/embedmask/configs/shapes/embedmask_R18_shapes.yaml",
    "fastinst_panoptic": "projects/fastinst/configs/shapes/fastinst_R18_D1_shapes_panoptic.yaml",
    "knet_semantic": "projects/knet/configs/shapes/knet_upernet_R18_shapes_semantic.yaml",
}
OPTS = ["MODEL.RESNETS.NORM", "FrozenBN"]
EXTRA = {
    "embedmask": ["MODEL.FCOS.INFERENCE_TH", "0.0"],
    "queryinst_1stage": ["MODEL.QUERYINST.NUM_STAGES", "1"],
}
# QueryInst's six stages each refine the boxes the next stage's RoIAlign samples at: the
# folded weights' float32 rounding (1e-6) grows through them with random weights (mask logits
# 4e-4 after six stages); one stage is held to 1e-4 like every other model
MASK_LOGIT_TOLERANCE = {"queryinst": 2e-3}


def _randomise_norms(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d | nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.data = torch.randn(n, generator=g) * 0.1
            m.running_var.data = 0.5 + torch.rand(n, generator=g)


def test_fold_batchnorm_keeps_outputs():
    torch.manual_seed(0)
    d2 = Conv2d(3, 8, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(8))
    seq = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    model = nn.Sequential(d2, seq).eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, 9, 7)
    expected = model(x)
    assert fold_batchnorm(model) == 2
    assert d2.norm is None and isinstance(seq[1], nn.Identity)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_training_batchnorm_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    assert fold_batchnorm(model) == 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fast_path_equals_eager(name, shapes_tiny_env):
    opts = [*shapes_tiny_env.cfg_opts, *OPTS, *EXTRA.get(name, [])]
    eager_cfg = export_model.setup_cfg(CONFIGS[name], opts)
    fast_cfg = export_model.setup_cfg(CONFIGS[name], [*opts, "MODEL.FAST_INFERENCE", "True"])
    torch.manual_seed(0)
    eager = export_model.build_eval_model(eager_cfg)
    _randomise_norms(eager)
    torch.manual_seed(0)
    fast = export_model.build_eval_model(fast_cfg)
    fast.load_state_dict(copy.deepcopy(eager.state_dict()))
    prepare_fast_inference(fast)
    assert fast.queryseg_folded_batchnorms > 0
    inputs = export_model.sample_inputs(eager_cfg)
    with torch.no_grad():
        images, sizes = core_inputs(eager, inputs)
        raw_eager = eager.inference_core(images.tensor, sizes)
        expected = eager(inputs)
    with torch.inference_mode():
        raw_fast = fast.inference_core(images.tensor, sizes)
    results = fast_inference(fast, inputs)
    diffs = max_abs_diff(
        {k: raw_eager[k] for k in eager.core_output_names},
        {k: raw_fast[k] for k in eager.core_output_names},
    )
    logits = [k for k in diffs if "logits" in k or k in ("scores",)]
    tolerance = {
        k: MASK_LOGIT_TOLERANCE.get(name, 1e-4) if k == "mask_logits" else 1e-4 for k in logits
    }
    assert logits and all(diffs[k] <= tolerance[k] for k in logits), diffs
    report = compare_results(expected, results)
    if "count_a" in report:
        assert report["count_a"] == report["count_b"] > 0
        min_iou = 0.95 if name == "queryinst" else 0.999  # see MASK_LOGIT_TOLERANCE
        assert report["class_agreement"] == 1.0 and report["mask_iou"] >= min_iou, report
        assert report["score_diff"] < 1e-4
    if "panoptic_pixel_agreement" in report:
        assert report["panoptic_pixel_agreement"] == 1.0 and report["panoptic_segments_equal"]
    if "sem_seg_diff" in report:
        assert report["sem_seg_diff"] < 1e-4 and report["sem_seg_argmax_agreement"] == 1.0


@pytest.mark.parametrize("output_size", [None, (50, 70)], ids=["input_size", "resized"])
def test_fastinst_selected_query_postprocessing_is_identical(output_size, shapes_tiny_env):
    """Same raw outputs: upsampling only the kept queries gives bit-identical instances."""
    cfg = export_model.setup_cfg(CONFIGS["fastinst"], shapes_tiny_env.cfg_opts)
    torch.manual_seed(0)
    model = export_model.build_eval_model(cfg)
    inputs = export_model.sample_inputs(cfg)
    if output_size is None:
        del inputs[0]["height"], inputs[0]["width"]
    else:
        inputs[0]["height"], inputs[0]["width"] = output_size
    with torch.no_grad():
        images, sizes = core_inputs(model, inputs)
        raw = model.inference_core(images.tensor, sizes)
        full = model.inference(raw, inputs, images)[0]["instances"]
        model.fast_inference = True
        selected = model.inference(raw, inputs, images)[0]["instances"]
    assert len(full) == len(selected) > 0
    assert torch.equal(full.pred_masks, selected.pred_masks)
    assert torch.equal(full.scores, selected.scores)
    assert torch.equal(full.pred_classes, selected.pred_classes)
    assert torch.equal(full.pred_boxes.tensor, selected.pred_boxes.tensor)
