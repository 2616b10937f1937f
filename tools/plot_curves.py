#!/usr/bin/env python
"""Learning curves: a model's accuracy against training iterations, from the ``metrics.json`` of
``train_net.py`` runs that evaluated periodically (``TEST.EVAL_PERIOD N``).

    python train_net.py --config-file A.yaml TEST.EVAL_PERIOD 150 OUTPUT_DIR out/a [KEY VALUE ...]
    python tools/plot_curves.py out/a out/b --labels A B --output curves.png

For each run the metric of its task is read (mask AP ``segm/AP``, else ``panoptic_seg/PQ``, else
``sem_seg/mIoU``; ``--metric`` picks one) and drawn against the iteration, one panel per metric;
``<output>.csv`` holds the points (run, metric, iteration, value), and a Markdown table is
printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence

#: the metric of each task, in the order one is picked for a run
TASK_METRICS = ("segm/AP", "panoptic_seg/PQ", "sem_seg/mIoU")


def read_curve(run_dir: str, metric: str | None = None) -> tuple[str, list[tuple[int, float]]]:
    """(metric, [(iteration, value), ...]) of one run's ``metrics.json``.

    Iterations are those completed: Detectron2 logs a periodic evaluation at the index of the
    period's last iteration (N - 1) and the one after training at MAX_ITER.
    """
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no metrics.json (is {run_dir} a train_net.py OUTPUT_DIR?)"
        )
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
    metrics = [metric] if metric else TASK_METRICS
    for m in metrics:
        found = sorted((int(r["iteration"]), float(r[m])) for r in records if m in r)
        if found:
            last = len(found) - 1
            # (a run still going has no final evaluation yet: its last one is periodic too)
            return m, [
                (i if k == last and (i + 1) % 10 else i + 1, v) for k, (i, v) in enumerate(found)
            ]
    raise ValueError(f"{path}: no evaluation of {' / '.join(metrics)} (set TEST.EVAL_PERIOD)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="train_net.py OUTPUT_DIRs")
    p.add_argument("--labels", nargs="+", help="one per run (default: the folder names)")
    p.add_argument("--metric", help=f"one of {', '.join(TASK_METRICS)} (default: the run's task)")
    p.add_argument("--title", default="Learning curves")
    p.add_argument("--output", default="curves.png")
    args = p.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        p.error(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    curves = [(label, *read_curve(run, args.metric)) for label, run in zip(labels, args.runs)]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(m for _, m, _ in curves))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], panels):
        for label, m, pts in curves:
            if m == metric:
                ax.plot([i for i, _ in pts], [v for _, v in pts], "o-", label=label)
        ax.set_xlabel("iteration")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(args.title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=90)
    plt.close(fig)
    with open(os.path.splitext(args.output)[0] + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "metric", "iteration", "value"])
        for label, m, pts in curves:
            w.writerows([label, m, i, f"{v:.4f}"] for i, v in pts)
    iters = sorted({i for _, _, pts in curves for i, _ in pts})
    print("| run | metric | " + " | ".join(f"it {i}" for i in iters) + " |")
    print("|:---|:---|" + "---:|" * len(iters))
    for label, m, pts in curves:
        d = dict(pts)
        cells = [f"{d[i]:.1f}" if i in d else "" for i in iters]
        print(f"| {label} | {m} | " + " | ".join(cells) + " |")
    print(f"wrote {args.output} and {os.path.splitext(args.output)[0]}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
