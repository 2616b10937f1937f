"""tools/convert_backbone.py: ImageNet state dicts with the exact torchvision / timm key names
(generated from ``torchvision.models.resnet*`` and ``timm.create_model(pretrained=False)``, no
downloads) convert into the backbone of a config's model with no missing or unexpected keys, and
the converted backbone computes the source network's features (torchvision ResNet-50 vs
Detectron2 ResNet, timm ResNet-50-d vs ResNet-vd with zero DCN offsets, timm and official-layout
Swin-T vs ``common.ops`` Swin); full-size R101 and Swin-L by shapes on the meta device; the CLI
writes a file QSCheckpointer loads into the whole model; wrong keys, shapes and configs are
refused."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

import common.modeling  # noqa: F401  (registers the backbones and pixel decoder)
from common.convert.core import CheckpointError, check_against_model
from common.engine import get_cfg, merge_config
from common.engine.checkpoint import QSCheckpointer

timm = pytest.importorskip("timm")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import convert_backbone  # noqa: E402

QI = os.path.join(REPO, "projects/queryinst/configs")
R50_1X = os.path.join(QI, "queryinst_R50_FPN_1x_coco.yaml")
R101 = os.path.join(QI, "queryinst_R101_FPN_ms_3x_coco.yaml")
SWIN_L = os.path.join(QI, "queryinst_swin_L_FPN_300q_crop_ms_400-1200_50e_coco.yaml")
FI = os.path.join(REPO, "projects/fastinst/configs")
R50D_DCN = os.path.join(FI, "fastinst_R50-d-DCN_ppm-fpn_D1_576_50ep_coco.yaml")
#: QueryInst heads reduced to one light stage: the backbone is what is converted here
SMALL_HEADS = ["MODEL.QUERYINST.NUM_STAGES", "1", "MODEL.QUERYINST.NUM_PROPOSALS", "4",
               "MODEL.QUERYINST.DIM_DYNAMIC", "4", "MODEL.QUERYINST.DIM_FEEDFORWARD", "16",
               "TEST.DETECTIONS_PER_IMAGE", "4"]  # fmt: skip
SWIN_T = ["MODEL.SWIN.EMBED_DIM", "96", "MODEL.SWIN.DEPTHS", "[2, 2, 6, 2]",
          "MODEL.SWIN.NUM_HEADS", "[3, 6, 12, 24]", "MODEL.SWIN.DROP_PATH_RATE", "0.2"]  # fmt: skip


def cfg_of(config: str, opts=()):
    cfg = get_cfg()
    merge_config(cfg, config, [*opts, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    return cfg


def backbone_holder(config: str, opts=()) -> nn.Module:
    """A module whose ``backbone`` is the config's (FPN or plain) backbone, in eval mode."""
    holder = nn.Module()
    holder.backbone = build_backbone(cfg_of(config, opts)).eval()
    return holder


def meta_model(config: str, opts=()) -> nn.Module:
    cfg = cfg_of(config, opts)
    with torch.device("meta"):
        return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)


def random_bn_statistics(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
            m.num_batches_tracked.fill_(100)
    return net.eval()


def strip(state: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items()}


@pytest.fixture(scope="module")
def tv_r50():
    torch.manual_seed(0)
    return random_bn_statistics(torchvision.models.resnet50(weights=None))


def test_torchvision_resnet50_equals_detectron2_resnet(tv_r50):
    holder = backbone_holder(R50_1X)
    target = convert_backbone.backbone_state(holder)
    converted, report = convert_backbone.convert_backbone(tv_r50.state_dict(), target)
    check_against_model(converted, target, report)
    assert report.ok, report.format()
    assert "backbone.bottom_up.res2.0.conv1.weight" in converted
    bottom_up = holder.backbone.bottom_up
    result = bottom_up.load_state_dict(strip(converted, "backbone.bottom_up."), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = bottom_up(x)
        y = tv_r50.maxpool(tv_r50.relu(tv_r50.bn1(tv_r50.conv1(x))))
        layers = (tv_r50.layer1, tv_r50.layer2, tv_r50.layer3, tv_r50.layer4)
        for name, layer in zip(("res2", "res3", "res4", "res5"), layers):
            y = layer(y)
            torch.testing.assert_close(ours[name], y, rtol=1e-4, atol=1e-5)


def test_torchvision_resnet101_full_size_keys():
    with torch.device("meta"):
        tv = torchvision.models.resnet101(weights=None)
    target = convert_backbone.backbone_state(meta_model(R101))
    converted, report = convert_backbone.convert_backbone(tv.state_dict(), target)
    check_against_model(converted, target, report)
    assert report.ok, report.format()
    # stem 5 + 33 blocks x 3 convs x 5 + 4 shortcuts x 5 (FrozenBN: 4 tensors, no counter)
    assert len(converted) == len(target) == 520


def test_timm_resnet50d_equals_resnet_vd_with_zero_dcn_offsets():
    torch.manual_seed(0)
    ref = random_bn_statistics(timm.create_model("resnet50d", pretrained=False))
    holder = backbone_holder(R50D_DCN, ["MODEL.RESNETS.OUT_FEATURES", "['res5']"])
    target = convert_backbone.backbone_state(holder)
    converted, report = convert_backbone.convert_backbone(ref.state_dict(), target)
    check_against_model(converted, target, report)
    assert report.ok, report.format()
    offsets = [k for k in converted if "conv2_offset" in k]
    assert len(offsets) == 2 * (6 + 3) and all(not converted[k].any() for k in offsets)
    holder.backbone.load_state_dict(strip(converted, "backbone."), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            holder.backbone(x)["res5"], ref.forward_features(x), rtol=1e-4, atol=1e-4
        )


@pytest.fixture(scope="module")
def swin_t():
    """timm Swin-T (random weights) and our Swin-T-FPN backbone from the Swin-L config."""
    torch.manual_seed(0)
    # at 448 px the last stage (14 x 14) has a shifted window in timm too, as in the detection
    # code at any size (at 224 timm skips the shift of a single 7 x 7 window); same parameters
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=448)
    ref.eval()
    with torch.device("meta"):
        at_224 = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).state_dict()
    assert {k: v.shape for k, v in at_224.items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    for name, p in ref.named_parameters():  # non-trivial norms
        if "norm" in name and name.endswith("weight"):
            p.data.uniform_(0.5, 1.5)
        elif "norm" in name:
            p.data.uniform_(-0.1, 0.1)
    return ref, backbone_holder(SWIN_L, SWIN_T)


def official_layout(timm_state: dict, num_classes: int = 21841) -> dict:
    """The Swin-official ImageNet layout of the same tensors: ``layers.i.downsample`` at the
    end of stage i, ``head`` without ``.fc``, position-index buffers and shift masks."""
    out = {}
    for k, v in timm_state.items():
        if ".downsample." in k:
            stage = int(k.split(".")[1])
            k = k.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        out[k.replace("head.fc.", "head.")] = v
    out["head.weight"] = torch.zeros(num_classes, out["head.weight"].shape[1])
    out["head.bias"] = torch.zeros(num_classes)
    for k in [k for k in out if k.endswith("attn.relative_position_bias_table")]:
        out[k.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(
            49, 49, dtype=torch.long
        )
        if int(k.split(".")[3]) % 2:  # shifted blocks carry their mask in the official code
            out[k.replace("attn.relative_position_bias_table", "attn_mask")] = torch.zeros(
                64, 49, 49
            )
    return out


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_swin_tiny_features_equal_timm(swin_t, layout):
    ref, holder = swin_t
    state = ref.state_dict() if layout == "timm" else official_layout(ref.state_dict())
    target = convert_backbone.backbone_state(holder)
    converted, report = convert_backbone.convert_backbone(state, target)
    check_against_model(converted, target, report)
    assert report.ok, report.format()
    norms = sorted(k for k in converted if ".norm0." in k or ".norm3." in k)
    assert norms == [f"backbone.bottom_up.norm{i}.{p}" for i in (0, 3) for p in ("bias", "weight")]
    bottom_up = holder.backbone.bottom_up
    bottom_up.load_state_dict(strip(converted, "backbone.bottom_up."), strict=True)
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        ours = bottom_up(x)
        theirs = ref.forward_intermediates(
            x, norm=False, output_fmt="NCHW", intermediates_only=True
        )
    for i, t in enumerate(theirs):  # our output norms start as identity LayerNorms
        expected = F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2]).permute(0, 3, 1, 2)
        torch.testing.assert_close(ours[f"res{i + 2}"], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window", [7, 12])
def test_swin_large_22k_full_size(window):
    """swin_large_patch4_window{7_224,12_384} (ImageNet-22K) against the Swin-L config: the
    window-12 weights need WINDOW_SIZE 12 (the bias tables differ) and are refused otherwise."""
    name = f"swin_large_patch4_window{window}_{224 if window == 7 else 384}"
    with torch.device("meta"):
        state = timm.create_model(name, pretrained=False, num_classes=21841).state_dict()
    target = convert_backbone.backbone_state(meta_model(SWIN_L, SMALL_HEADS))
    converted, report = convert_backbone.convert_backbone(state, target)
    check_against_model(converted, target, report)
    assert not report.unmapped and not report.missing and not report.unexpected
    assert len(report.shapes) == (0 if window == 7 else 24)
    if window == 12:
        assert all(k.endswith("relative_position_bias_table") for k, _, _ in report.shapes)
        opts = [*SMALL_HEADS, "MODEL.SWIN.WINDOW_SIZE", "12", "MODEL.SWIN.PRETRAIN_IMG_SIZE", "384"]
        target = convert_backbone.backbone_state(meta_model(SWIN_L, opts))
        converted, report = convert_backbone.convert_backbone(state, target)
        assert check_against_model(converted, target, report).ok


def test_cli_initialises_the_backbone_of_the_whole_model(tv_r50, tmp_path, caplog):
    src, dst = tmp_path / "resnet50-0676ba61.pth", tmp_path / "R-50.pth"
    torch.save(tv_r50.state_dict(), src)
    argv = [str(src), str(dst), "--config-file", R50_1X, *SMALL_HEADS]
    assert convert_backbone.main(argv) == 0
    cfg = cfg_of(R50_1X, SMALL_HEADS)
    model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    head_before = model.roi_head.bbox_head[0].fc_cls.weight.clone()
    QSCheckpointer(model).load(str(dst))
    torch.testing.assert_close(model.backbone.bottom_up.stem.conv1.weight, tv_r50.conv1.weight)
    torch.testing.assert_close(
        model.backbone.bottom_up.res5[2].conv3.norm.running_var, tv_r50.layer4[2].bn3.running_var
    )
    torch.testing.assert_close(model.roi_head.bbox_head[0].fc_cls.weight, head_before)
    saved = torch.load(dst, weights_only=True)
    assert "meta_architecture" not in saved  # one backbone file serves every method
    assert all(k.startswith("backbone.bottom_up.") for k in saved["model"])


def test_cli_refuses_unmapped_keys_wrong_shapes_and_configs(tv_r50, tmp_path, capsys):
    bad = dict(tv_r50.state_dict())
    bad["layer4.2.se.fc1.weight"] = torch.zeros(1)
    bad["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    src, dst = tmp_path / "bad.pth", tmp_path / "out.pth"
    torch.save(bad, src)
    argv = [str(src), str(dst), "--config-file", R50_1X, *SMALL_HEADS]
    assert convert_backbone.main(argv) == 1
    err = capsys.readouterr().err
    assert "layer4.2.se.fc1.weight" in err
    assert "backbone.bottom_up.stem.conv1.weight: (64, 3, 3, 3) vs (64, 3, 7, 7)" in err
    torch.save(tv_r50.state_dict(), src)
    for opts, reason in ((["MODEL.RESNETS.STRIDE_IN_1X1", "True"], "STRIDE_IN_1X1 is True"),
                         (["INPUT.FORMAT", "BGR"], "INPUT.FORMAT is BGR")):  # fmt: skip
        assert convert_backbone.main([*argv, *opts]) == 1
        assert reason in capsys.readouterr().err
    assert convert_backbone.main([str(src), str(dst)]) == 1  # no config to check against
    assert "--config-file is required" in capsys.readouterr().err
    assert not dst.exists()
    # a Swin file for a ResNet config: every key is reported, nothing written
    swin = {"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)}
    converted, report = convert_backbone.convert_backbone(
        swin, convert_backbone.backbone_state(meta_model(R50_1X, SMALL_HEADS))
    )
    check_against_model(converted, convert_backbone.backbone_state(meta_model(R50_1X)), report)
    assert report.unexpected == ["backbone.bottom_up.patch_embed.proj.weight"]
    with pytest.raises(CheckpointError, match="not an ImageNet ResNet"):
        convert_backbone.convert_backbone({"encoder.weight": torch.zeros(1)})
