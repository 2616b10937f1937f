"""Config keys of EmbedMask (``MODEL.EMBEDMASK.*``) and of its FCOS detector (``MODEL.FCOS.*``).

Defaults reproduce the official maskrcnn-benchmark EmbedMask v2 (yinghdb/EmbedMask e9d6142) on
FCOS as both official codebases configure it; see projects/embedmask/README.md for the variants.
"""

from detectron2.config import CfgNode as CN


def finalize_embedmask_config(cfg: CN, fin) -> None:
    """Derive EmbedMask's keys at config finalisation (``common.engine.finalize``): the
    deprecated ``MODEL.FCOS.NUM_CLASSES`` follows ``MODEL.NUM_CLASSES``; the task must be
    "instance"."""
    if cfg.MODEL.META_ARCHITECTURE != "EmbedMask":
        return
    fin.num_classes_alias("MODEL.FCOS.NUM_CLASSES")
    if fin.task != "instance":
        raise ValueError(f"EmbedMask segments instances only, but {fin.source('MODEL.TASK')}")


def add_fcos_config(cfg: CN) -> None:
    """Add ``MODEL.FCOS.*`` (the FCOS detector of :mod:`embedmask.fcos`), in place."""
    if hasattr(cfg.MODEL, "FCOS"):
        return
    cfg.MODEL.FCOS = CN()
    # Deprecated alias of MODEL.NUM_CLASSES (the foreground classes, no background column),
    # written from it at config finalisation; -1 = unset. Set MODEL.NUM_CLASSES instead.
    cfg.MODEL.FCOS.NUM_CLASSES = -1
    # FPN levels the head runs on, finest first, and their strides.
    cfg.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.FCOS.FPN_STRIDES = [8, 16, 32, 64, 128]
    # Number of extra FPN levels above p5 made by the backbone's top block (P6, P7 from P5).
    cfg.MODEL.FCOS.TOP_LEVELS = 2
    # Depth of the classification and box towers (Conv3x3 + norm + ReLU each).
    cfg.MODEL.FCOS.NUM_CONVS = 4
    # Norm in the towers: "GN" (32 groups), "" for none, or any detectron2 get_norm name.
    cfg.MODEL.FCOS.NORM = "GN"
    # Prior foreground probability for the classification bias (-log((1-p)/p)).
    cfg.MODEL.FCOS.PRIOR_PROB = 0.01
    # Boundaries of the per-level ranges of max(l, t, r, b): [-1, 64], [64, 128], ..., [512, inf).
    cfg.MODEL.FCOS.SIZES_OF_INTEREST = [64, 128, 256, 512]
    # Centre sampling radius in units of the level stride; 0 disables centre sampling.
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    # A location is positive only if it also lies inside the GT mask (EmbedMask v1/v2: True).
    cfg.MODEL.FCOS.SAMPLE_IN_MASK = True
    # Sigmoid focal loss alpha and gamma of the classification loss.
    cfg.MODEL.FCOS.LOSS_ALPHA = 0.25
    cfg.MODEL.FCOS.LOSS_GAMMA = 2.0
    # Inference: score threshold, candidates per level before NMS, class-wise NMS IoU (the number
    # of detections kept per image is TEST.DETECTIONS_PER_IMAGE, 100 for COCO).
    cfg.MODEL.FCOS.INFERENCE_TH = 0.05
    cfg.MODEL.FCOS.PRE_NMS_TOPK = 1000
    cfg.MODEL.FCOS.NMS_TH = 0.6
    # Apply INFERENCE_TH to cls * centerness instead of cls alone (AdelaiDet: True).
    cfg.MODEL.FCOS.THRESH_WITH_CTR = False
    # Box convention: "maskrcnn-benchmark" (official v2: inclusive pixel boxes, GT x2 = x + w - 1;
    # clip to size - 1, "+1" NMS widths, ties at the last kept score kept) or "detectron2".
    cfg.MODEL.FCOS.BOX_CONVENTION = "maskrcnn-benchmark"
    # GIoU loss with the IoU smoothed as (I + s) / (U + s) (FCOS IOULoss: 1); 0: plain GIoU.
    cfg.MODEL.FCOS.IOU_LOSS_SMOOTH = 1.0


def add_embedmask_config(cfg: CN) -> None:
    """Add ``MODEL.EMBEDMASK.*`` (and ``MODEL.FCOS.*``) to a Detectron2 config, in place."""
    add_fcos_config(cfg)
    if hasattr(cfg.MODEL, "EMBEDMASK"):
        return
    cfg.MODEL.EMBEDMASK = CN()
    # Embedding length D; the first 2 dims are the "spatial" ones that get pixel coordinates.
    cfg.MODEL.EMBEDMASK.EMBED_DIM = 16
    # Depth of the pixel-embedding tower on P3 (Conv3x3 256 + GN + ReLU each).
    cfg.MODEL.EMBEDMASK.MASK_NUM_CONVS = 4
    # Pixel embeddings are bilinearly upsampled by this factor (2: stride 8 -> stride 4).
    cfg.MODEL.EMBEDMASK.MASK_SCALE_FACTOR = 2
    # Input pixels per unit of the coordinates added to the spatial embedding dims (v2: 100).
    cfg.MODEL.EMBEDMASK.POSITION_UNIT = 100.0
    # Margin at which the initial probability is 0.5 along one dim; sets the margin bias init.
    cfg.MODEL.EMBEDMASK.PRIOR_MARGIN = 2.0
    # The box-tower features are divided by this before the margin conv.
    cfg.MODEL.EMBEDMASK.MARGIN_REDUCE_FACTOR = 32.0
    # One margin (precision) per embedding dim (v2); False: one scalar margin per proposal.
    cfg.MODEL.EMBEDMASK.MARGIN_PER_DIM = True
    # Replace every learned margin by the prior (ablation "fixed sigma").
    cfg.MODEL.EMBEDMASK.FIX_MARGIN = False
    # Proposals that represent a GT in the mask loss: "best" (v2: highest predicted-box IoU),
    # "iou_mean" (paper/v1: mean over positives with IoU > SAMPLE_POS_IOU_TH), "all" (AdelaiDet).
    cfg.MODEL.EMBEDMASK.POSITIVE_SAMPLING = "best"
    # IoU threshold of "iou_mean" sampling.
    cfg.MODEL.EMBEDMASK.SAMPLE_POS_IOU_TH = 0.5
    # Random cap on proposals per image for "all" sampling.
    cfg.MODEL.EMBEDMASK.MAX_PROPOSALS = 500
    # Mask loss only inside the GT box enlarged by this ratio per side; < 0: whole image (v2).
    cfg.MODEL.EMBEDMASK.BOX_PADDING = -1.0
    # Weight of the Lovasz-hinge mask loss.
    cfg.MODEL.EMBEDMASK.LOSS_MASK_ALPHA = 0.5
    # Weight of the smooth loss (paper/v1: 0.1 with "iou_mean"); 0 disables it.
    cfg.MODEL.EMBEDMASK.LOSS_SMOOTH_ALPHA = 0.0
    # Inference: a pixel is foreground where the mask probability exceeds this.
    cfg.MODEL.EMBEDMASK.MASK_TH = 0.53
    # Inference: compute masks only inside the detected box + 2 px at stride 4 (v2 CUDA op).
    cfg.MODEL.EMBEDMASK.MASK_BOX_CROP = True
    # Inference: masks to the output size. "padded" (v2 COCO evaluator): bilinear resize of the
    # padded stride-4 grid to ceil(grid * stride * out / in), then crop; "exact": one bilinear
    # sampling at the exact position of every output pixel.
    cfg.MODEL.EMBEDMASK.MASK_RESIZE = "padded"
