"""QueryInst's config keys (``MODEL.QUERYINST.*``); defaults are the paper's R50-FPN 1x model."""

from detectron2.config import CfgNode as CN


def finalize_queryinst_config(cfg: CN, fin) -> None:
    """Derive QueryInst's keys at config finalisation (``common.engine.finalize``): the
    deprecated ``MODEL.QUERYINST.NUM_CLASSES`` follows ``MODEL.NUM_CLASSES``; the task must be
    "instance"."""
    if cfg.MODEL.META_ARCHITECTURE not in ("QueryInst", "QueryInstVIS"):
        return
    fin.num_classes_alias("MODEL.QUERYINST.NUM_CLASSES")
    if fin.task != "instance":
        raise ValueError(f"QueryInst segments instances only, but {fin.source('MODEL.TASK')}")


def add_queryinst_config(cfg: CN) -> None:
    """Add ``MODEL.QUERYINST`` to ``cfg`` in place (safe to call twice)."""
    if hasattr(cfg.MODEL, "QUERYINST"):
        return
    cfg.MODEL.QUERYINST = CN()
    q = cfg.MODEL.QUERYINST
    # Deprecated alias of MODEL.NUM_CLASSES (the K thing classes of the sigmoid classifier),
    # written from it at config finalisation; -1 = unset. Set MODEL.NUM_CLASSES instead.
    q.NUM_CLASSES = -1
    # Number of learned proposal boxes / proposal features (queries): 100 or 300.
    q.NUM_PROPOSALS = 100
    # Number of cascaded stages (DIIHead + dynamic mask head each).
    q.NUM_STAGES = 6
    # FPN levels read by the RoI poolers.
    q.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    # Attention heads of the query self-attention.
    q.NUM_HEADS = 8
    # Hidden width of the FFN after the dynamic interaction.
    q.DIM_FEEDFORWARD = 2048
    # Bottleneck width F of every DynamicConv (dynamic_layer outputs 2*C*F values).
    q.DIM_DYNAMIC = 64
    # Dropout of attention, interaction residual and FFN.
    q.DROPOUT = 0.0
    # [Linear, LN, ReLU] blocks before the class / box-delta layers.
    q.NUM_CLS_FCS = 1
    q.NUM_REG_FCS = 3
    # Weights (wx, wy, ww, wh) of Detectron2's Box2BoxTransform (= mmdet stds 0.5, 0.5, 1, 1).
    q.BBOX_REG_WEIGHTS = (2.0, 2.0, 1.0, 1.0)
    # Box RoIAlign side, mask RoIAlign side and sampling ratio; pooler type (ROIAlignV2 = aligned).
    q.BOX_POOLER_RESOLUTION = 7
    q.MASK_POOLER_RESOLUTION = 14
    q.POOLER_SAMPLING_RATIO = 2
    q.POOLER_TYPE = "ROIAlignV2"
    # Convs in the dynamic mask head's stack, their width, and their norm ("BN" official, "GN").
    q.MASK_NUM_CONVS = 4
    q.MASK_CONV_DIM = 256
    q.MASK_NORM = "BN"
    # The paper's mask-head ablations: a dynamic mask head (RoI features modulated by the
    # query; False: a vanilla FCN mask head) and parallel supervision (a mask head and mask
    # loss at every stage; False: at the last stage only).
    q.MASK_DYNAMIC = True
    q.PARALLEL_MASK_SUPERVISION = True
    # Where the dynamic mask head's parameters come from (the paper's query-sharing ablation):
    # "shared" (the paper's): the box head's post-self-attention query of the same stage;
    # "own_msa": the same stage input query through the mask branch's own self-attention + LN;
    # "separate": a learnable query set of the mask branch's own (not the detection queries)
    # through its own self-attention + LN per stage.
    q.MASK_QUERY = "shared"
    # Initialisation of the FPN's lateral and output convs: "xavier_uniform" (mmdet's FPN
    # ``init_cfg``, the reference's, zero bias) or "c2_xavier" (Detectron2's FPN as it builds
    # itself: ``c2_xavier_fill``). The `shapes` config trains from scratch with "c2_xavier"
    # (README, deliberate difference 12).
    q.FPN_INIT = "xavier_uniform"
    # Matcher cost weights: sigmoid focal class, L1 on normalised xyxy boxes, GIoU.
    q.COST_CLASS = 2.0
    q.COST_L1 = 5.0
    q.COST_GIOU = 2.0
    # Loss weights: sigmoid focal class, L1 (normalised boxes), GIoU, dice on 28x28 RoI masks.
    q.CLASS_WEIGHT = 2.0
    q.L1_WEIGHT = 5.0
    q.GIOU_WEIGHT = 2.0
    q.MASK_WEIGHT = 8.0
    # Focal loss / focal cost alpha and gamma.
    q.FOCAL_ALPHA = 0.25
    q.FOCAL_GAMMA = 2.0
    # Epsilon of the squared-denominator dice loss on the masks.
    q.DICE_EPS = 1e-5
    # Loss weight of each stage (length NUM_STAGES; empty = all 1.0).
    q.STAGE_LOSS_WEIGHTS = []
    # Probability threshold of the pasted masks at inference.
    q.MASK_THRESHOLD = 0.5

    # ---- online video instance segmentation (QueryInstVIS, queryinst/vis.py) --------------
    q.VIS = CN()
    # Width of the association embedding the tracking head computes from each query.
    q.VIS.EMBED_DIM = 256
    # Hidden [Linear, ReLU] layers of the tracking head before its output layer.
    q.VIS.NUM_FCS = 1
    # Weight of the association loss (MaskTrack R-CNN's cross-entropy over "new" + the
    # previous frame's matched queries).
    q.VIS.TRACK_WEIGHT = 1.0
    # A query is a detection of a frame when its best class score reaches this.
    q.VIS.SCORE_THRESH = 0.05
    # Association score = log softmax(embedding similarity) + DET_SCORE * log(score) +
    # IOU * box IoU + LABEL * [same class] (MaskTrack R-CNN's cues and mmtracking's weights).
    q.VIS.MATCH_DET_SCORE_WEIGHT = 1.0
    q.VIS.MATCH_IOU_WEIGHT = 2.0
    q.VIS.MATCH_LABEL_WEIGHT = 10.0
