#!/usr/bin/env python
"""Side-by-side benchmark of QuerySeg methods and the Detectron2 baselines on `shapes`.

For every config (by default :data:`DEFAULT_ENTRIES`: the Mask R-CNN / Panoptic FPN baselines and
each method's `shapes` configs), in one process and with the same seed, loader settings and input
size: train (or, with ``--weights``, time a few training iterations and load the checkpoint),
evaluate through the project's evaluators, and measure parameters, GFLOPs, batch-1 latency, peak
inference memory and training seconds per iteration. Writes ``benchmark.md`` (Markdown table whose
header states the settings, device, torch version and threads), ``benchmark.csv`` and
``benchmark.png`` (speed-accuracy plot) under ``--output``, with a progress bar and ETA over the
whole run. Usage::

    python tools/benchmark.py                          # every default entry, quick schedule
    python tools/benchmark.py --schedule full          # the configs' own (documented) schedules
    python tools/benchmark.py --config A.yaml B.yaml --weights a.pth - [KEY VALUE ...]
    python tools/benchmark.py --list                   # default entries and whether present
    python tools/benchmark.py --runtime eager fast onnxruntime --runtime-threads 1 2
                                                       # inference runtimes side by side
                                                       # (tools/bench_runtime.py; --fast: eager
                                                       # and fast)

A config file that does not exist (yet) is skipped with a note on the console and in the table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __package__:  # imported as ``tools.<name>`` (the tests, another tool)
    from .bench_core import (
        Measurer,
        Progress,
        aggregate_seeds,
        measure_row,
        row_dir,
        train_parallel,
    )
    from .bench_report import plot_speed_accuracy, render_markdown, write_csv, write_grid
    from .bench_runtime import RUNTIME_MODELS, RUNTIMES, compile_probe
    from .bench_runtime import run as run_runtimes
else:  # run as a script: tools/ is sys.path[0] (Detectron2 installs a package `tools`)
    from bench_core import (
        Measurer,
        Progress,
        aggregate_seeds,
        measure_row,
        row_dir,
        train_parallel,
    )
    from bench_report import plot_speed_accuracy, render_markdown, write_csv, write_grid
    from bench_runtime import RUNTIME_MODELS, RUNTIMES, compile_probe
    from bench_runtime import run as run_runtimes

logger = logging.getLogger("queryseg.benchmark")


@dataclass(frozen=True)
class Entry:
    """One row of a benchmark or ablation table.

    Attributes:
        name: the row's label.
        config: YAML path (absolute, or relative to the repository root).
        overrides: ``KEY VALUE`` pairs applied after the YAML (before the run-wide settings).
        weights: a checkpoint to evaluate instead of training (None: train).
        method: rows with the same method are joined by a line in the plot (default: name).
    """

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    weights: str | None = None
    method: str = ""

    @property
    def path(self) -> str:
        return self.config if os.path.isabs(self.config) else os.path.join(REPO, self.config)


_BASELINES = "common/configs/baselines"


def _shapes(project: str, leaf: str) -> str:
    return f"projects/{project}/configs/shapes/{leaf}"


#: The default comparison: add a method's `shapes` config by adding a row here.
DEFAULT_ENTRIES: tuple[Entry, ...] = (
    Entry(
        "Mask R-CNN R18-FPN-GN",
        f"{_BASELINES}/mask_rcnn_R_18_FPN_gn_scratch_shapes.yaml",
        method="Mask R-CNN",
    ),
    Entry(
        "Panoptic FPN R18-GN",
        f"{_BASELINES}/panoptic_fpn_R_18_gn_scratch_shapes.yaml",
        method="Panoptic FPN",
    ),
    Entry("K-Net R18", _shapes("knet", "knet_R18_shapes_instance.yaml"), method="K-Net"),
    Entry("K-Net R18 (panoptic)", _shapes("knet", "knet_R18_shapes_panoptic.yaml"), method="K-Net"),
    Entry(
        "K-Net UPerNet R18",
        _shapes("knet", "knet_upernet_R18_shapes_semantic.yaml"),
        method="K-Net",
    ),
    Entry(
        "QueryInst R18-FPN",
        _shapes("queryinst", "queryinst_R18_FPN_shapes.yaml"),
        method="QueryInst",
    ),
    Entry(
        "FastInst-D1 R18",
        _shapes("fastinst", "fastinst_R18_D1_shapes_instance.yaml"),
        method="FastInst",
    ),
    Entry(
        "FastInst-D1 R18 (panoptic)",
        _shapes("fastinst", "fastinst_R18_D1_shapes_panoptic.yaml"),
        method="FastInst",
    ),
    Entry(
        "FastInst-D1 R18 (semantic)",
        _shapes("fastinst", "fastinst_R18_D1_shapes_semantic.yaml"),
        method="FastInst",
    ),
    Entry(
        "EmbedMask R18-FPN", _shapes("embedmask", "embedmask_R18_shapes.yaml"), method="EmbedMask"
    ),
)


@dataclass
class Settings:
    """What every row shares; all of it is stated in the table header.

    ``None`` keeps the config's own value (the "full" schedule keeps the configs' schedules).
    """

    schedule: str = "quick"
    max_iter: int | None = None  # training iterations (STEPS/WARMUP scaled to match)
    seed: int = 42
    seeds: tuple[int, ...] = ()  # several: every row runs once per seed, cells show mean ± std
    preset: str = "standard"  # DATASETS.SHAPES.PRESET of every row
    # every row's initialisation: "scratch", or "shapes" = the overlay's R18-GN pre-trained once
    # on shapes crops (tools/pretrain_shapes_backbone.BENCHMARK_PRETRAIN; the ImageNet stand-in)
    backbone: str = "scratch"
    rows: tuple[str, ...] = ()  # the default entries this schedule shows (by name; () = all)
    jobs: int = 1  # rows trained at once, in worker processes (then measured one at a time)
    grid: bool = True  # Visualizer grid of a few test images through every row (<stem>_grid.png)
    ims_per_batch: int = 8  # BASE_LR is scaled linearly when a config's batch differs
    num_workers: int = 2
    input_size: int = 128  # test-time short side, and the HxW of the latency/GFLOPs input
    image_size: int | None = None  # DATASETS.SHAPES.IMAGE_SIZE
    num_train: int | None = None
    num_val: int | None = None
    warmup: int = 5  # latency warm-up runs
    repeats: int = 20  # timed latency runs (median reported)
    timing_iters: int = 20  # training iterations timed when --weights skips training
    threads: int = 0  # torch threads (0: torch's default)
    device: str = ""  # "" : cuda when available, else cpu
    opts: tuple[str, ...] = field(default_factory=tuple)  # KEY VALUE for every row, applied last


#: The input of the quick and cpu schedules: `shapes` (standard preset) at 96 px, trained at
#: short sides 80-112 (multi-scale, as the papers' COCO recipes), tested at 96.
_SHAPES_96 = (
    "INPUT.MIN_SIZE_TRAIN",
    "(80, 88, 96, 104, 112)",
    "INPUT.MAX_SIZE_TRAIN",
    "192",
    "INPUT.MAX_SIZE_TEST",
    "192",
)
#: One row per method plus Mask R-CNN, and FastInst's panoptic and semantic rows (the quick
#: schedule's budget; ``--all-rows`` for every default entry).
QUICK_ROWS = (
    "Mask R-CNN R18-FPN-GN",
    "K-Net R18",
    "QueryInst R18-FPN",
    "FastInst-D1 R18",
    "FastInst-D1 R18 (panoptic)",
    "FastInst-D1 R18 (semantic)",
    "EmbedMask R18-FPN",
)

#: Named schedules (docs/benchmark.md). All run the standard `shapes` preset at 96 px, 600 train /
#: 100 val images, 8 images per batch, each config's own optimizer and LR.
#: "quick" (``make demo``): the 7 ``QUICK_ROWS`` from scratch, 600 iterations each, two rows
#: training at once (1 thread each; then each row is evaluated and timed alone): within 30
#: minutes on an idle 2-core CPU, install included. Measured at 96 px, 1 thread, s/iter: Mask
#: R-CNN 1.01, K-Net 0.30, QueryInst 0.66, FastInst 0.33-0.35, EmbedMask 0.69.
#: "cpu": the same rows and budget from the `shapes`-pre-trained R18-GN (the ImageNet stand-in,
#: ``--backbone shapes``, pre-trained once in ~1 minute and cached), three seeds (mean ± std;
#: ties marked): three times the quick run's training, about 80 minutes on an idle 2-core CPU.
#: (Its earlier definition, every row for 1200 iterations from scratch, measured out at 3 hours.)
#: "full": every config's own documented `shapes` schedule (600 x 8 images at 128 px).
SCHEDULES: dict[str, dict[str, Any]] = {
    "quick": {
        "max_iter": 600,
        "ims_per_batch": 8,
        "num_workers": 1,
        "jobs": 2,
        "image_size": 96,
        "num_train": 600,
        "num_val": 100,
        "input_size": 96,
        "repeats": 10,
        "warmup": 3,
        "rows": QUICK_ROWS,
        "opts": _SHAPES_96,
    },
    "cpu": {
        "max_iter": 600,
        "ims_per_batch": 8,
        "num_workers": 1,
        "jobs": 2,
        "seeds": (1, 2, 3),
        "backbone": "shapes",
        "image_size": 96,
        "num_train": 600,
        "num_val": 100,
        "input_size": 96,
        "repeats": 10,
        "warmup": 3,
        "rows": QUICK_ROWS,
        "opts": _SHAPES_96,
    },
    "full": {},
}


BACKBONES = ("scratch", "shapes")


def settings_for(schedule: str, **overrides: Any) -> Settings:
    """The :class:`Settings` of a named schedule, with ``overrides`` (None values ignored)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: expected one of {sorted(SCHEDULES)}")
    if overrides.get("backbone") not in (None, *BACKBONES):
        raise ValueError(f"backbone {overrides['backbone']!r}: expected one of {list(BACKBONES)}")
    s = replace(Settings(schedule=schedule), **SCHEDULES[schedule])
    extra = tuple(overrides.pop("opts", None) or ())
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    return replace(s, opts=(*s.opts, *extra))  # the schedule's overrides, then the caller's


def split_present(entries: Sequence[Entry]) -> tuple[list[Entry], list[Entry]]:
    """(entries whose config file exists, entries whose config file is missing)."""
    present = [e for e in entries if os.path.isfile(e.path)]
    return present, [e for e in entries if not os.path.isfile(e.path)]


def undiscovered_configs(entries: Sequence[Entry]) -> list[str]:
    """Method `shapes` configs in the tree that no entry names (repo-relative paths)."""
    known = {os.path.realpath(e.path) for e in entries}
    found = []
    projects = os.path.join(REPO, "projects")
    for p in sorted(os.listdir(projects)) if os.path.isdir(projects) else []:
        d = os.path.join(projects, p, "configs", "shapes")
        for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            path = os.path.join(d, f)
            if f.endswith(".yaml") and os.path.realpath(path) not in known:
                found.append(os.path.relpath(path, REPO))
    return found


def setup_logging(output_dir: str) -> None:
    """Everything to ``<output_dir>/log.txt``; warnings and errors also to the console."""
    os.makedirs(output_dir, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_queryseg_bench", False):
            root.removeHandler(h)
    fh = logging.FileHandler(os.path.join(output_dir, "log.txt"))
    fh.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s"))
    ch = Progress.console_handler()
    ch.setLevel(logging.WARNING)
    for h in (fh, ch):
        h._queryseg_bench = True
        root.addHandler(h)


def run_entries(
    entries: Sequence[Entry],
    settings: Settings,
    output_dir: str,
    *,
    title: str,
    progress: bool = True,
    notes: Sequence[str] = (),
    stem: str = "benchmark",
    on_row: Callable[[dict], None] | None = None,
) -> tuple[list[dict], dict[str, str]]:
    """Measure every entry and write ``<stem>.{md,csv,png}`` under ``output_dir`` (rewritten
    after every row, so that an interrupted run keeps the rows it finished).

    ``notes`` are added under the table (e.g. configs that were skipped).

    Returns:
        (rows: one dict per entry with the table's columns, header: the run-wide settings).
    """
    import torch

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    measurer = Measurer(settings, output_dir)
    bar = Progress([measurer.cost(e) for e in entries], enabled=progress)
    rows: list[dict] = []
    start = time.perf_counter()
    header = measurer.header(0.0)
    seeds = settings.seeds or (settings.seed,)

    def tag(seed: int) -> str:
        return f"s{seed}" if len(seeds) > 1 else ""

    trained: dict[tuple[int, int], Any] = {}
    todo = [(i, seed) for i, e in enumerate(entries) if e.weights is None for seed in seeds]
    if settings.jobs > 1 and len(todo) > 1:
        # train in parallel, then evaluate and time each row alone (an otherwise idle machine)
        from common.data.shapes import configure_shapes_from_cfg

        for i, _seed in todo[:1]:  # generate the data once, before the workers start
            configure_shapes_from_cfg(measurer.build_cfg(entries[i], output_dir), generate=True)
        jobs = [
            (
                replace(settings, seed=seed),
                entries[i],
                row_dir(output_dir, i, entries[i].name, tag(seed)),
            )
            for i, seed in todo
        ]
        costs = [measurer.cost(entries[i]) for i, _ in todo]
        logger.info("training %d rows, %d at a time", len(jobs), settings.jobs)
        longest_first = sorted(range(len(jobs)), key=lambda k: -costs[k][0] * costs[k][1])
        done = train_parallel(
            jobs,
            settings.jobs,
            on_done=lambda k: bar.advance(costs[k][0] * 0.9 / len(seeds)),
            order=longest_first,
        )
        trained = {todo[k]: v for k, v in done.items()}
        measurer.parallel = settings.jobs
    for i, entry in enumerate(entries):
        bar.start_row(i, entry.name)
        runs = []
        for seed in seeds:
            measurer.settings = replace(settings, seed=seed)
            runs.append(
                measure_row(measurer, entry, bar, tag=tag(seed), trained=trained.get((i, seed)))
            )
        measurer.settings = settings
        row = aggregate_seeds(runs, seeds) if len(seeds) > 1 else runs[0]
        rows.append(row)
        if on_row is not None:
            on_row(row)
        # rewrite the outputs after every row: a long run that stops still leaves its table
        header = measurer.header(time.perf_counter() - start)
        pending = [f"not run yet: {e.name}" for e in entries[i + 1 :]]
        write_outputs(rows, header, output_dir, title=title, notes=[*notes, *pending], stem=stem)
    bar.close()
    return rows, header


def write_outputs(
    rows: list[dict],
    header: dict[str, str],
    output_dir: str,
    *,
    title: str,
    notes: Sequence[str] = (),
    stem: str = "benchmark",
) -> dict[str, str]:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.png``; returns their paths by extension."""
    paths = {ext: os.path.join(output_dir, f"{stem}.{ext}") for ext in ("md", "csv", "png")}
    with open(paths["md"], "w") as f:
        f.write(render_markdown(rows, header, title=title, notes=notes))
    write_csv(rows, header, paths["csv"])
    plot_speed_accuracy(rows, paths["png"], title=title)
    if any(r.get("_panels") for r in rows):
        paths["grid"] = os.path.join(output_dir, f"{stem}_grid.png")
        write_grid(rows, paths["grid"])
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", nargs="+", help="configs to compare (default: DEFAULT_ENTRIES)")
    p.add_argument("--names", nargs="+", help="row labels for --config (default: file stems)")
    p.add_argument(
        "--weights",
        nargs="+",
        help="one checkpoint per --config ('-' trains that one) instead of training",
    )
    p.add_argument("--schedule", default="quick", choices=sorted(SCHEDULES))
    p.add_argument("--max-iter", type=int, help="training iterations (overrides the schedule)")
    p.add_argument("--output", default=os.path.join(REPO, "output", "benchmark"))
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run every row once per seed; cells show mean ± std, ties are marked",
    )
    p.add_argument("--preset", help="DATASETS.SHAPES.PRESET of every row (default: standard)")
    p.add_argument(
        "--backbone",
        choices=BACKBONES,
        help="every row's start: scratch, or the R18-GN pre-trained once on shapes crops "
        "(cached under $DETECTRON2_DATASETS/shapes/pretrained/)",
    )
    p.add_argument(
        "--all-rows",
        action="store_true",
        help="every default entry, also where the schedule shows fewer",
    )
    p.add_argument("--ims-per-batch", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--input-size", type=int)
    p.add_argument("--image-size", type=int, help="DATASETS.SHAPES.IMAGE_SIZE")
    p.add_argument("--num-train", type=int)
    p.add_argument("--num-val", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--timing-iters", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--jobs",
        type=int,
        help="rows trained at once (worker processes, each with "
        "cores/jobs threads); evaluation and timing stay one row at a time",
    )
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--title", default="QuerySeg benchmark on shapes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the default entries and exit")
    add_runtime_arguments(p)
    p.add_argument("opts", nargs="*", help="KEY VALUE overrides for every row (anywhere)")
    return p


# ---- inference runtimes (tools/bench_runtime.py) ---------------------------------------------
def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``--runtime`` / ``--fast``: the runtime table instead of the shapes benchmark."""
    p.add_argument(
        "--runtime",
        nargs="+",
        choices=RUNTIMES,
        help="compare inference runtimes at each method's official test size instead",
    )
    p.add_argument(
        "--fast", action="store_true", help="--runtime eager fast (MODEL.FAST_INFERENCE)"
    )
    p.add_argument(
        "--runtime-models",
        nargs="+",
        default=list(RUNTIME_MODELS),
        metavar="NAME",
        help=f"models of the runtime table (default: all of {list(RUNTIME_MODELS)})",
    )
    p.add_argument("--runtime-threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops (1 thread)")
    p.add_argument(
        "--compile-probe", action="store_true", help="also time torch.compile on the backbone"
    )


def runtime_main(args: argparse.Namespace) -> int:
    """The runtime table (and profiles), printed and written to ``--output``/runtimes.md."""
    runtimes = list(args.runtime or [])
    if args.fast:
        runtimes = list(dict.fromkeys(["eager", *runtimes, "fast"]))
    text = run_runtimes(
        args.runtime_models,
        runtimes,
        args.runtime_threads,
        args.timing_iters or 3,
        args.opts,
        profile=args.profile,
        repo=REPO,
    )
    if args.compile_probe:
        for name in args.runtime_models:
            config, size = RUNTIME_MODELS[name]
            for t in args.runtime_threads:
                probe = compile_probe(os.path.join(REPO, config), size, t, opts=args.opts)
                text += "\n\n" + probe
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "runtimes.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


def _move_trailing_opts(args: argparse.Namespace) -> None:
    """``--config a.yaml b.yaml KEY VALUE``: the list options swallow trailing overrides; give
    them back to ``opts`` (configs end in .yaml/.yml; names and weights: one per config)."""
    if not args.config:
        return
    n = next(
        (i for i, c in enumerate(args.config) if not c.endswith((".yaml", ".yml"))),
        len(args.config),
    )
    spill, args.config = args.config[n:], args.config[:n]
    for flag in ("names", "weights"):
        values = getattr(args, flag)
        if values and len(values) > len(args.config):
            spill += values[len(args.config) :]
            setattr(args, flag, values[: len(args.config)])
    args.opts = [*spill, *(args.opts or [])]


def entries_from_args(args: argparse.Namespace) -> list[Entry]:
    _move_trailing_opts(args)
    if not args.config:
        if args.names:
            raise SystemExit("--names needs --config")
        if not args.weights:
            return list(DEFAULT_ENTRIES)
        if len(args.weights) != len(DEFAULT_ENTRIES):
            raise SystemExit(
                f"--weights without --config: one per default entry "
                f"({len(DEFAULT_ENTRIES)}, '-' trains that one), got {len(args.weights)}"
            )
        return [e if w == "-" else replace(e, weights=os.path.abspath(w))
                for e, w in zip(DEFAULT_ENTRIES, args.weights)]  # fmt: skip
    for flag in ("names", "weights"):
        given = getattr(args, flag)
        if given and len(given) != len(args.config):
            raise SystemExit(f"--{flag}: {len(given)} values for {len(args.config)} --config")
    names = args.names or [os.path.splitext(os.path.basename(c))[0] for c in args.config]
    weights = args.weights or ["-"] * len(args.config)
    return [
        Entry(n, os.path.abspath(c), weights=None if w == "-" else os.path.abspath(w))
        for n, c, w in zip(names, args.config, weights)
    ]


def settings_from_args(args: argparse.Namespace) -> Settings:
    return settings_for(
        args.schedule,
        max_iter=args.max_iter,
        seed=args.seed,
        seeds=tuple(args.seeds) if args.seeds else None,
        preset=args.preset,
        backbone=args.backbone,
        ims_per_batch=args.ims_per_batch,
        num_workers=args.num_workers,
        input_size=args.input_size,
        image_size=args.image_size,
        num_train=args.num_train,
        num_val=args.num_val,
        warmup=args.warmup,
        repeats=args.repeats,
        timing_iters=args.timing_iters,
        threads=args.threads,
        jobs=args.jobs,
        device=args.device,
        opts=tuple(args.opts or ()),
    )


def schedule_rows(entries: Sequence[Entry], settings: Settings) -> tuple[list[Entry], list[str]]:
    """The default entries a schedule shows (``Settings.rows``; all when empty), and a note for
    the table naming the rows left out."""
    if not settings.rows:
        return list(entries), []
    unknown = set(settings.rows) - {e.name for e in entries}
    if unknown:
        raise SystemExit(f"schedule {settings.schedule!r} names unknown rows {sorted(unknown)}")
    left = [e.name for e in entries if e.name not in settings.rows]
    shown = [e for e in entries if e.name in settings.rows]
    note = (
        f"the {settings.schedule} schedule shows {len(shown)} of the {len(entries)} default "
        f"rows (`--all-rows` for every one); not shown: {', '.join(left)}"
    )
    return shown, [note]


def report_missing(entries: Sequence[Entry], missing: Sequence[Entry], discover: bool) -> None:
    """Console notes for configs not there yet and (``discover``) `shapes` configs no entry
    names."""
    for e in missing:
        print(f"note: skipping {e.name!r}: {e.config} is not present yet", file=sys.stderr)
    for path in undiscovered_configs(entries) if discover else []:
        print(
            f"note: {path} is not in the default list (pass --config to include it)",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.runtime or args.fast:
        return runtime_main(args)
    entries = entries_from_args(args)
    if args.list:
        for e in entries:
            state = "present" if os.path.isfile(e.path) else "MISSING"
            print(f"{state:8s} {e.name:28s} {e.config}")
        return 0
    settings = settings_from_args(args)
    notes = []
    if not args.config and not args.weights and not args.all_rows:
        entries, notes = schedule_rows(entries, settings)
    present, missing = split_present(entries)
    report_missing(entries, missing, discover=not args.config)
    if not present:
        print("error: none of the configs is present", file=sys.stderr)
        return 2
    setup_logging(args.output)
    t0 = time.perf_counter()
    notes += [f"not run: `{e.config}` (config file not present yet)" for e in missing]
    rows, _ = run_entries(
        present, settings, args.output, title=args.title, progress=not args.no_progress, notes=notes
    )
    with open(os.path.join(args.output, "benchmark.md")) as f:
        print(f.read())
    print(f"wrote {args.output}/benchmark.{{md,csv,png}} in {time.perf_counter() - t0:.0f} s")
    failed = [r["name"] for r in rows if r.get("error")]
    if failed:
        print(
            f"error: {len(failed)} row(s) failed: {', '.join(failed)} (see log.txt)",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
