#!/usr/bin/env python
"""Pre-train a config's backbone as an object classifier on `shapes` crops: an offline stand-in
for the ImageNet initialisation the methods are designed for, for experiments on `shapes`.

The papers all start from an ImageNet-pretrained backbone; offline there is none. This tool
trains the config's bottom-up network (e.g. the overlay's ResNet-18-GN) with global average
pooling and a linear classifier on square crops around the objects of a `shapes` *train* split
(never val; ``--num-images`` train scenes, more than a detection run uses, so the crops do not
overfit), then writes the backbone alone, under the config's own key prefix (``backbone.`` or
``backbone.bottom_up.``), like ``tools/convert_backbone.py``::

    python tools/pretrain_shapes_backbone.py \\
        --config-file projects/knet/configs/shapes/knet_R18_shapes_instance.yaml \\
        --output checkpoints/knet_R18_shapes_pretrained.pth
    python train_net.py --config-file <same yaml> \\
        MODEL.WEIGHTS checkpoints/knet_R18_shapes_pretrained.pth

The classifier is dropped; the rest of the detection model keeps its own initialisation
(``common.engine.checkpoint.QSCheckpointer`` accepts a ``backbone.*``-only file). It prints the crop
accuracy on the val split's objects. What it did for K-Net (projects/knet/README.md, "Known
gap"): 76-78 % val crop accuracy at 64 px (600 iterations, 2-4 minutes), but the 128 px
instance AP after 500 iterations only went from 1.6 to 2.0: the fresh heads, not only the
backbone, are slow.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

logger = logging.getLogger("pretrain_shapes_backbone")


def bottom_up(model: nn.Module) -> tuple[nn.Module, str]:
    """The model's bottom-up network and the key prefix of its weights in the model."""
    backbone = model.backbone
    if hasattr(backbone, "bottom_up"):
        return backbone.bottom_up, "backbone.bottom_up."
    return backbone, "backbone."


def object_crops(
    dataset_dicts: list[dict], crop: int, image_format: str, context: float = 1.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Square crops of side ``context`` x the longer box side around every annotated object,
    resized to ``crop`` x ``crop`` (zero padding outside the image).

    Returns:
        images [N, 3, crop, crop] uint8 in ``image_format`` channel order, labels [N] (the
        contiguous class ids of the dataset's metadata).
    """
    from detectron2.data import detection_utils as utils
    from detectron2.structures import BoxMode

    images, labels = [], []
    for d in dataset_dicts:
        img = torch.from_numpy(np.array(utils.read_image(d["file_name"], image_format)))
        img = img.permute(2, 0, 1).float()  # [3, H, W]
        h, w = img.shape[-2:]
        for ann in d.get("annotations", []):
            x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            side = max(x1 - x0, y1 - y0, 2.0) * context
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
            s = max(int(round(side)), 2)
            pad = (max(-left, 0), max(left + s - w, 0), max(-top, 0), max(top + s - h, 0))
            padded = F.pad(img, pad)
            y, x = max(top, 0), max(left, 0)
            patch = padded[:, y : y + s, x : x + s]
            patch = F.interpolate(patch[None], (crop, crop), mode="bilinear", align_corners=False)
            images.append(patch[0].round().clamp(0, 255).to(torch.uint8))
            labels.append(int(ann["category_id"]))
    if not images:
        raise ValueError("no annotated objects to crop (is the dataset an instance split?)")
    return torch.stack(images), torch.as_tensor(labels)


class CropClassifier(nn.Module):
    """Backbone -> global average pool of its last output -> linear classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int, pixel_mean, pixel_std):
        super().__init__()
        self.backbone = backbone
        self.last = backbone._out_features[-1]
        self.fc = nn.Linear(backbone.output_shape()[self.last].channels, num_classes)
        self.register_buffer("mean", torch.as_tensor(pixel_mean).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.as_tensor(pixel_std).view(1, -1, 1, 1), False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return self.fc(self.backbone(x)[self.last].mean(dim=(2, 3)))


def accuracy(model: CropClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x in images.split(256)])
    model.train()
    return float((pred == labels).float().mean())


def pretrain(
    config_file: str,
    output: str,
    opts: Sequence[str] = (),
    *,
    num_images: int = 2000,
    iters: int = 600,
    batch: int = 64,
    crop: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Pre-train ``config_file``'s backbone on crops of ``num_images`` shapes train scenes
    (the config's image size and seed); write ``output``.

    Returns:
        {"train_acc", "val_acc", "seconds", "num_train", "num_val", "num_classes"}
        (accuracies in [0, 1]; counts of crops).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.modeling import build_model

    from common.convert.core import ConversionReport, save_converted
    from common.data.shapes import configure_shapes_from_cfg
    from common.engine import get_cfg, merge_config, setup_queryseg

    setup_queryseg()
    cfg = get_cfg()
    merge_config(cfg, config_file, [*opts, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    train_name = cfg.DATASETS.TRAIN[0]
    if not train_name.startswith("shapes_"):
        raise ValueError(f"{config_file}: DATASETS.TRAIN[0] = {train_name!r} is not a shapes split")
    cfg.DATASETS.SHAPES.NUM_TRAIN = int(num_images)
    cfg.freeze()
    configure_shapes_from_cfg(cfg)

    torch.manual_seed(seed)
    model = build_model(cfg)
    backbone, prefix = bottom_up(model)
    # every task's split has the same scenes; the instance registration carries the boxes
    classes = MetadataCatalog.get("shapes_train").thing_classes
    fmt = cfg.INPUT.FORMAT
    x_train, y_train = object_crops(DatasetCatalog.get("shapes_train"), crop, fmt)
    x_val, y_val = object_crops(DatasetCatalog.get("shapes_val"), crop, fmt)
    net = CropClassifier(backbone, len(classes), cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iters, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for it in range(iters):
        idx = torch.randint(len(y_train), (batch,), generator=gen)
        flip = torch.rand(batch, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x_train[idx].flip(-1), x_train[idx])
        loss = F.cross_entropy(net(x), y_train[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"crop classification loss became {loss.item()} at iter {it}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % max(iters // 10, 1) == 0:
            logger.info("iter %d/%d  loss %.3f", it + 1, iters, loss.item())
    stats = {
        "train_acc": accuracy(net, x_train, y_train),
        "val_acc": accuracy(net, x_val, y_val),
        "seconds": time.perf_counter() - start,
        "num_train": len(y_train),
        "num_val": len(y_val),
        "num_classes": len(classes),
    }
    # the keys are the model's own (its backbone's, under the backbone's prefix)
    state = {prefix + k: v.detach().clone() for k, v in backbone.state_dict().items()}
    save_converted(state, ConversionReport(), output,
                   f"shapes crops for {os.path.basename(config_file)}")  # fmt: skip
    return stats


#: The backbone every row of a benchmark schedule with ``backbone: "shapes"`` starts from (the
#: stand-in for ImageNet, whose classes include COCO's): the overlay's R18-GN, pre-trained once
#: per image size as a classifier of the standard preset's five thing classes on crops of 2000
#: train scenes (val crops only report its accuracy). Measured on the quick schedule, seed 42:
#: K-Net mask AP 7.7 from scratch, 19.2 from this backbone, 6.9 from one pre-trained on the
#: ``hard`` preset's crops; FastInst 22.6 / 23.0 / 26.2 (docs/benchmark.md).
BENCHMARK_PRETRAIN: dict = {
    "config": "common/configs/baselines/mask_rcnn_R_18_FPN_gn_scratch_shapes.yaml",
    "preset": "standard",
    "num_images": 2000,
    "iters": 600,
    "batch": 64,
    "crop": 32,
    "lr": 2e-3,
    "seed": 0,
}


def benchmark_backbone_key(image_size: int) -> str:
    """The cache name of :data:`BENCHMARK_PRETRAIN` at ``image_size`` (every setting in it)."""
    p = BENCHMARK_PRETRAIN
    return (
        f"R18-GN_{p['preset']}_{image_size}px_{p['num_images']}img_{p['iters']}it_"
        f"b{p['batch']}_crop{p['crop']}_lr{p['lr']:g}_s{p['seed']}"
    )


def benchmark_backbone(image_size: int, prefix: str) -> str:
    """The path of the benchmark's `shapes`-pre-trained backbone with its keys under ``prefix``
    (``backbone.`` or ``backbone.bottom_up.``), pre-training it first if it is not cached.

    Cached under ``$DETECTRON2_DATASETS/shapes/pretrained/<key>/<prefix>pth``. Call it from one
    process at a time (the benchmark does so before its training workers start).
    """
    from common.data.validation import datasets_root

    folder = os.path.join(
        datasets_root(), "shapes", "pretrained", benchmark_backbone_key(image_size)
    )
    path = os.path.join(folder, f"{prefix}pth")
    if os.path.isfile(path):
        return path
    from common.convert.core import ConversionReport, load_checkpoint_file, save_converted

    p = BENCHMARK_PRETRAIN
    canonical = os.path.join(folder, "backbone.bottom_up.pth")
    if not os.path.isfile(canonical):
        logger.info(
            "pre-training the benchmark backbone %s (once)", benchmark_backbone_key(image_size)
        )
        stats = pretrain(
            os.path.join(_REPO, p["config"]),
            canonical,
            ["DATASETS.SHAPES.IMAGE_SIZE", str(image_size), "DATASETS.SHAPES.PRESET", p["preset"]],
            **{k: p[k] for k in ("num_images", "iters", "batch", "crop", "lr", "seed")},
        )
        with open(os.path.join(folder, "stats.txt"), "w") as f:
            f.write("".join(f"{k} {v}\n" for k, v in sorted(stats.items())))
    if path == canonical:
        return path
    state = load_checkpoint_file(canonical)["model"]
    old = "backbone.bottom_up."  # BENCHMARK_PRETRAIN's config is an FPN model
    if not all(k.startswith(old) for k in state):
        raise ValueError(f"{canonical}: expected every key under {old!r} (BENCHMARK_PRETRAIN)")
    rekeyed = {prefix + k[len(old) :]: v for k, v in state.items()}
    save_converted(rekeyed, ConversionReport(), path, canonical)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="a config trained on shapes")
    parser.add_argument("--output", required=True, help="where to write the backbone (.pth)")
    parser.add_argument("--num-images", type=int, default=2000, help="shapes train scenes")
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--crop", type=int, default=32, help="crop side in pixels")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak lr (one-cycle)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    stats = pretrain(args.config_file, args.output, args.opts, num_images=args.num_images,
                     iters=args.iters, batch=args.batch, crop=args.crop, lr=args.lr,
                     seed=args.seed)  # fmt: skip
    print(
        f"wrote {args.output}: {stats['num_train']} train / {stats['num_val']} val crops, "
        f"accuracy train {100 * stats['train_acc']:.1f} % / val {100 * stats['val_acc']:.1f} % "
        f"(chance {100 / stats['num_classes']:.0f} %), {stats['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
