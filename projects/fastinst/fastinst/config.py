"""FastInst config keys: ``add_fastinst_config`` writes ``MODEL.FASTINST.*`` (and, only when no
other package has added them, the two ``MODEL.SEM_SEG_HEAD`` keys a Mask2Former-style head needs).

Defaults are the official base config (``Fast-COCO-InstanceSegmentation.yaml``, FastInst-D1) except
that every default names a class that exists (the official defaults ``FastInstEncoderV1`` /
``FastInstDecoderV4`` do not).
"""

from detectron2.config import CfgNode as CN

# MODEL.TASK -> (INSTANCE_ON, SEMANTIC_ON, PANOPTIC_ON) derived, and which of them a config may
# set otherwise (the panoptic model may also output instances and sem_seg).
_OUTPUTS = {
    "instance": ((True, False, False), (False, False, False)),
    "panoptic": ((True, False, True), (True, True, False)),
    "semantic": ((False, True, False), (False, False, False)),
}


def finalize_fastinst_config(cfg: CN, fin) -> None:
    """Derive FastInst's keys at config finalisation (``common.engine.finalize``): the
    deprecated ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` and ``MODEL.FASTINST.SIZE_DIVISIBILITY``
    follow ``MODEL.NUM_CLASSES`` and ``INPUT.SIZE_DIVISIBILITY``, the ``TEST.*_ON`` outputs
    follow ``MODEL.TASK``."""
    if cfg.MODEL.META_ARCHITECTURE != "FastInst":
        return
    fin.num_classes_alias("MODEL.SEM_SEG_HEAD.NUM_CLASSES")
    fin.alias("MODEL.FASTINST.SIZE_DIVISIBILITY", "INPUT.SIZE_DIVISIBILITY")
    values, free = _OUTPUTS[fin.task]
    for name, value, optional in zip(("INSTANCE_ON", "SEMANTIC_ON", "PANOPTIC_ON"), values, free):
        fin.derive(
            f"MODEL.FASTINST.TEST.{name}",
            value,
            "MODEL.TASK",
            agrees=(lambda v: True) if optional else None,
        )


def add_fastinst_config(cfg: CN) -> None:
    """Add FastInst's keys to ``cfg`` in place. Safe to call twice."""
    if hasattr(cfg.MODEL, "FASTINST"):
        return
    # Mask2Former-style head keys, shared with any other pixel-decoder user: set only if absent.
    if not hasattr(cfg.MODEL.SEM_SEG_HEAD, "PIXEL_DECODER_NAME"):
        # pixel decoder (SEM_SEG_HEADS_REGISTRY): PyramidPoolingModuleFPN | BaseFPN | a shared one
        cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "PyramidPoolingModuleFPN"
    if not hasattr(cfg.MODEL.SEM_SEG_HEAD, "MASK_DIM"):
        cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256  # channels of mask embeddings / pixel mask features

    f = cfg.MODEL.FASTINST = CN()
    # ---- transformer decoder -------------------------------------------------------------
    f.DEC_LAYERS = 1  # dual-path decoder layers: 1 = FastInst-D1, 3 = FastInst-D3
    f.HIDDEN_DIM = 256  # query / pixel feature width
    f.NHEADS = 8  # attention heads
    f.DIM_FEEDFORWARD = 1024  # FFN hidden width
    f.DROPOUT = 0.0  # attention/FFN dropout (the official code hard-codes 0)
    f.PRE_NORM = False  # pre-LayerNorm blocks instead of post-norm
    f.NUM_OBJECT_QUERIES = 100  # instance-activation-guided (IA) queries N_a (top-k of E4)
    f.NUM_AUX_QUERIES = 8  # auxiliary learnable queries (attention only, no predictions)
    f.POS_EMBED = "learnable"  # "learnable" (meta_pos_embed, resized) | "sine" (DETR sine)
    f.POS_EMBED_GRID = 0  # learnable PE grid side; 0 = round(sqrt(NUM_OBJECT_QUERIES)), official
    f.GT_MASK_GUIDED = True  # GT-mask-guided learning: re-run each layer with matched GT masks
    f.DEEP_SUPERVISION = True  # losses on every layer's and the GT-guided passes' predictions
    # The paper's ablations: query type "ia_guided" (instance-activation-guided, the paper's)
    # | "learned" (N_a static learnable queries: no proposal head, no location cost/proposal
    # loss); the +1 priority of local maxima in IA query selection; the dual-path decoder
    # (False: single path, the pixel features are not updated by the decoder layers).
    f.QUERY_TYPE = "ia_guided"
    f.LOCAL_MAXIMUM = True
    f.DUAL_PATH = True
    # ---- matcher and loss ----------------------------------------------------------------
    f.CLASS_WEIGHT = 2.0  # softmax class cost and cross-entropy loss weight
    f.MASK_WEIGHT = 5.0  # point-sampled mask BCE cost / loss weight
    f.DICE_WEIGHT = 5.0  # point-sampled dice cost / loss weight
    f.LOCATION_WEIGHT = 1000.0  # location cost: a query may only match objects containing it
    f.PROPOSAL_WEIGHT = 20.0  # IA-query proposal (dense E4 classification) loss weight
    f.NO_OBJECT_WEIGHT = 0.1  # cross-entropy weight of the no-object class
    f.TRAIN_NUM_POINTS = 112 * 112  # points for the mask costs and point-sampled mask losses
    f.OVERSAMPLE_RATIO = 3.0  # PointRend oversampling of candidate points (losses)
    f.IMPORTANCE_SAMPLE_RATIO = 0.75  # share of most-uncertain points (losses)
    # ---- input ---------------------------------------------------------------------------
    # deprecated alias of INPUT.SIZE_DIVISIBILITY (the shared padding policy); -1 = unset
    f.SIZE_DIVISIBILITY = -1
    # ---- inference (Mask2Former-style) ---------------------------------------------------
    # The three outputs follow MODEL.TASK at config finalisation (finalize_fastinst_config)
    # unless a config sets them: the task's own output is on; panoptic may add instances
    # (on by default) and sem_seg; the others are off.
    f.TEST = CN()
    f.TEST.INSTANCE_ON = True  # output "instances" (scores x mask scores, top-k, no NMS)
    f.TEST.SEMANTIC_ON = False  # output "sem_seg" (sum of class prob x mask prob)
    f.TEST.PANOPTIC_ON = False  # output "panoptic_seg"
    f.TEST.OBJECT_MASK_THRESHOLD = 0.8  # panoptic: keep queries with class score above this
    f.TEST.OVERLAP_THRESHOLD = 0.8  # panoptic: drop segments keeping less of their mask
    f.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False  # resize masks before semantic merge
