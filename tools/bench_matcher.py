"""Benchmark the shared matcher and set criterion: dense (K-Net-style) vs point-sampled
(FastInst-style) costs and losses.

Setting: B images, 100 queries x 50 targets, predicted masks at 1/4 of a 512x512 input
(128x128), GT masks at the input resolution (512x512, the padded frame the mappers produce).

- dense: matcher focal 2 + dice_sq 4 + mask_agreement 1 (targets resized to 128x128);
  criterion labels_focal + mask_bce + mask_dice (dense, 128x128).
- point: matcher softmax_class 2 + point_bce 5 + point_dice 5 on 12544 shared points;
  criterion labels_ce + masks_point (12544 importance-sampled points per mask).

Prints a Markdown table of median times (ms) after warm-up. Example::

    python tools/bench_matcher.py --device cpu --repeats 10
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from common.modeling.criterion import SetCriterion
from common.modeling.matcher import HungarianMatcher

NUM_CLASSES = 80


def make_batch(batch, queries, targets, pred_size, gt_size, softmax, device):
    """Random predictions (with grad) and targets as the heads and mappers produce them."""
    k = NUM_CLASSES + 1 if softmax else NUM_CLASSES
    outputs = {
        "pred_logits": torch.randn(batch, queries, k, device=device, requires_grad=True),
        "pred_masks": torch.randn(
            batch, queries, pred_size, pred_size, device=device, requires_grad=True
        ),
    }
    tgts = []
    for _ in range(batch):
        # blob masks: random boxes, so that costs are not degenerate
        masks = torch.zeros(targets, gt_size, gt_size, device=device)
        xy = torch.randint(0, gt_size // 2, (targets, 2))
        wh = torch.randint(8, gt_size // 2, (targets, 2))
        for i in range(targets):
            x0, y0 = xy[i].tolist()
            masks[i, y0 : y0 + wh[i, 1], x0 : x0 + wh[i, 0]] = 1.0
        tgts.append(
            {
                "labels": torch.randint(0, NUM_CLASSES, (targets,), device=device),
                "masks": masks,
                "image_size": (gt_size, gt_size),
            }
        )
    return outputs, tgts


def timeit(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def build(setting: str, num_points: int):
    if setting == "dense":
        matcher = HungarianMatcher(
            [("focal_class", 2.0), ("dice_sq", 4.0), ("mask_agreement", 1.0)]
        )
        crit = SetCriterion(
            matcher,
            NUM_CLASSES,
            ["labels_focal", "mask_bce", "mask_dice"],
            {"loss_cls": 2.0, "loss_mask": 1.0, "loss_dice": 4.0},
            normalizer="num_matched",
        )
        return matcher, crit, False
    matcher = HungarianMatcher(
        [
            ("softmax_class", 2.0),
            ("point_bce", 5.0, {"num_points": num_points}),
            ("point_dice", 5.0, {"num_points": num_points}),
        ]
    )
    crit = SetCriterion(
        matcher,
        NUM_CLASSES,
        ["labels_ce", "masks_point"],
        {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
        loss_kwargs={"masks_point": {"num_points": num_points}},
    )
    return matcher, crit, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--targets", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--num-points", type=int, default=12544)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    pred_size = args.image_size // 4

    rows = []
    for setting in ("dense", "point"):
        matcher, crit, softmax = build(setting, args.num_points)
        outputs, targets = make_batch(
            args.batch, args.queries, args.targets, pred_size, args.image_size, softmax, device
        )

        def fwd_bwd(crit=crit, outputs=outputs, targets=targets):
            losses = crit(outputs, targets)
            sum(losses.values()).backward()

        t_match = timeit(
            lambda m=matcher, o=outputs, t=targets: m(o, t), args.repeats, args.warmup, device
        )
        t_crit = timeit(
            lambda c=crit, o=outputs, t=targets: c(o, t), args.repeats, args.warmup, device
        )
        t_bwd = timeit(fwd_bwd, args.repeats, args.warmup, device)
        rows.append((setting, t_match, t_crit, t_bwd))

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"CPU, {torch.get_num_threads()} threads")
    )
    print(
        f"Device: {name}; batch {args.batch}, {args.queries} queries x {args.targets} targets, "
        f"pred masks {pred_size}x{pred_size}, GT {args.image_size}x{args.image_size}, "
        f"points {args.num_points}; median of {args.repeats} after {args.warmup} warm-up (ms)"
    )
    print()
    print("| setting | matcher | criterion fwd (incl. matching) | criterion fwd+bwd |")
    print("|---|---:|---:|---:|")
    for setting, t_match, t_crit, t_bwd in rows:
        print(f"| {setting} | {t_match:.1f} | {t_crit:.1f} | {t_bwd:.1f} |")


if __name__ == "__main__":
    main()
