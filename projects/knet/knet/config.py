"""K-Net's config keys (``MODEL.KNET.*``); the only place that writes them."""

from detectron2.config import CfgNode as CN


def finalize_knet_config(cfg: CN, fin) -> None:
    """Derive K-Net's keys at config finalisation (``common.engine.finalize``).

    ``KNet``: the deprecated ``MODEL.KNET.TASK`` follows ``MODEL.TASK`` (instance or panoptic);
    ``NUM_THING_CLASSES`` / ``NUM_STUFF_CLASSES`` split ``MODEL.NUM_CLASSES`` (both set and
    ``MODEL.NUM_CLASSES`` unset: their sum). ``KNetSemantic``: the deprecated
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` follows ``MODEL.NUM_CLASSES``; the task is semantic.
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "KNetSemantic":
        fin.num_classes_alias("MODEL.SEM_SEG_HEAD.NUM_CLASSES")
        if fin.task != "semantic":
            raise ValueError(f"KNetSemantic is semantic only, but {fin.source('MODEL.TASK')}")
        return
    if arch != "KNet":
        return
    fin.alias("MODEL.KNET.TASK", "MODEL.TASK")
    fin.resolve_num_classes()  # the task may have come from the alias
    if fin.task not in ("instance", "panoptic"):
        raise ValueError(
            f"KNet segments instances or panoptic segments, but {fin.source('MODEL.TASK')} "
            "(semantic: META_ARCHITECTURE KNetSemantic)"
        )
    k = cfg.MODEL.KNET
    if fin.task == "instance":
        fin.num_classes_alias("MODEL.KNET.NUM_THING_CLASSES")
        fin.derive("MODEL.KNET.NUM_STUFF_CLASSES", 0, "MODEL.TASK", agrees=lambda v: True)
        return
    name, things, total = fin.metadata_counts() or (None, 0, 0)
    if fin.is_explicit("MODEL.KNET.NUM_THING_CLASSES"):
        if things and k.NUM_THING_CLASSES != things:
            raise ValueError(
                f"MODEL.KNET.NUM_THING_CLASSES={k.NUM_THING_CLASSES} but dataset {name!r} has "
                f"{things} thing_classes"
            )
    elif things:
        k.NUM_THING_CLASSES = things
    else:
        raise ValueError(
            "K-Net panoptic needs the thing classes: the training set's metadata lists none, "
            "set MODEL.KNET.NUM_THING_CLASSES"
        )
    if fin.is_explicit("MODEL.KNET.NUM_STUFF_CLASSES"):
        if things and total and k.NUM_STUFF_CLASSES != total - things:
            raise ValueError(
                f"MODEL.KNET.NUM_STUFF_CLASSES={k.NUM_STUFF_CLASSES} but dataset {name!r} has "
                f"{total - things} stuff classes"
            )
        total_given = k.NUM_THING_CLASSES + k.NUM_STUFF_CLASSES
        if cfg.MODEL.NUM_CLASSES < 0:
            cfg.MODEL.NUM_CLASSES = total_given
            fin.sources["MODEL.NUM_CLASSES"] = "MODEL.KNET.NUM_THING_CLASSES + NUM_STUFF_CLASSES"
        elif cfg.MODEL.NUM_CLASSES != total_given:
            raise ValueError(
                f"MODEL.KNET.NUM_THING_CLASSES + NUM_STUFF_CLASSES = {total_given} contradicts "
                f"{fin.source('MODEL.NUM_CLASSES')}; set only MODEL.NUM_CLASSES"
            )
    elif cfg.MODEL.NUM_CLASSES >= 0:
        k.NUM_STUFF_CLASSES = cfg.MODEL.NUM_CLASSES - k.NUM_THING_CLASSES
    if k.NUM_STUFF_CLASSES < 0:
        raise ValueError(
            f"{fin.source('MODEL.NUM_CLASSES')} is fewer than "
            f"MODEL.KNET.NUM_THING_CLASSES={k.NUM_THING_CLASSES}"
        )


def add_knet_config(cfg: CN) -> None:
    """Add ``MODEL.KNET`` to a Detectron2 config, in place (defaults = the official R50 configs).

    Safe to call twice.
    """
    if hasattr(cfg.MODEL, "KNET"):
        return
    cfg.MODEL.KNET = CN()
    k = cfg.MODEL.KNET
    # Deprecated alias of MODEL.TASK ("instance": 100 learned kernels; "panoptic": + one stuff
    # kernel per stuff class; "" = unset). Set MODEL.TASK, or let the dataset decide.
    k.TASK = ""
    # The thing / stuff split of MODEL.NUM_CLASSES, derived at config finalisation
    # (finalize_knet_config): things from the training set's metadata (instance: all classes),
    # stuff = MODEL.NUM_CLASSES - things (0 for instance). -1 = derive; a set value must agree.
    k.NUM_THING_CLASSES = -1
    k.NUM_STUFF_CLASSES = -1
    # Backbone maps fed to the FPN neck (P2..P5), finest first (strides 4..32).
    k.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # The neck between backbone and stage-0 head: "FPN" (K-Net's: mmdet FPN on IN_FEATURES,
    # HIDDEN_DIM channels) or a pixel decoder of SEM_SEG_HEADS_REGISTRY that declares
    # output_strides (common.modeling.neck): "QSMSDeformAttnPixelDecoder" (strides 4-32, 4
    # levels), FastInst's PPM-FPN "PyramidPoolingModuleFPN" / "BaseFPN" (common.modeling.ppm_fpn;
    # its IN_FEATURES' strides; with res3-res5 set NECK_OUT_LEVEL 0, POS_ENCODING_LEVEL 2). The
    # decoder reads its own MODEL.SEM_SEG_HEAD.* keys; its width (CONVS_DIM, MASK_DIM) must be
    # HIDDEN_DIM.
    k.NECK = "FPN"
    # Number of learned (thing) kernels N.
    k.NUM_PROPOSALS = 100
    # Number of kernel update heads S (iterations after the stage-0 kernels).
    k.NUM_STAGES = 3
    # Channels C of the FPN, the kernels and the feature map the heads read.
    k.HIDDEN_DIM = 256
    # Spatial size K of every kernel (1 in all released configs).
    k.CONV_KERNEL_SIZE = 1
    # Normalization of the semantic-FPN neck and the stage-0 loc/seg convs ("GN" = GN(32)).
    k.NECK_NORM = "GN"
    # Index of the input level that gets the sine positional encoding (-1: none).
    k.POS_ENCODING_LEVEL = 3
    # Index of the input level whose stride is the neck's output stride (1 = P3, stride 8).
    k.NECK_OUT_LEVEL = 1
    # Std of the normal init of the stage-0 kernels (init_kernels).
    k.KERNEL_INIT_STD = 1.0
    # The paper's component ablation (its Table 2a): False drops the gates of the adaptive
    # kernel update (new kernel = LN(F) + LN(K)) / the kernel interaction (self-attention).
    k.ADAPTIVE_KERNEL_UPDATE = True
    k.KERNEL_INTERACTION = True
    # Attention heads of the kernel interaction (multi-head self-attention over kernels).
    k.NUM_HEADS = 8
    # Hidden width of the FFN after kernel interaction.
    k.FEEDFORWARD_DIM = 2048
    # Dropout of attention and FFN.
    k.DROPOUT = 0.0
    # Linear-LN-ReLU layers before the classifier.
    k.NUM_CLS_FCS = 1
    # Linear-LN-ReLU layers before fc_mask (the dynamic mask kernel).
    k.NUM_MASK_FCS = 1
    # in = feat = out channels of the kernel updator (kernels wider than this are processed
    # in chunks of this size, as the official semantic configs do with 512-d kernels).
    k.UPDATOR_DIM = 256
    # Threshold of the hard (binary) mask used for group feature assembling.
    k.HARD_MASK_THR = 0.5
    # Upsampling of stage mask logits before losses/inference (2: stride 8 -> stride 4).
    k.MASK_UPSAMPLE_STRIDE = 2
    # Targets and matching resolution: padded input size / MASK_ASSIGN_STRIDE.
    k.MASK_ASSIGN_STRIDE = 4
    # One loss weight per kernel update head.
    k.STAGE_LOSS_WEIGHTS = [1.0, 1.0, 1.0]
    # Matching costs (mmdet FocalLossCost / DiceCost / MaskCost weights).
    k.COST_CLASS = 2.0
    k.COST_DICE = 4.0
    k.COST_MASK = 1.0
    # Loss weights: sigmoid focal classification, BCE mask, dice, rank (panoptic) and the
    # stage-0 semantic (focal) loss.
    k.CLASS_WEIGHT = 2.0
    k.MASK_WEIGHT = 1.0
    k.DICE_WEIGHT = 4.0
    k.RANK_WEIGHT = 0.1
    k.SEG_WEIGHT = 1.0
    # Focal loss/cost parameters.
    k.FOCAL_ALPHA = 0.25
    k.FOCAL_GAMMA = 2.0

    # ---- inference ----------------------------------------------------------------------
    k.TEST = CN()
    # Instance output: top-k over (kernel, class) scores.
    k.TEST.MAX_PER_IMAGE = 100
    # Threshold of the sigmoid masks (instance output and panoptic "original area").
    k.TEST.MASK_THR = 0.5
    # Panoptic merge: things scoring below this are dropped.
    k.TEST.INSTANCE_SCORE_THR = 0.3
    # Panoptic merge: keep a segment if (pixels it wins) / (pixels of its mask) >= this.
    k.TEST.OVERLAP_THR = 0.6

    # ---- the semantic variant (meta-arch KNetSemantic) ----------------------------------
    k.SEMANTIC = CN()
    # Base decode head that makes the class kernels: "FCN" | "PSP" | "ASPP" | "UPER".
    k.SEMANTIC.DECODE_HEAD = "FCN"
    # Backbone features the decode head reads (one for FCN/PSP/ASPP, four for UPerNet).
    k.SEMANTIC.IN_FEATURES = ["res5"]
    # Channels of the decode head output = channels of the class kernels.
    k.SEMANTIC.CHANNELS = 512
    # Norm of the decode and auxiliary heads ("SyncBN" as mmseg; "BN", "GN", ...).
    k.SEMANTIC.NORM = "SyncBN"
    # Dropout before the decode head's classifier (conv_seg).
    k.SEMANTIC.DROPOUT = 0.1
    # FCN head: number of 3x3 convs and whether their output is concatenated with the input.
    k.SEMANTIC.FCN_NUM_CONVS = 2
    k.SEMANTIC.FCN_CONCAT_INPUT = True
    # PSP and UPerNet pooling scales.
    k.SEMANTIC.POOL_SCALES = [1, 2, 3, 6]
    # ASPP dilations.
    k.SEMANTIC.ASPP_DILATIONS = [1, 12, 24, 36]
    # Auxiliary FCN head (one 3x3 conv) on this feature; "" disables it.
    k.SEMANTIC.AUX_IN_FEATURE = "res4"
    k.SEMANTIC.AUX_CHANNELS = 256
    k.SEMANTIC.AUX_WEIGHT = 0.4
    # CE weight of every stage's logits (initial decode head + each kernel update head).
    k.SEMANTIC.LOSS_WEIGHT = 1.0
