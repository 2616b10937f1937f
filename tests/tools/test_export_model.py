"""tools/export_model.py: every method and task exports (ONNX, TorchScript) and the exported
model equals eager PyTorch on a real `shapes` image, in its raw outputs and its final results;
an operator that cannot export is named."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from common.modeling.export import ExportError, export_onnx, export_torchscript
from tools import export_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SHAPES = {
    "fastinst": "projects/fastinst/configs/shapes/fastinst_R18_D1_shapes_instance.yaml",
    "knet": "projects/knet/configs/shapes/knet_R18_shapes_instance.yaml",
    "queryinst": "projects/queryinst/configs/shapes/queryinst_R18_FPN_shapes.yaml",
    # threshold 0: a randomly initialised FCOS scores below the default 0.05
    "embedmask": "projects/embedmask/configs/shapes/embedmask_R18_shapes.yaml",
    "fastinst_panoptic": "projects/fastinst/configs/shapes/fastinst_R18_D1_shapes_panoptic.yaml",
    "fastinst_msdeformattn": "projects/fastinst/configs/shapes/fastinst_R18_D1_shapes_instance.yaml",  # noqa: E501
    "knet_semantic": "projects/knet/configs/shapes/knet_upernet_R18_shapes_semantic.yaml",
}
EXTRA_OPTS = {
    "embedmask": ["MODEL.FCOS.INFERENCE_TH", "0.0"],
    # the shared multi-scale deformable-attention pixel decoder (its compiled kernel is built
    # here): exported through its PyTorch path
    "fastinst_msdeformattn": [
        "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME",
        "QSMSDeformAttnPixelDecoder",
        "MODEL.SEM_SEG_HEAD.IN_FEATURES",
        "('res3', 'res4', 'res5')",
        "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES",
        "('res3', 'res4', 'res5')",
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS",
        "1",
        "MODEL.SEM_SEG_HEAD.COMMON_STRIDE",
        "8",
    ],
}
# QueryInst's six stages refine boxes that the next stage's RoIAlign samples at: with random
# weights, float32 rounding differences between the runtimes (4e-4 px after stage 1, measured)
# grow through the stages (TorchScript, the same kernels, gives 0)
RELATIVE_TOLERANCE = {"queryinst": 3e-3}


def _model_and_inputs(name: str, shapes_tiny_env):
    opts = list(shapes_tiny_env.cfg_opts) + EXTRA_OPTS.get(name, [])
    cfg = export_model.setup_cfg(SHAPES[name], opts)
    torch.manual_seed(0)
    model = export_model.build_eval_model(cfg)
    return model, export_model.sample_inputs(cfg)


def _assert_close(report: dict, rtol: float = 1e-4) -> None:
    """Raw outputs within ``rtol`` relative to each output's magnitude; final results the
    same (a few mask-boundary pixels may flip at the 0.5 threshold)."""
    for name, diff in report["diffs"].items():
        eager = report["eager_raw"][name].abs().max()
        assert diff <= rtol * max(1.0, float(eager)) + 1e-5, (name, diff)
    results = report["results"]
    if "count_a" in results:
        assert results["count_a"] == results["count_b"] > 0
        assert results["class_agreement"] == 1.0
        assert results["score_diff"] < 1e-4
        assert results["mask_iou"] > 0.98  # a few boundary pixels may flip at 0.5
    if "sem_seg_diff" in results:
        assert results["sem_seg_diff"] < 1e-4
        assert results["sem_seg_argmax_agreement"] > 0.999
    if "panoptic_pixel_agreement" in results:
        assert results["panoptic_pixel_agreement"] > 0.999
        assert results["panoptic_segments_equal"] == 1.0


def _export_and_check(name: str, fmt: str, shapes_tiny_env, tmp_path) -> dict:
    model, inputs = _model_and_inputs(name, shapes_tiny_env)
    path, names = export_model.export(model, inputs, fmt, str(tmp_path))
    assert os.path.getsize(path) > 0
    report = export_model.check(model, inputs, path, fmt, names)
    with torch.no_grad():
        from common.modeling.export import core_inputs

        images, sizes = core_inputs(model, inputs)
        report["eager_raw"] = model.inference_core(images.tensor, sizes)
    # the model's own forward gives the same final results as its core + post-processing
    with torch.no_grad():
        forward = model(inputs)
    assert len(forward) == len(report["eager"]) == 1
    assert forward[0].keys() == report["eager"][0].keys()
    report["model"] = model
    return report


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_onnx_export_equals_eager(name, shapes_tiny_env, tmp_path):
    report = _export_and_check(name, "onnx", shapes_tiny_env, tmp_path)
    if name == "fastinst_msdeformattn":
        from common.ops.ms_deform_attn import MSDeformAttn

        assert any(isinstance(m, MSDeformAttn) for m in report["model"].modules())
    _assert_close(report, RELATIVE_TOLERANCE.get(name, 1e-4))


@pytest.mark.parametrize("name", ["fastinst"])
def test_torchscript_export_equals_eager(name, shapes_tiny_env, tmp_path):
    _assert_close(_export_and_check(name, "torchscript", shapes_tiny_env, tmp_path))


def test_cli_prints_max_abs_diff(shapes_tiny_env, tmp_path, capsys):
    argv = ["--config-file", SHAPES["knet"], "--format", "onnx", "--output", str(tmp_path)]
    assert export_model.main([*argv, "--check", *shapes_tiny_env.cfg_opts]) == 0
    out = capsys.readouterr().out
    assert "max abs diff: " in out and "class_agreement 1" in out
    diff = float(out.split("max abs diff: ")[1].split()[0])
    assert diff < 1e-3
    assert (tmp_path / "model.onnx").is_file()
    assert (tmp_path / "outputs.txt").read_text().split() == ["pred_logits", "pred_masks"]


class _DeformableCore(nn.Module):
    """A core with a deformable convolution (the R50-d-DCN backbones' operator)."""

    core_output_names = ("y",)

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def inference_core(self, images, image_sizes):
        from common.ops.deform_conv import deform_conv2d

        offset = torch.zeros(images.shape[0], 18, *images.shape[-2:])
        return {"y": deform_conv2d(images, offset, self.weight, padding=1)}

    def core_postprocess(self, outputs, batched_inputs, images):
        return []


def test_unexportable_operator_is_named(tmp_path):
    """ONNX opset 17 has no deformable convolution: the error names the model and the op;
    TorchScript (torchvision's operator) exports it."""
    images, sizes = torch.randn(1, 3, 8, 8), torch.tensor([[8, 8]])
    with pytest.raises(ExportError, match=r"_DeformableCore.*'torchvision::deform_conv2d'"):
        export_onnx(_DeformableCore(), images, sizes, str(tmp_path / "m.onnx"))
    export_torchscript(_DeformableCore(), images, sizes, str(tmp_path / "m.ts"))


def test_model_without_core_is_refused(tmp_path):
    with pytest.raises(ExportError, match="Linear has no 'inference_core'"):
        export_onnx(
            nn.Linear(2, 2), torch.zeros(1, 3, 8, 8), torch.zeros(1, 2), str(tmp_path / "x")
        )
