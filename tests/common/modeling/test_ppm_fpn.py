"""The PPM-FPN / plain-FPN pixel decoders shared by FastInst (its pixel decoder) and K-Net (a
neck): official key layout, output strides, registration by ``import common.modeling``."""

from __future__ import annotations

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

import common.modeling  # noqa: F401  (registers the pixel decoders)
from common.modeling.neck import PixelDecoderNeck
from common.modeling.ppm_fpn import BaseFPN, PyramidPoolingModuleFPN

SHAPES = {
    "res3": ShapeSpec(channels=16, stride=8),
    "res4": ShapeSpec(channels=24, stride=16),
    "res5": ShapeSpec(channels=32, stride=32),
}


def _features(batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(batch, s.channels, 128 // s.stride, 160 // s.stride, generator=g)
        for k, s in SHAPES.items()
    }


def test_ppm_fpn_layout_matches_official_keys():
    fpn = PyramidPoolingModuleFPN(SHAPES, convs_dim=64, norm="GN")
    keys = set(fpn.state_dict())
    for k in (
        "adapter_1.weight",
        "adapter_3.norm.bias",
        "layer_2.weight",
        "layer_1.norm.weight",
        "ppm.stages.0.1.weight",
        "ppm.stages.3.1.bias",
        "ppm.bottleneck.weight",
    ):
        assert k in keys, k
    none, (e5, e4, e3) = fpn.forward_features(_features())
    assert none is None
    assert e5.shape == (2, 64, 4, 5) and e4.shape == (2, 64, 8, 10) and e3.shape == (2, 64, 16, 20)


def test_base_fpn_is_ppm_fpn_without_pooling():
    torch.manual_seed(0)
    base = BaseFPN(SHAPES, convs_dim=32, norm="")
    ppm = PyramidPoolingModuleFPN(SHAPES, convs_dim=32, norm="")
    assert not any(k.startswith("ppm.") for k in base.state_dict())
    assert {k for k in ppm.state_dict() if not k.startswith("ppm.")} == set(base.state_dict())
    assert "adapter_1.bias" in base.state_dict()  # no norm: the convs get a bias
    # same lateral/output convs: only the coarsest level (pooled in PPM-FPN) differs at the top
    ppm.load_state_dict(base.state_dict(), strict=False)
    feats = _features(batch=1)
    _, b = base.forward_features(feats)
    _, p = ppm.forward_features(feats)
    assert not torch.allclose(b[0], p[0])
    ppm.coarsest_lateral = base.coarsest_lateral  # pooling off: the two are the same network
    _, p = ppm.forward_features(feats)
    assert all(torch.equal(x, y) for x, y in zip(b, p))


@pytest.mark.parametrize("name", ["PyramidPoolingModuleFPN", "BaseFPN"])
def test_registered_and_usable_as_a_neck(name):
    fpn = SEM_SEG_HEADS_REGISTRY.get(name)(SHAPES, convs_dim=32, norm="GN")
    assert fpn.output_strides == (None, [32, 16, 8])
    neck = PixelDecoderNeck(fpn, list(SHAPES))
    assert neck.strides == [8, 16, 32]
    levels = neck([_features()[k] for k in SHAPES])
    assert [tuple(x.shape[-2:]) for x in levels] == [(16, 20), (8, 10), (4, 5)]
