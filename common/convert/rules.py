"""Key-renaming rules shared by the checkpoint converters (``tools/convert_*.py``).

Every function returns :class:`common.convert.core.Rule` lists for
:func:`common.convert.core.convert_state_dict`; ``src``/``dst`` are key prefixes (``"backbone."``,
``"backbone.bottom_up."``), so one rule set serves an ImageNet file (no prefix) and a detector
checkpoint (mmdet ``backbone.``) alike.

- :func:`resnet_rules`: torchvision / mmcv / timm ResNet (``conv1``, ``bn1``, ``layerN.i.convK``,
  ``bnK``, ``downsample``) -> Detectron2 ResNet (``stem.conv1``, ``res{N+1}.i.convK``,
  ``convK.norm``, ``shortcut``), with the ResNet-C deep stem, the ResNet-D avg-down shortcut and
  mmdet DCN offsets; :func:`resnet_layout` reads which of these a state dict uses.
- :func:`fpn_rules`: mmdet ``neck.{lateral,fpn}_convs.i.conv`` -> Detectron2
  ``backbone.fpn_{lateral,output}{i+2}``.
- :func:`swin_rules`: official Swin (``layers.i.downsample`` at the *end* of stage i), timm
  Swin (at the start of stage i + 1) or mmcv Swin (mmdet/mmseg ``stages.i.blocks.j.attn.w_msa``,
  patch merging in ``nn.Unfold`` channel order) -> ``common.modeling.backbones.swin.SwinBackbone``;
  :func:`swin_layout` tells them apart.
- :data:`MMDET_COCO_CLASSES`: mmdet's ``CocoDataset`` class order, for
  :func:`common.convert.core.class_permutation` against Detectron2's ``builtin_meta`` names.
- :data:`CITYSCAPES_FROM_COCO`: where Cityscapes class rows without a COCO namesake start from,
  for :func:`common.convert.core.class_row_sources` (COCO's 80 rows -> Cityscapes' 8 by name).
- :func:`drop_unused_batch_counters`, :func:`initial_values`: reconcile a converted dict with the
  model it is for (BatchNorm counters a FrozenBN model has no slot for; parameters that an
  ImageNet classifier cannot provide and whose initial value the official code fixes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from common.convert.core import Rule

__all__ = [
    "MMDET_COCO_CLASSES",
    "resnet_layout",
    "resnet_rules",
    "fpn_rules",
    "swin_layout",
    "swin_rules",
    "drop_unused_batch_counters",
    "initial_values",
    "CITYSCAPES_FROM_COCO",
]

#: mmdet ``CocoDataset.CLASSES`` (2.x) / ``METAINFO["classes"]`` (3.x): the 80 thing classes
#: in the order of mmdet's class logits and mask channels.
MMDET_COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

#: Cityscapes thing classes (Detectron2's ``cityscapes`` metadata: person, rider, car, truck,
#: bus, train, motorcycle, bicycle) whose class rows do not come from the COCO row of the same
#: name, for :func:`common.convert.core.class_row_sources`: ``rider`` has no COCO class and
#: starts from the target model's own initialisation (``None``), as in Mask R-CNN's Cityscapes
#: fine-tuning from COCO ("rider being randomly initialized", He et al. 2017, appendix). The
#: other seven take the COCO rows of their names.
CITYSCAPES_FROM_COCO: dict[str, str | None] = {"rider": None}

_DEEP_STEM = (  # timm ResNet-C/D (conv1.N + bn1) and mmcv ResNetV1c/V1d (stem.N)
    ("conv1.0", "stem.conv1"),
    ("conv1.1", "stem.conv1.norm"),
    ("conv1.3", "stem.conv2"),
    ("conv1.4", "stem.conv2.norm"),
    ("conv1.6", "stem.conv3"),
    ("bn1", "stem.conv3.norm"),
    ("stem.0", "stem.conv1"),
    ("stem.1", "stem.conv1.norm"),
    ("stem.3", "stem.conv2"),
    ("stem.4", "stem.conv2.norm"),
    ("stem.6", "stem.conv3"),
    ("stem.7", "stem.conv3.norm"),
)
_PLAIN_STEM = (("conv1", "stem.conv1"), ("bn1", "stem.conv1.norm"))


def strip_wrappers(state_dict: Mapping[str, object]) -> dict[str, object]:
    """Remove a ``state_dict``/``model`` wrapper and ``module.``/``backbone.`` key prefixes (an
    ImageNet or detection file's backbone part, as the backbone weight helpers take it)."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "backbone."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def resnet_layout(keys: Iterable[str], src: str = "") -> dict[str, bool]:
    """Which ResNet variant a state dict holds, as keyword arguments of :func:`resnet_rules`.

    ``deep_stem``: a 3-conv stem (timm ``conv1.0``, mmcv ``stem.0``); ``avg_down``: ResNet-D
    shortcuts (``downsample.{1,2}`` after an AvgPool at index 0).
    """
    keys = [k[len(src) :] for k in keys if k.startswith(src)]
    return {
        "deep_stem": any(k.startswith(("conv1.0.", "stem.0.")) for k in keys),
        "avg_down": any(".downsample.2." in k for k in keys),
    }


def resnet_rules(
    src: str = "", dst: str = "", *, deep_stem: bool = False, avg_down: bool = False
) -> list[Rule]:
    """torchvision / mmcv / timm bottleneck-ResNet keys -> Detectron2 ``ResNet`` keys.

    ``{src}layerN.i.convK.weight`` -> ``{dst}res{N+1}.i.convK.weight``, ``bnK.*`` ->
    ``convK.norm.*``, ``downsample.{0,1}`` (``{1,2}`` with ``avg_down``) -> ``shortcut``,
    ``shortcut.norm``, mmdet DCN ``conv2.conv_offset`` -> ``conv2_offset``; the stem as above;
    the ImageNet classifier ``fc.*`` is dropped. ``num_batches_tracked`` is renamed like the other
    BatchNorm entries (see :func:`drop_unused_batch_counters`). No tensor changes: torchvision
    and timm put the stride in the 3x3 conv (Detectron2 ``STRIDE_IN_1X1: False``) and take RGB.
    """
    s = re.escape(src)
    rules = [
        Rule(rf"{s}{re.escape(a)}\.(\w+)", f"{dst}{b}.\\1")
        for a, b in (_DEEP_STEM if deep_stem else _PLAIN_STEM)
    ]
    conv, norm = (1, 2) if avg_down else (0, 1)
    for n in range(1, 5):
        block, out = rf"{s}layer{n}\.(\d+)\.", f"{dst}res{n + 1}.\\1."
        rules += [
            Rule(block + r"conv(\d)\.weight", out + r"conv\2.weight"),
            Rule(block + r"bn(\d)\.(\w+)", out + r"conv\2.norm.\3"),
            Rule(block + r"conv2(?:\.conv_offset|_offset)\.(\w+)", out + r"conv2_offset.\2"),
            Rule(block + rf"downsample\.{conv}\.weight", out + "shortcut.weight"),
            Rule(block + rf"downsample\.{norm}\.(\w+)", out + r"shortcut.norm.\2"),
        ]
    rules.append(Rule(rf"{s}fc\.(weight|bias)", None))
    return rules


def fpn_rules(
    src: str = "neck.", dst: str = "backbone.", num_levels: int = 4, first_level: int = 2
) -> list[Rule]:
    """mmdet ``FPN`` -> Detectron2 ``FPN``: ``{src}lateral_convs.i.conv`` ->
    ``{dst}fpn_lateral{i + first_level}`` and ``{src}fpn_convs.i.conv`` -> ``fpn_output...``
    (mmdet index 0 is the finest level, P2 for an FPN on res2..res5)."""
    s = re.escape(src)
    rules = []
    for i in range(num_levels):
        level = i + first_level
        for theirs, ours in (("lateral_convs", "fpn_lateral"), ("fpn_convs", "fpn_output")):
            rules.append(Rule(rf"{s}{theirs}\.{i}\.conv\.(weight|bias)", f"{dst}{ours}{level}.\\1"))
    return rules


def swin_layout(keys: Iterable[str], src: str = "") -> str:
    """``"official"`` (Swin-Transformer / Swin detection repos: ``layers.0.downsample``),
    ``"timm"`` (``layers.1..3.downsample``, ``head.fc``) or ``"mmcv"`` (mmdet/mmseg
    ``SwinTransformer``: ``stages.i``, ``w_msa``; its patch merging stores channels in another
    order, which ``swin_rules(layout="mmcv")`` undoes)."""
    keys = [k[len(src) :] for k in keys if k.startswith(src)]
    if any(k.startswith("stages.") or ".w_msa." in k for k in keys):
        return "mmcv"
    if any(k.startswith("layers.0.downsample.") for k in keys):
        return "official"
    return "timm"


def swin_rules(src: str = "", dst: str = "", *, layout: str = "official") -> list[Rule]:
    """Official or timm Swin keys -> ``SwinBackbone`` keys (timm modules, detection norms).

    Official: ``layers.i.downsample`` -> ``layers.{i+1}.downsample``. Both: the buffers
    ``relative_position_index``/``attn_mask`` and the classifier (``head``, final ``norm``) are
    dropped; the detection output norms ``norm0..norm3`` are kept. No tensor changes: the QKV
    layout ([3C, C], q/k/v blocks) and timm's patch-merging order match the official code.
    An absolute position embedding (APE) has no rule, so such a checkpoint is refused.
    ``layout="mmcv"``: see :func:`_mmcv_swin_rules`.
    """
    if layout == "mmcv":
        return _mmcv_swin_rules(src, dst)
    if layout not in ("official", "timm"):
        raise ValueError(f"no rules for the {layout!r} Swin layout (official, timm, mmcv)")
    s = re.escape(src)
    rules = [
        Rule(rf"{s}layers\.\d+\.blocks\.\d+\.(?:attn\.relative_position_index|attn_mask)", None),
        Rule(rf"{s}(?:head(?:\.fc)?|norm)\.(?:weight|bias)", None),
    ]
    if layout == "official":
        rules += [
            Rule(rf"{s}layers\.{i}\.downsample\.(\w+\.\w+)", f"{dst}layers.{i + 1}.downsample.\\1")
            for i in range(3)
        ]
    rules.append(
        Rule(
            rf"{s}(patch_embed\.\w+\.\w+|layers\.\d+\.(?:blocks\.\d+|downsample)\.[\w.]+"
            r"|norm[0-3]\.\w+)",
            f"{dst}\\1",
        )
    )
    return rules


def _unfold_to_official(t: torch.Tensor) -> torch.Tensor:
    """Patch-merging channels from mmcv's ``nn.Unfold`` order (c, dy, dx) to the official / timm
    order ((dx, dy) group, c): reduction weight [out, 4C] or norm parameter [4C]."""
    c = t.shape[-1] // 4
    lead = t.shape[:-1]
    return t.reshape(*lead, c, 4)[..., [0, 2, 1, 3]].transpose(-1, -2).reshape(*lead, 4 * c)


def _mmcv_swin_rules(src: str, dst: str) -> list[Rule]:
    """mmdet/mmseg ``SwinTransformer`` keys -> ``SwinBackbone`` keys.

    ``patch_embed.projection`` -> ``patch_embed.proj``; ``stages.i.blocks.j.attn.w_msa.*`` ->
    ``layers.i.blocks.j.attn.*``; ``ffn.layers.{0.0,1}`` -> ``mlp.fc{1,2}``;
    ``stages.i.downsample`` (end of stage i) -> ``layers.{i+1}.downsample`` with the channels
    reordered from ``nn.Unfold``'s order (the inverse of mmdet/mmseg's ``swin_converter``);
    ``norm0..3`` kept; the ``relative_position_index`` buffers dropped (timm rebuilds them).
    """
    s, wb = re.escape(src), r"(weight|bias)"
    blk, out = rf"{s}stages\.(\d+)\.blocks\.(\d+)\.", rf"{dst}layers.\1.blocks.\2."
    rules = [
        Rule(blk + r"attn\.w_msa\.relative_position_index", None),
        Rule(rf"{s}patch_embed\.projection\.{wb}", rf"{dst}patch_embed.proj.\1"),
        Rule(rf"{s}patch_embed\.norm\.{wb}", rf"{dst}patch_embed.norm.\1"),
        Rule(blk + rf"(norm1|norm2)\.{wb}", out + r"\3.\4"),
        Rule(blk + rf"attn\.w_msa\.(qkv|proj)\.{wb}", out + r"attn.\3.\4"),
        Rule(blk + r"attn\.w_msa\.(relative_position_bias_table)", out + r"attn.\3"),
        Rule(blk + rf"ffn\.layers\.0\.0\.{wb}", out + r"mlp.fc1.\3"),
        Rule(blk + rf"ffn\.layers\.1\.{wb}", out + r"mlp.fc2.\3"),
        Rule(rf"{s}norm([0-3])\.{wb}", rf"{dst}norm\1.\2"),
    ]
    for i in range(3):
        down, new = rf"{s}stages\.{i}\.downsample\.", f"{dst}layers.{i + 1}.downsample."
        rules += [
            Rule(down + r"reduction\.weight", new + "reduction.weight", _unfold_to_official),
            Rule(down + rf"norm\.{wb}", new + r"norm.\1", _unfold_to_official),
        ]
    return rules


def drop_unused_batch_counters(
    state: Mapping[str, torch.Tensor], target: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Drop ``*.num_batches_tracked`` entries that ``target`` (the model's keys) has no slot for
    (Detectron2's ``FrozenBN`` keeps the statistics but no counter)."""
    target = set(target)
    return {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked") or k in target}


#: Parameters an ImageNet classifier does not have, with the value the official detection code
#: starts them from: Swin's per-output LayerNorms (weight 1, bias 0) and the zero-initialised
#: offset conv of a deformable conv (offsets 0 = a plain 3x3 conv).
_INITIAL_VALUES = (
    (re.compile(r".*\.norm[0-3]\.weight"), 1.0),
    (re.compile(r".*\.norm[0-3]\.bias"), 0.0),
    (re.compile(r".*\.conv2_offset\.(weight|bias)"), 0.0),
)


def initial_values(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The ``target`` keys missing from ``state`` that have a fixed initial value in the official
    code (:data:`_INITIAL_VALUES`), filled with it at the model's shape; other missing keys are
    left for the report."""
    out = {}
    for k, v in target.items():
        if k in state:
            continue
        for pattern, value in _INITIAL_VALUES:
            if pattern.fullmatch(k):
                out[k] = torch.full_like(v, value)
                break
    return out
