"""Config keys shared by every QuerySeg method.

``add_common_config`` is the only writer of shared keys (solver, input, mapper, evaluation and the
built-in ``shapes`` dataset). Project packages add only their own ``MODEL.<P>.*`` namespace.
"""

from detectron2.config import CfgNode as CN

from common.engine.model_defaults import add_model_config


def add_common_config(cfg: CN) -> None:
    """Add QuerySeg's shared keys to a Detectron2 config, in place. Safe to call twice."""
    if hasattr(cfg, "QUERYSEG_COMMON"):
        return
    cfg.QUERYSEG_COMMON = True  # marker: common keys present
    # ---- no silent no-ops (common.engine.config_guard) -----------------------------------
    cfg.QUERYSEG = CN()
    # A key set in the config chain or on the command line that another project owns
    # (MODEL.FASTINST.* in a K-Net run) or that nothing in the built model, data pipeline or
    # trainer reads is an error before training/evaluation starts; True: only a warning
    # (train_net.py --allow-unused-keys sets it).
    cfg.QUERYSEG.ALLOW_UNUSED_KEYS = False
    add_model_config(cfg)  # backbone variants (ResNet-vd/D8, Swin) and the MSDeformAttn decoder

    # ---- the task and the class count, stated once (common.engine.finalize) ------------
    # What the model segments: "instance" | "panoptic" | "semantic"; "" derives it from the
    # evaluator_type of DATASETS.TRAIN[0] (else TEST[0]). INPUT.DATASET_MAPPER_NAME,
    # TEST.EVAL_TASKS and each model's output flags are derived from it unless a config sets
    # them, and a value that contradicts it is an error naming both keys.
    cfg.MODEL.TASK = ""
    # Classes the model predicts (instance: thing classes; panoptic: thing + stuff; semantic:
    # every class). -1 derives it from DATASETS.TRAIN[0]'s metadata; a set value must agree with
    # it. The methods' old keys (MODEL.SEM_SEG_HEAD.NUM_CLASSES for FastInst / K-Net semantic,
    # MODEL.QUERYINST.NUM_CLASSES, MODEL.FCOS.NUM_CLASSES, MODEL.KNET.NUM_THING_CLASSES /
    # NUM_STUFF_CLASSES) are deprecated aliases, written from this one. Detectron2's own models
    # (Mask R-CNN, Panoptic FPN) keep reading Detectron2's keys.
    cfg.MODEL.NUM_CLASSES = -1

    # ---- checkpoints (common.engine.checkpoint.QSCheckpointer) ----------------------------
    # Refuse MODEL.WEIGHTS that do not fit the model (another meta-architecture, missing or
    # unexpected keys, wrong shapes) instead of loading what fits. False: Detectron2's behaviour
    # (warn and continue), e.g. to fine-tune a checkpoint with another number of classes.
    cfg.MODEL.WEIGHTS_STRICT = True
    # Load checkpoints with full pickle instead of weights_only (only for files you trust).
    cfg.MODEL.WEIGHTS_TRUSTED = False

    # ---- the shared Hungarian matcher (common.modeling.matcher.costs_from_config) --------
    cfg.MODEL.MATCHER = CN()
    # The cost terms of every method that matches with it (K-Net, FastInst, QueryInst), as
    # registered names with weights: "name:weight" or "name:weight:arg=value,..." (names in
    # common.modeling.costs.COST_TERMS, e.g. "focal_class:2", "dice_sq:4",
    # "mask_agreement:1", "point_bce:5", "point_dice:5", "softmax_class:2", "box_l1:5",
    # "giou:2", "location:1000"). Empty: the method's own terms, weighted by its
    # MODEL.<METHOD>.COST_* / *_WEIGHT keys (when set, those keys are not read).
    cfg.MODEL.MATCHER.COSTS = []

    # ---- inference fast path (common.modeling.fast_inference, docs/benchmark.md "Runtimes") --
    # Inference only: fold frozen BatchNorm into the convolutions, channels-last memory format,
    # oneDNN convolutions, inference_mode, and method-specific post-processing of only the
    # selected queries (same results). Applied after the weights are loaded (demo --fast,
    # benchmark --runtime fast, train_net.py --eval-only); training ignores it.
    cfg.MODEL.FAST_INFERENCE = False

    # ---- data pipeline -------------------------------------------------------------------
    # Name of the training dataset mapper in common.data.MAPPER_REGISTRY:
    # "instance" | "panoptic" | "semantic" | "detectron2" (Detectron2's own DatasetMapper).
    # Derived from MODEL.TASK (the mapper of that name) unless a config sets it; "detectron2"
    # (or another registered mapper) may serve any task.
    cfg.INPUT.DATASET_MAPPER_NAME = "instance"
    # Large-scale jitter (Copy-Paste/LSJ style): resize to IMAGE_SIZE * U(MIN_SCALE, MAX_SCALE),
    # then crop/pad to IMAGE_SIZE. Replaces the ResizeShortestEdge + crop chain when enabled.
    cfg.INPUT.LSJ = CN()
    cfg.INPUT.LSJ.ENABLED = False
    cfg.INPUT.LSJ.IMAGE_SIZE = 1024
    cfg.INPUT.LSJ.MIN_SCALE = 0.1
    cfg.INPUT.LSJ.MAX_SCALE = 2.0
    # DETR-style crop augmentation: with probability PROB, resize the short side to one of
    # SHORT_EDGES, crop with INPUT.CROP, then apply the normal multi-scale resize (QueryInst 3x,
    # FastInst). When PROB is 0 the plain INPUT.CROP setting applies.
    cfg.INPUT.DETR_CROP = CN()
    cfg.INPUT.DETR_CROP.PROB = 0.0
    cfg.INPUT.DETR_CROP.SHORT_EDGES = (400, 500, 600)
    # Semantic crops: re-draw a crop (up to 10 times) while one category covers more than this
    # fraction of it (mmseg's cat_max_ratio; 1.0 disables the constraint).
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Colour augmentation (photometric distortion, as mmseg's ADE20K pipelines use).
    cfg.INPUT.COLOR_AUG_SSD = False
    # The padding policy (common.modeling.meta_arch.padding_multiples): every model pads its
    # batch to a multiple of max(the backbone's multiple, this); -1 = the backbone's alone.
    # The backbone's multiple is its size_divisibility, else its coarsest output stride.
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # The same at test time; -1 = INPUT.SIZE_DIVISIBILITY (e.g. 32 where training pads to the
    # crop size, as K-Net's semantic configs do).
    cfg.INPUT.SIZE_DIVISIBILITY_TEST = -1
    # Drop instances smaller than this many pixels after augmentation.
    cfg.INPUT.MIN_INSTANCE_AREA = 1

    # ---- evaluation ----------------------------------------------------------------------
    # What the model outputs, used by the evaluator factory (common.data.evaluation):
    # any of "segm", "bbox", "panoptic_seg", "sem_seg". Derived from MODEL.TASK (instance:
    # segm + bbox, panoptic: panoptic_seg, semantic: sem_seg) unless a config sets it; a set
    # value must hold the task's output and nothing the task cannot produce.
    cfg.TEST.EVAL_TASKS = ("segm", "bbox")
    # Multi-scale + flip testing of semantic models (common.modeling.sem_seg_tta, mmseg's aug
    # test): run every ratio of the test scale (INPUT.MIN/MAX_SIZE_TEST x r) and its mirror,
    # average the "sem_seg" outputs at the original size. Needs TEST.EVAL_TASKS ("sem_seg",).
    cfg.TEST.SEM_SEG_TTA = CN()
    cfg.TEST.SEM_SEG_TTA.ENABLED = False
    cfg.TEST.SEM_SEG_TTA.RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's img_ratios
    cfg.TEST.SEM_SEG_TTA.FLIP = True  # also run each scale flipped horizontally

    # ---- solver --------------------------------------------------------------------------
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # "ADAMW" | "SGD"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0  # LR multiplier for parameters under model.backbone
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0  # weight decay of nn.Embedding weights and query tables
    cfg.SOLVER.BETAS = (0.9, 0.999)  # AdamW betas
    # Parameter names (substring match) that get no weight decay, e.g. positional tables.
    cfg.SOLVER.NO_DECAY_KEYWORDS = ()

    # ---- the built-in synthetic dataset ------------------------------------------------
    cfg.DATASETS.SHAPES = CN()
    cfg.DATASETS.SHAPES.IMAGE_SIZE = 128  # square images, pixels
    cfg.DATASETS.SHAPES.NUM_TRAIN = 600
    cfg.DATASETS.SHAPES.NUM_VAL = 100
    cfg.DATASETS.SHAPES.SEED = 0
    # how hard the scenes are: "standard" (class-coloured, flat stuff, mild occlusion) or "hard"
    # (random textures, occlusion to 10 % visible, small shapes); see common/data/shapes_gen.py
    cfg.DATASETS.SHAPES.PRESET = "standard"
    # the built-in synthetic video dataset `shapes_vis` (common/data/shapes_vis.py): clips of
    # moving `shapes` objects in YouTube-VIS 2019 JSON, registered as shapes_vis_{train,val}
    cfg.DATASETS.SHAPES_VIS = CN()
    cfg.DATASETS.SHAPES_VIS.IMAGE_SIZE = 64  # square frames, pixels
    cfg.DATASETS.SHAPES_VIS.NUM_TRAIN = 120  # clips
    cfg.DATASETS.SHAPES_VIS.NUM_VAL = 20
    cfg.DATASETS.SHAPES_VIS.NUM_FRAMES = 8  # frames per clip
    cfg.DATASETS.SHAPES_VIS.SEED = 0
    cfg.DATASETS.SHAPES_VIS.PRESET = "standard"  # a shapes preset: how objects are drawn

    # ---- video clips (the "video_instance" mapper, common/data/mappers.py) ------------------
    cfg.INPUT.VIDEO = CN()
    # Frames of one clip per training sample, fed to the model in temporal order.
    cfg.INPUT.VIDEO.NUM_FRAMES = 2
    # The sampled frames lie within this many frames of a random reference frame.
    cfg.INPUT.VIDEO.SAMPLING_FRAME_RANGE = 5
