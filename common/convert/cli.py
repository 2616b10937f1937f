"""The converters' command line (``tools/convert_*.py``): load safely, convert, check against
the QuerySeg model a config builds, and write only when every key maps."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from detectron2.modeling import build_model

from common.convert.core import (
    CheckpointError,
    ConversionReport,
    check_against_model,
    extract_model_state,
    load_checkpoint_file,
    save_converted,
)
from common.engine.config import get_cfg, merge_config
from common.engine.launch import setup_queryseg


def model_from_config(config_file: str, opts: Sequence[str] = ()) -> tuple[torch.nn.Module, Any]:
    """Build the (randomly initialised) CPU model a converted checkpoint is checked against."""
    setup_queryseg()
    cfg = get_cfg()
    merge_config(cfg, config_file, [*opts, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    cfg.freeze()
    model = build_model(cfg)
    model.eval()
    return model, cfg


def converter_main(
    description: str,
    convert: Callable[[dict[str, torch.Tensor], Any], tuple[dict, ConversionReport]],
    default_config: str | None,
    argv: Sequence[str] | None = None,
    formats: Sequence[str] = (),
    target: Callable[[torch.nn.Module], Mapping[str, torch.Tensor]] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Shared CLI of ``tools/convert_*.py``: load (safely), convert, check against the QuerySeg
    model built from ``--config-file``, and write only when every key maps.

    ``convert(state, args)`` returns the converted state and its report; ``args.format`` holds the
    chosen ``--format`` when ``formats`` is given, ``args.model``/``args.cfg`` the model built
    from ``--config-file`` and its config (``None`` without one), so that a conversion can ask it
    (e.g. which norms keep a BatchNorm counter). ``target(model)`` selects the part of the model's
    state the result must match exactly (default: all of it, and the result records the
    meta-architecture); a backbone initialisation passes its backbone part and records none,
    since one backbone file serves every method. ``add_arguments(parser)`` adds a converter's own
    options (they reach ``convert`` in ``args``).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("src", help="the official checkpoint (.pth / .pkl)")
    parser.add_argument("dst", help="output .pth for MODEL.WEIGHTS")
    parser.add_argument("--config-file", default=default_config,
                        help="QuerySeg config whose model the result must load into "
                             f"(default: {default_config})")  # fmt: skip
    if formats:
        parser.add_argument("--format", choices=list(formats), default=formats[0],
                            help="source layout")  # fmt: skip
    parser.add_argument(
        "--trust",
        action="store_true",
        help="allow arbitrary pickled objects in src (only for files you trust)",
    )
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument(
        "opts", nargs="*", help="KEY VALUE config overrides (anywhere after src dst)"
    )
    args = parser.parse_intermixed_args(argv)
    state = extract_model_state(load_checkpoint_file(args.src, trusted=args.trust), args.src)
    args.model, args.cfg = (
        model_from_config(args.config_file, args.opts) if args.config_file else (None, None)
    )
    try:
        converted, report = convert(state, args)
    except CheckpointError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    meta = None
    if args.model is not None:
        check_against_model(converted, target(args.model) if target else args.model, report)
        meta = None if target else type(args.model).__name__
    try:
        save_converted(converted, report, args.dst, args.src, meta)
    except CheckpointError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    checked = f" (checked against {args.config_file})" if args.config_file else ""
    sys.stdout.write(f"converted {len(state)} tensors into {len(converted)}: {args.dst}{checked}\n")
    return 0
