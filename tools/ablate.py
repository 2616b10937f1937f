#!/usr/bin/env python
"""Ablation runner: one base config plus named sets of overrides, collected into one table with
the benchmark's columns (params, GFLOPs, latency, peak memory, train s/iter, AP/PQ/mIoU).

Definitions live in ``tools/ablations/<name>.yaml``::

    title: "K-Net: number of kernel update stages (paper Table 3a)"
    paper: "K-Net (NeurIPS 2021), ablation of S; COCO mask AP"   # the paper table it mirrors
    base: projects/knet/configs/shapes/knet_R18_shapes_instance.yaml
    overrides: []                      # optional, applied to every variant
    variants:                          # row label -> KEY VALUE list (in this order)
      1 stage: [MODEL.KNET.NUM_STAGES, 1]
      3 stages: [MODEL.KNET.NUM_STAGES, 3]
    reference:                         # optional: the paper's number for a row (a "Paper" column)
      3 stages: 34.7

Usage::

    python tools/ablate.py --list                       # shipped definitions, runnable or not
    python tools/ablate.py knet_stages [--schedule full] [--output DIR] [KEY VALUE ...]
    python tools/ablate.py path/to/def.yaml --variants "1 stage" "3 stages"
    python tools/ablate.py --config base.yaml --variant "no aux=MODEL.X.AUX False" ...

Every variant's config is merged before anything runs, so a misspelt key fails at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

_TOOLS = os.path.dirname(os.path.abspath(__file__))

if __package__:  # imported as ``tools.<name>`` (the tests, another tool)
    from .bench_core import Measurer
    from .benchmark import (
        REPO,
        SCHEDULES,
        Entry,
        run_entries,
        settings_for,
        setup_logging,
    )
else:  # run as a script: tools/ is sys.path[0] (Detectron2 installs a package `tools`)
    from bench_core import Measurer
    from benchmark import (
        REPO,
        SCHEDULES,
        Entry,
        run_entries,
        settings_for,
        setup_logging,
    )

ABLATIONS_DIR = os.path.join(_TOOLS, "ablations")


@dataclass
class Ablation:
    """A parsed ablation definition."""

    name: str
    title: str
    base: str  # repo-relative or absolute config path
    variants: dict[str, tuple[str, ...]]  # row label -> KEY VALUE overrides
    overrides: tuple[str, ...] = ()
    note: str = ""
    paper: str = ""  # the paper table this definition mirrors
    reference: dict[str, str] | None = None  # row label -> the paper's number for that row

    def entries(self, only: Sequence[str] | None = None) -> list[Entry]:
        """One benchmark :class:`Entry` per variant (all on one plot line)."""
        names = list(self.variants)
        if only:
            unknown = [n for n in only if n not in self.variants]
            if unknown:
                raise SystemExit(f"{self.name}: unknown variant(s) {unknown}; known: {names}")
            names = [n for n in names if n in only]
        return [
            Entry(n, self.base, overrides=(*self.overrides, *self.variants[n]), method=self.title)
            for n in names
        ]

    @property
    def base_path(self) -> str:
        return self.base if os.path.isabs(self.base) else os.path.join(REPO, self.base)


def _pairs(value: Any, where: str) -> tuple[str, ...]:
    """A KEY VALUE list from YAML (values may be numbers/bools/lists: turned into yacs text)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) % 2:
        raise ValueError(f"{where}: expected a [KEY, VALUE, ...] list, got {value!r}")
    out = []
    for i, v in enumerate(value):
        if i % 2 == 0 or isinstance(v, str):
            out.append(str(v))
        elif isinstance(v, (list, tuple)):
            out.append(repr(list(v)))
        else:
            out.append(repr(v))
    return tuple(out)


def load_ablation(path_or_name: str) -> Ablation:
    """Parse ``tools/ablations/<name>.yaml`` (or any path) into an :class:`Ablation`."""
    path = path_or_name
    if not os.path.isfile(path):
        path = os.path.join(ABLATIONS_DIR, f"{path_or_name}.yaml")
    if not os.path.isfile(path):
        known = ", ".join(list_ablations())
        raise SystemExit(f"no ablation definition {path_or_name!r} (known: {known})")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    for key in ("base", "variants"):
        if key not in raw:
            raise ValueError(f"{path}: missing {key!r}")
    if not isinstance(raw["variants"], dict) or not raw["variants"]:
        raise ValueError(f"{path}: 'variants' must be a non-empty mapping label -> overrides")
    name = os.path.splitext(os.path.basename(path))[0]
    return Ablation(
        name=name,
        title=str(raw.get("title", name)),
        base=str(raw["base"]),
        variants={str(k): _pairs(v, f"{path}: variant {k!r}") for k, v in raw["variants"].items()},
        overrides=_pairs(raw.get("overrides"), f"{path}: overrides"),
        note=str(raw.get("note", "")),
        paper=str(raw.get("paper", "")),
        reference=_reference(raw.get("reference"), raw["variants"], path),
    )


def _reference(value: Any, variants: dict, path: str) -> dict[str, str]:
    """The ``reference`` mapping (row label -> paper number), every label a variant's."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: 'reference' must map variant labels to the paper's numbers")
    unknown = [str(k) for k in value if str(k) not in {str(v) for v in variants}]
    if unknown:
        raise ValueError(f"{path}: 'reference' names no variant: {unknown}")
    return {str(k): str(v) for k, v in value.items()}


def config_state(ablation: Ablation) -> str:
    """Whether the definition's configs exist: "ready" (base present) or "MISSING <path>"."""
    return "ready" if os.path.isfile(ablation.base_path) else f"MISSING {ablation.base}"


def describe(ablation: Ablation) -> str:
    """``--list``'s entry for a definition: name, state, variants, title and paper table."""
    ref = ablation.reference or {}
    rows = ", ".join(f"{v} [{ref[v]}]" if v in ref else v for v in ablation.variants)
    return (
        f"{ablation.name}  ({config_state(ablation)})\n"
        f"    {ablation.title}\n"
        f"    paper: {ablation.paper or '(no paper table)'}\n"
        f"    base: {ablation.base}\n"
        f"    {len(ablation.variants)} variants: {rows}"
    )


def list_ablations() -> list[str]:
    """Names of the shipped definitions."""
    if not os.path.isdir(ABLATIONS_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(ABLATIONS_DIR) if f.endswith(".yaml"))


def ablation_from_args(config: str, variants: Sequence[str]) -> Ablation:
    """An ad-hoc ablation from ``--config`` and ``--variant "label=KEY VALUE ..."`` options."""
    parsed = {}
    for v in variants:
        label, sep, rest = v.partition("=")
        if not sep:
            raise SystemExit(f"--variant {v!r}: expected 'label=KEY VALUE ...'")
        parsed[label.strip()] = tuple(rest.split())
    base = os.path.abspath(config)
    return Ablation("adhoc", f"ablation of {os.path.basename(config)}", base, parsed)


def validate(ablation: Ablation, measurer: Measurer) -> None:
    """Merge every variant's config now and check that each key it sets is used by the model
    it builds (on the meta device, :meth:`common.engine.Trainer.dry_check_config`), so a bad
    key or a switch that does nothing fails before hours of training."""
    from common.engine import Trainer

    errors = []
    for e in ablation.entries():
        try:
            Trainer.dry_check_config(measurer.build_cfg(e, measurer.output_dir))
        except (KeyError, ValueError, FileNotFoundError) as err:
            errors.append(f"  {e.name!r}: {err}")
    if errors:
        raise SystemExit(f"ablation {ablation.name}: bad variant(s):\n" + "\n".join(errors))


def run_ablation(
    ablation: Ablation,
    settings: Any,
    output_dir: str,
    *,
    progress: bool = True,
    only: Sequence[str] | None = None,
) -> list[dict]:
    """Run every variant and write ``ablation.{md,csv,png}`` under ``output_dir``.

    Returns:
        one row dict per variant, in definition order.
    """
    os.makedirs(output_dir, exist_ok=True)
    validate(ablation, Measurer(settings, output_dir))
    notes = [f"base config `{ablation.base}`" + (f"; {ablation.note}" if ablation.note else "")]
    notes += [
        f"{n}: `{' '.join(ov) or '(base)'}`"
        for n, ov in ablation.variants.items()
        if not only or n in only
    ]
    ref = ablation.reference or {}
    if ablation.paper:
        notes.append(f"Paper (ref.): {ablation.paper} (the paper's own setting, not `shapes`)")
    rows, _ = run_entries(
        ablation.entries(only),
        settings,
        output_dir,
        title=ablation.title,
        progress=progress,
        notes=notes,
        stem="ablation",
        on_row=lambda row: row.__setitem__("paper", ref.get(row["name"], "")) if ref else None,
    )
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("ablation", nargs="?", help="a definition name (tools/ablations/) or path")
    p.add_argument("--list", action="store_true", help="list the shipped definitions")
    p.add_argument("--config", help="ad-hoc: base config (with --variant)")
    p.add_argument(
        "--variant", action="append", default=[], help="ad-hoc: 'label=KEY VALUE ...' (repeatable)"
    )
    p.add_argument("--variants", nargs="+", help="run only these variants of the definition")
    p.add_argument("--schedule", default="quick", choices=sorted(SCHEDULES))
    p.add_argument("--max-iter", type=int)
    p.add_argument("--ims-per-batch", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--input-size", type=int)
    p.add_argument("--num-train", type=int)
    p.add_argument("--num-val", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--output", help="default: output/ablations/<name>")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("opts", nargs="*", help="KEY VALUE overrides for every row (anywhere)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.list:
        for name in list_ablations():
            print(describe(load_ablation(name)))
        return 0
    if args.config:
        ablation = ablation_from_args(args.config, args.variant)
    elif args.ablation:
        ablation = load_ablation(args.ablation)
    else:
        raise SystemExit("give an ablation name/path, --list, or --config with --variant")
    if not os.path.isfile(ablation.base_path):
        print(
            f"note: ablation {ablation.name!r} not run: its base config {ablation.base} is not "
            "present yet",
            file=sys.stderr,
        )
        return 2
    output = args.output or os.path.join(REPO, "output", "ablations", ablation.name)
    setup_logging(output)
    settings = settings_for(
        args.schedule,
        max_iter=args.max_iter,
        ims_per_batch=args.ims_per_batch,
        num_workers=args.num_workers,
        input_size=args.input_size,
        num_train=args.num_train,
        num_val=args.num_val,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        opts=tuple(args.opts or ()),
    )
    t0 = time.perf_counter()
    rows = run_ablation(
        ablation, settings, output, progress=not args.no_progress, only=args.variants
    )
    with open(os.path.join(output, "ablation.md")) as f:
        print(f.read())
    print(f"wrote {output}/ablation.{{md,csv,png}} in {time.perf_counter() - t0:.0f} s")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
