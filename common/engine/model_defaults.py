"""Config keys of the shared modeling parts: backbone variants, Swin, MSDeformAttn pixel decoder.

``add_model_config`` is called from ``common.engine.defaults.add_common_config``; it only adds keys
that Detectron2's defaults do not have, and never changes Detectron2's own defaults.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_model_config"]


def add_model_config(cfg: CN) -> None:
    """Add the shared modeling keys to a Detectron2 config, in place. Safe to call twice (no-op)."""
    if "MSDA_PIXEL_DECODER" in cfg.MODEL:
        return
    # ---- ResNet variants (build_resnet_vd_backbone) --------------------------------------
    r = cfg.MODEL.RESNETS
    r.DEEP_STEM = False  # ResNet-C stem: three 3x3 convs (C/2, C/2, C) instead of one 7x7
    r.AVG_DOWN = False  # ResNet-D shortcut: AvgPool(stride) then a stride-1 1x1 conv
    r.RES4_DILATION = 1  # 2 with RES5_DILATION 4 gives output stride 8 ("D8")
    r.CONTRACT_DILATION = False  # first block of a dilated stage uses half the dilation (mmseg)

    # ---- Swin Transformer (build_swin_backbone / build_swin_fpn_backbone); Swin-T defaults ----
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224  # image size of the pretrained weights
    cfg.MODEL.SWIN.PATCH_SIZE = 4  # patch embedding stride
    cfg.MODEL.SWIN.EMBED_DIM = 96  # res2 channels C (T/S 96, B 128, L 192)
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]  # blocks per stage (S/B/L [2, 2, 18, 2])
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]  # heads per stage (B [4,8,16,32], L [6,12,24,48])
    cfg.MODEL.SWIN.WINDOW_SIZE = 7  # attention window, tokens per side
    cfg.MODEL.SWIN.MLP_RATIO = 4.0  # MLP hidden width / channels
    cfg.MODEL.SWIN.QKV_BIAS = True  # bias in the qkv projection
    cfg.MODEL.SWIN.DROP_RATE = 0.0  # dropout after attention projection and MLP
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0  # dropout on attention probabilities
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3  # stochastic depth, linear over all blocks
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # returned stages
    cfg.MODEL.SWIN.USE_CHECKPOINT = False  # activation checkpointing per block (saves memory)

    # ---- MSDeformAttn pixel decoder (QSMSDeformAttnPixelDecoder) -------------------------
    # Also read: SEM_SEG_HEAD.IN_FEATURES (all levels it uses, e.g. res2..res5),
    # SEM_SEG_HEAD.CONVS_DIM, SEM_SEG_HEAD.NORM and SEM_SEG_HEAD.COMMON_STRIDE (Detectron2 keys).
    h = cfg.MODEL.SEM_SEG_HEAD
    h.MASK_DIM = 256  # channels of mask_features (Mask2Former name)
    # Levels that go through the deformable-attention encoder (Mask2Former name); the finer
    # levels of IN_FEATURES are merged in by an FPN down to COMMON_STRIDE.
    h.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    h.TRANSFORMER_ENC_LAYERS = 6  # encoder layers (Mask2Former name)
    cfg.MODEL.MSDA_PIXEL_DECODER = CN()
    cfg.MODEL.MSDA_PIXEL_DECODER.NHEADS = 8  # attention heads
    cfg.MODEL.MSDA_PIXEL_DECODER.NUM_POINTS = 4  # sampling points per head and level
    cfg.MODEL.MSDA_PIXEL_DECODER.DIM_FEEDFORWARD = 1024  # encoder FFN width
    cfg.MODEL.MSDA_PIXEL_DECODER.DROPOUT = 0.0  # encoder dropout
