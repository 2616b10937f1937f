#!/usr/bin/env python
"""Train and evaluate any QuerySeg model (K-Net, QueryInst, FastInst, EmbedMask) or a Detectron2
baseline, with Detectron2's usual command line:

    python train_net.py --config-file projects/knet/configs/<leaf>.yaml --num-gpus 8 [KEY VALUE ...]
    python train_net.py --config-file <yaml> --eval-only MODEL.WEIGHTS <checkpoint.pth>

A config key that is set but not used by the built run (another method's key, or one nothing
reads) stops the run before it starts (common/engine/config_guard.py); ``--allow-unused-keys``
makes that a warning.

Runs on the CPU when no GPU is present (``--num-gpus 2`` then starts 2 processes over gloo).
"""

import logging
import os

import torch
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from common.data.validation import check_dataset_files
from common.engine import Trainer, get_cfg, merge_config, setup_queryseg
from common.engine.checkpoint import QSCheckpointer

logger = logging.getLogger("queryseg")


def setup(args):
    """Start QuerySeg (patch Detectron2, load the projects), then build the frozen config from
    ``--config-file`` and the trailing overrides."""
    setup_queryseg()
    cfg = get_cfg()
    merge_config(cfg, args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    rank = comm.get_rank()
    for name in ("queryseg", "common"):  # train_net.py's own messages and common/'s modules
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name=name, abbrev_name=name)
    if comm.is_main_process():
        _log_process_plan(args)
    from common.data.shapes import configure_shapes_from_cfg

    # (Re)register the built-in `shapes` dataset with the configured size, generating it on rank 0
    # first so that several processes never write the same files.
    if comm.is_main_process():
        configure_shapes_from_cfg(cfg, generate=_uses_shapes(cfg))
    comm.synchronize()
    if not comm.is_main_process():
        configure_shapes_from_cfg(cfg, generate=False)
    # a missing COCO/ADE20K folder fails here, with how to prepare it, not after the model is built
    check_dataset_files([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST])
    return cfg


def _log_process_plan(args) -> None:
    """Say how many processes and threads this run uses, warning when they oversubscribe the
    cores (e.g. ``--num-gpus 8`` on a 2-core machine without CUDA)."""
    from common.engine.trainer import available_cores

    n = args.num_gpus * args.num_machines
    threads = torch.get_num_threads()
    cores = available_cores()
    if torch.cuda.is_available():
        logger.info(f"training on {args.num_gpus} GPU(s) per machine, {n} process(es) in all")
        return
    if args.num_gpus > 1:
        logger.info(
            f"no CUDA: running {args.num_gpus} CPU processes over gloo on this machine, "
            f"{threads} thread(s) each"
        )
    if args.num_gpus * threads > cores:
        logger.warning(
            f"{args.num_gpus} process(es) x {threads} thread(s) = {args.num_gpus * threads} > "
            f"{cores} CPU core(s): oversubscribed, each step will be slower than with fewer "
            "processes (lower --num-gpus or OMP_NUM_THREADS)"
        )


def _uses_shapes(cfg) -> bool:
    return any(n.startswith("shapes") for n in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST))


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        QSCheckpointer.from_config(cfg, model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        fast = cfg.MODEL.FAST_INFERENCE
        # every key the config set must be used (the training keys count: same config file)
        Trainer.check_config(cfg, model)
        if fast:  # after the weights: folding BatchNorm changes them
            from common.modeling.fast_inference import prepare_fast_inference

            prepare_fast_inference(model)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    # before the first step, no key set in vain (with what evaluation at the end will read)
    Trainer.check_config(cfg, trainer.model)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    parser = default_argument_parser()
    parser.add_argument(
        "--allow-unused-keys",
        action="store_true",
        help="warn instead of failing when a config key is set that the built run does not use "
        "(sets QUERYSEG.ALLOW_UNUSED_KEYS True)",
    )
    args = parser.parse_args(argv)
    if args.allow_unused_keys:
        args.opts = [*args.opts, "QUERYSEG.ALLOW_UNUSED_KEYS", "True"]
    if args.num_gpus > max(torch.cuda.device_count(), 1) and torch.cuda.is_available():
        raise SystemExit(
            f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} GPUs are visible"
        )
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.num_gpus)))
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
