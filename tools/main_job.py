#!/usr/bin/env python
"""The README's main job (``make demo``): the side-by-side comparison of every method and the
Detectron2 baselines on `shapes`, printed as a table.

    python tools/main_job.py                     # quick schedule: < 30 min on an idle 2-core CPU
    python tools/main_job.py --schedule full     # each config's documented `shapes` schedule
    python tools/main_job.py --update-docs       # also refresh docs/benchmark.md and its plot

It is ``tools/benchmark.py`` over its default entries (see there for every option); outputs go to
``output/main_job_<schedule>/benchmark.{md,csv,png}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence

if __package__:  # imported as ``tools.<name>`` (the tests, another tool)
    from . import benchmark
else:  # run as a script: tools/ is sys.path[0] (Detectron2 installs a package `tools`)
    import benchmark

DOCS = os.path.join(benchmark.REPO, "docs", "benchmark.md")


def update_docs(output_dir: str, schedule: str) -> str:
    """Put the run's table between ``<!-- results:<schedule> -->`` markers in docs/benchmark.md
    and copy its plot to ``docs/benchmark_<schedule>.png`` (and its Visualizer grid, if any, to
    ``docs/benchmark_<schedule>_grid.png``); returns the plot's path."""
    plot = os.path.join(os.path.dirname(DOCS), f"benchmark_{schedule}.png")
    shutil.copyfile(os.path.join(output_dir, "benchmark.png"), plot)
    with open(os.path.join(output_dir, "benchmark.md")) as f:
        table = f.read().strip()
    start, end = f"<!-- results:{schedule} -->", f"<!-- /results:{schedule} -->"
    block = f"{start}\n{table}\n\n![speed-accuracy, {schedule}]({os.path.basename(plot)})\n"
    grid = os.path.join(output_dir, "benchmark_grid.png")
    if os.path.isfile(grid):
        target = os.path.join(os.path.dirname(DOCS), f"benchmark_{schedule}_grid.png")
        shutil.copyfile(grid, target)
        block += (
            f"\n![4 test images through every row (Detectron2 Visualizer), {schedule}]"
            f"({os.path.basename(target)})\n"
        )
    block += end
    text = open(DOCS).read() if os.path.isfile(DOCS) else "# Benchmark\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(DOCS, "w") as f:
        f.write(text)
    return plot


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", default="quick", choices=sorted(benchmark.SCHEDULES))
    p.add_argument("--output", help="default: output/main_job_<schedule>")
    p.add_argument(
        "--update-docs",
        action="store_true",
        help="write the table into docs/benchmark.md and copy the plot there",
    )
    p.add_argument("--no-progress", action="store_true")
    args, extra = p.parse_known_args(argv)
    output = args.output or os.path.join(benchmark.REPO, "output", f"main_job_{args.schedule}")
    t0 = time.perf_counter()
    rc = benchmark.main(
        [
            "--schedule",
            args.schedule,
            "--output",
            output,
            "--title",
            f"QuerySeg on shapes ({args.schedule} schedule)",
            *(["--no-progress"] if args.no_progress else []),
            *extra,
        ]
    )
    print(f"main job ({args.schedule}) finished in {(time.perf_counter() - t0) / 60:.1f} min")
    if args.update_docs and os.path.isfile(os.path.join(output, "benchmark.md")):
        print(
            f"updated {os.path.relpath(DOCS, benchmark.REPO)} and "
            f"{os.path.relpath(update_docs(output, args.schedule), benchmark.REPO)}"
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
