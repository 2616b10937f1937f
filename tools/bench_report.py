"""The benchmark/ablation table: Markdown (with its settings header), CSV and the speed-accuracy
plot, from the row dicts of ``bench_core.measure_row``."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import Any

#: (CSV key, Markdown heading) of the table's columns, in order.
COLUMNS = (
    ("name", "Model"),
    ("task", "Task"),
    ("params_m", "Params (M)"),
    ("gflops", "GFLOPs"),
    ("latency_ms", "Latency (ms)"),
    ("memory_mb", "Peak mem (MB)"),
    ("train_s_iter", "Train (s/iter)"),
    ("AP", "AP"),
    ("box_AP", "box AP"),
    ("PQ", "PQ"),
    ("PQ_th", "PQ things"),
    ("mIoU", "mIoU"),
)
#: columns added when a row is a video (online VIS) model: YouTube-VIS video AP, AR@10, and
#: identity switches at score >= 0.3 (common/data/ytvis_evaluation.py)
VIDEO_COLUMNS = (("vAP", "video AP"), ("vAR10", "video AR@10"), ("IDSW", "ID switches"))
_DIGITS = {
    "params_m": 2,
    "gflops": 2,
    "latency_ms": 1,
    "memory_mb": 0,
    "train_s_iter": 3,
    "AP": 1,
    "box_AP": 1,
    "PQ": 1,
    "PQ_th": 1,
    "mIoU": 1,
    "vAP": 1,
    "vAR10": 1,
    "IDSW": 0,
}
#: the plot's y axis for each task
PRIMARY = {"instance": "AP", "panoptic": "PQ", "semantic": "mIoU", "video": "vAP"}


def columns_for(rows: Sequence[dict]) -> tuple[tuple[str, str], ...]:
    """The table's columns: ``COLUMNS``, plus ``VIDEO_COLUMNS`` when a row is a video model."""
    if any(r.get("task") == "video" for r in rows):
        return COLUMNS + VIDEO_COLUMNS
    return COLUMNS


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: None -> "n/a" (not produced by this model), NaN -> "nan"."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def cell(row: dict, key: str) -> str:
    """A row's cell: ``mean ± std`` for a metric measured over several seeds."""
    text = fmt(row.get(key), _DIGITS.get(key, 2))
    std = row.get(f"{key}_std")
    return f"{text} ± {fmt(std, _DIGITS.get(key, 2))}" if isinstance(std, float) else text


def ties(rows: Sequence[dict]) -> list[tuple[str, str, str]]:
    """Pairs of rows of one task whose primary metric's means differ by less than 2 std (the
    larger of the two rows' std over seeds): (metric, row a, row b)."""
    out = []
    for task, metric in PRIMARY.items():
        group = [
            r for r in rows if r.get("task") == task and isinstance(r.get(f"{metric}_std"), float)
        ]
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if abs(a[metric] - b[metric]) < 2 * max(a[f"{metric}_std"], b[f"{metric}_std"]):
                    out.append((metric, a["name"], b["name"]))
    return out


def render_markdown(
    rows: Sequence[dict], header: dict[str, str], *, title: str, notes: Sequence[str] = ()
) -> str:
    """The Markdown table with its settings header and footnotes; rows with a ``paper`` value
    (an ablation's reference numbers from the paper) add a last column "Paper"."""
    h = header
    columns = columns_for(rows)
    video = (
        " · **video AP / AR@10** YouTube-VIS mask-tube AP, **ID switches** at score >= 0.3"
        if columns != COLUMNS
        else ""
    )
    if any(r.get("paper") for r in rows):
        columns = columns + (("paper", "Paper (ref.)"),)
    lines = [
        f"## {title}",
        "",
        f"**Device** {h['device']} · torch {h['torch']} · {h['threads']} threads · "
        f"{h['date']} · whole run {h['elapsed']}",
        "",
        f"**Same for every row:** seed {h['seed']} · init {h.get('init', '?')} · loader "
        f"{h['loader']} · schedule "
        f"{h['schedule']} · data {h['dataset']} · train short sides {h['train_sizes']} · "
        f"test/latency/GFLOPs input {h['input']}",
        "",
        f"**Latency** {h['latency']} · **GFLOPs** {h['gflops']} · **Peak mem** {h['memory']} · "
        f"**Train s/iter** {h['train_s_iter']} · **AP** mask AP (COCO) · **box AP** COCO · "
        "**PQ** COCO panoptic, **PQ things** its thing classes · **mIoU** semantic" + video,
        "",
        "| " + " | ".join(name for _, name in columns) + " |",
        "|" + "|".join(":---" if k in ("name", "task") else "---:" for k, _ in columns) + "|",
    ]
    for r in rows:
        cells = [cell(r, k) if k != "paper" else str(r.get(k) or "–") for k, _ in columns]
        tied = [b if a == r["name"] else a for _, a, b in ties(rows) if r["name"] in (a, b)]
        cells[0] += " ≈" if tied else ""
        if r.get("error"):
            cells[1] = "**failed**"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    foot = ["n/a: the model does not produce that output."]
    foot += [f"{r['name']} failed: {r['error']}" for r in rows if r.get("error")]
    foot += [f"{r['name']}: {r['note']}" for r in rows if r.get("note")]
    foot += [f"tie ({m}, means closer than 2 std): {a} ≈ {b}" for m, a, b in ties(rows)]
    foot += [
        f"{r['name']}: {k} per seed " + ", ".join(fmt(v, 1) for v in r[f"{k}_runs"])
        for r in rows
        for k in ("AP", "PQ", "mIoU", "vAP")
        if r.get(f"{k}_runs")
    ]
    foot += list(notes)
    foot += [
        f"{r['name']}: `{_relpath(r['config'])}`"
        + (f" with weights `{r['weights']}`" if r.get("weights") else "")
        for r in rows
    ]
    lines += [f"- {n}" for n in foot]
    return "\n".join(lines) + "\n"


def _relpath(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = os.path.abspath(os.path.join(repo, path))
    return os.path.relpath(full, repo) if full.startswith(repo + os.sep) else full


def write_csv(rows: Sequence[dict], header: dict[str, str], path: str) -> None:
    """One line per row: the table's columns (full precision), config, error, then the header."""
    keys = [k for k, _ in columns_for(rows)] + [
        "wall_s",
        "cpu_s",
        "method",
        "config",
        "weights",
        "error",
        "note",
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + [f"setting_{k}" for k in header])
        for r in rows:
            cells = [fmt(r.get(k), 6) if k in _DIGITS else (r.get(k) or "") for k in keys]
            cells[keys.index("wall_s")] = fmt(r.get("wall_s"), 1)
            cells[keys.index("cpu_s")] = fmt(r.get("cpu_s"), 1)
            cells[keys.index("config")] = _relpath(r["config"])
            w.writerow(cells + list(header.values()))


def plot_speed_accuracy(rows: Sequence[dict], path: str, *, title: str) -> None:
    """Speed-accuracy plot (latency vs AP / PQ / mIoU), one panel per task, like the papers'
    figures; rows of the same method are joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ok(x: Any) -> bool:
        return isinstance(x, (int, float)) and not math.isnan(x)

    tasks = [
        t
        for t in ("instance", "panoptic", "semantic", "video")
        if any(r.get("task") == t and ok(r.get(PRIMARY[t])) for r in rows)
    ]
    fig, axes = plt.subplots(
        1, max(len(tasks), 1), figsize=(5.2 * max(len(tasks), 1), 4.2), squeeze=False
    )
    for ax, task in zip(axes[0], tasks):
        metric = PRIMARY[task]
        pts = [
            r
            for r in rows
            if r.get("task") == task and ok(r.get(metric)) and ok(r.get("latency_ms"))
        ]
        for method in dict.fromkeys(r["method"] for r in pts):
            group = sorted((r for r in pts if r["method"] == method), key=lambda r: r["latency_ms"])
            ax.errorbar(
                [r["latency_ms"] for r in group],
                [r[metric] for r in group],
                yerr=[r.get(f"{metric}_std") or 0.0 for r in group],
                fmt="o-",
                label=method,
                markersize=7,
                capsize=3,
            )
            for r in group:
                ax.annotate(
                    r["name"],
                    (r["latency_ms"], r[metric]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, 4),
                )
        ax.set_xlabel("latency (ms, batch 1)")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: {metric} vs latency", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if not tasks:
        axes[0][0].text(0.5, 0.5, "no row has both a metric and a latency", ha="center")
        axes[0][0].set_axis_off()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_grid(rows: Sequence[dict], path: str) -> None:
    """The Visualizer grid: one line of panels per row (``_panels`` of ``measure_row``) under a
    ground-truth line (of the first panoptic row, else of the first row with panels)."""
    import cv2

    from common.engine.visualization import labelled_grid

    drawn = [r for r in rows if r.get("_panels")]
    gt_row = next((r for r in drawn if r.get("task") == "panoptic"), drawn[0])
    ncols = len(gt_row["_panels"])
    panels, labels = list(gt_row["_gt_panels"]), ["ground truth"] * ncols
    for r in drawn:
        panels += list(r["_panels"])[:ncols]
        labels += [r["name"]] * len(r["_panels"][:ncols])
    grid = labelled_grid(panels, labels, ncols=ncols, label_height=26)
    if not cv2.imwrite(path, grid[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"cannot write {path}")
