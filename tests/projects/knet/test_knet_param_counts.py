"""Every K-Net module's parameter count equals the count implied by the layer shapes of the spec
(A1, A2, A7: official R50 configs; C = 256, N = 100, 80 / 133 classes, ADE20K 150 classes)."""

from __future__ import annotations

import pytest
from knet.decode_heads import ASPPHead, FCNHead, PSPHead, UPerHead
from knet.kernel_head import ConvKernelHead
from knet.kernel_update_head import KernelUpdateHead, KernelUpdator
from knet.neck import FPNNeck
from torch import nn


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def linear(cin: int, cout: int, bias: bool = True) -> int:
    return cin * cout + (cout if bias else 0)


def conv(cin: int, cout: int, k: int, bias: bool) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def norm(c: int) -> int:  # GN / BN / LN affine
    return 2 * c


def conv_module(cin: int, cout: int, k: int) -> int:  # conv (no bias) + norm
    return conv(cin, cout, k, False) + norm(cout)


def updator(c: int = 256) -> int:
    # dynamic_layer, input_layer (C -> 2C); input_gate, update_gate, fc_layer (C -> C); 5 LNs
    return 2 * linear(c, 2 * c) + 3 * linear(c, c) + 5 * norm(c)


def update_head(c: int, num_classes: int | None, upd: int = 256, ffn: int = 2048) -> int:
    n = conv(c, c, 1, True)  # feat_transform
    n += 3 * c * c + 3 * c + linear(c, c) + norm(c)  # MHA in/out projections + attention_norm
    n += updator(upd)
    n += linear(c, ffn) + linear(ffn, c) + norm(c)  # FFN + ffn_norm
    n += linear(c, c, bias=False) + norm(c) + linear(c, c)  # mask_fcs x1 + fc_mask
    if num_classes is not None:
        n += linear(c, c, bias=False) + norm(c) + linear(c, num_classes)  # cls_fcs x1 + fc_cls
    return n


def test_kernel_updator():
    assert count(KernelUpdator()) == updator(256) == 463_104


@pytest.mark.parametrize("num_classes", [80, 133])
def test_kernel_update_head_det(num_classes):
    head = KernelUpdateHead(num_classes=num_classes)
    assert count(head) == update_head(256, num_classes)
    assert 2.0e6 < count(head) < 2.1e6  # spec A1: "about 2.0 M per update stage"


def test_kernel_update_head_seg_512_with_256_updator():
    head = KernelUpdateHead(in_channels=512, updator_channels=256, hard_mask_thr=None,
                            with_cls=False)  # fmt: skip
    assert count(head.kernel_update_conv) == updator(256)
    assert count(head) == update_head(512, None, upd=256)


@pytest.mark.parametrize("num_classes", [80, 133])
def test_conv_kernel_head(num_classes):
    head = ConvKernelHead(num_proposals=100, num_classes=num_classes)
    c = 256
    fpn = 7 * conv_module(c, c, 3) + 2 * conv_module(c, c, 1)  # 1+1+2+3 level convs, pred + aux
    assert count(head.localization_fpn) == fpn
    expected = fpn + 2 * conv_module(c, c, 1)  # loc_convs, seg_convs
    expected += conv(c, 100, 1, False) + conv(c, num_classes, 1, True)  # init_kernels, conv_seg
    assert count(head) == expected
    assert 4.3e6 < count(head) < 4.5e6  # spec A1: "about 4.4 M for the rpn_head"


def test_fpn_neck_r50():
    neck = FPNNeck(in_channels=[256, 512, 1024, 2048], out_channels=256)
    lateral = sum(conv(c, 256, 1, True) for c in (256, 512, 1024, 2048))
    assert count(neck) == lateral + 4 * conv(256, 256, 3, True)


def test_decode_heads_r50_d8():
    cls = conv(512, 150, 1, True)
    fcn = FCNHead(in_channels=2048, channels=512, num_classes=150, num_convs=2, concat_input=True)
    assert count(fcn) == (
        conv_module(2048, 512, 3) + conv_module(512, 512, 3) + conv_module(2560, 512, 3) + cls
    )
    psp = PSPHead(in_channels=2048, channels=512, num_classes=150)
    assert count(psp) == 4 * conv_module(2048, 512, 1) + conv_module(2048 + 4 * 512, 512, 3) + cls
    aspp = ASPPHead(in_channels=2048, channels=512, num_classes=150, dilations=(1, 12, 24, 36))
    assert count(aspp) == (
        2 * conv_module(2048, 512, 1)  # image pool, dilation-1 branch
        + 3 * conv_module(2048, 512, 3)  # dilated branches
        + conv_module(5 * 512, 512, 3)  # bottleneck
        + cls
    )


def test_uper_and_aux_heads():
    ins = [256, 512, 1024, 2048]
    uper = UPerHead(in_channels=ins, channels=256, num_classes=150)
    expected = 4 * conv_module(2048, 256, 1) + conv_module(2048 + 4 * 256, 256, 3)  # PPM
    expected += sum(conv_module(c, 256, 1) for c in ins[:-1]) + 3 * conv_module(256, 256, 3)
    expected += conv_module(4 * 256, 256, 3) + conv(256, 150, 1, True)
    assert count(uper) == expected
    aux = FCNHead(in_channels=1024, channels=256, num_classes=150, num_convs=1,
                  concat_input=False)  # fmt: skip
    assert count(aux) == conv_module(1024, 256, 3) + conv(256, 150, 1, True)
