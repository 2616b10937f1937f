#!/usr/bin/env python
"""Record the state-dict layout and the optimizer's parameter groups of mmseg 1.2.2's seven K-Net
ADE20K models, as the fixture ``tests/data/knet_ade20k_mmseg_layouts.json.gz``.

The converter tests (``tests/tools/test_convert_knet_ade20k.py``) check every released layout
against this file, so they run without the references installed. Regenerate it with the
references of the parity suite (``python tests/parity/parity_refs.py`` installs them)::

    python scripts/knet_ade20k_layouts.py [--configs-dir DIR]

``--configs-dir``: mmseg's ``configs/`` folder (default: the one inside the installed mmseg
package, ``mmseg/.mim/configs``; the wheel of ``pip download --no-deps mmsegmentation==1.2.2``
holds it too). The rows and the models are the parity suite's
(``tests/parity/parity_utils.py``: ``KNET_ADE20K_ROWS``, ``mmseg_knet_reference``): built on
the CPU with BN for SyncBN (same parameters and buffers) and without loading the pretrained
backbones; the parameter groups are those of mmengine's ``DefaultOptimWrapperConstructor`` for
each config's ``optim_wrapper``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "data", "knet_ade20k_mmseg_layouts.json.gz")


def param_groups(model, cfg) -> list[list]:
    """[[lr, weight_decay, [parameter names]], ...] as mmengine's optimizer constructor sets
    them (parameters grouped by their (lr, weight decay))."""
    from mmengine.optim import build_optim_wrapper

    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[tuple[float, float], list[str]] = {}
    for group in wrapper.optimizer.param_groups:
        for p in group["params"]:
            out.setdefault((group["lr"], group["weight_decay"]), []).append(names[id(p)])
    return [[lr, wd, sorted(n)] for (lr, wd), n in sorted(out.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs-dir", default=None)
    parser.add_argument("--output", default=OUT)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(REPO, "tests", "parity"))
    import parity_refs
    from parity_utils import KNET_ADE20K_ROWS, mmseg_knet_reference

    versions = parity_refs.activate()
    ext = sys.modules["mmcv._ext"]
    if getattr(ext, "__spec__", None) is None:  # mmengine's mmcv_full_available() asks pkgutil
        import importlib.machinery

        ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)
    rows = {}
    for ours, theirs in KNET_ADE20K_ROWS.items():
        model, cfg = mmseg_knet_reference(theirs, args.configs_dir)
        opt = cfg.optim_wrapper.optimizer
        rows[ours] = {
            "mmseg_config": theirs,
            "state_dict": {k: list(v.shape) for k, v in model.state_dict().items()},
            "optimizer": {k: v for k, v in opt.items() if k != "type"} | {"type": opt.type},
            "param_groups": param_groups(model, cfg),
            "config": {
                "model": cfg.model.to_dict(),
                "optim_wrapper": cfg.optim_wrapper.to_dict(),
                "param_scheduler": list(cfg.param_scheduler),
                "train_cfg": cfg.train_cfg.to_dict(),
                "batch_size": cfg.train_dataloader.batch_size,
                "train_pipeline": list(cfg.train_dataloader.dataset.pipeline),
                "test_pipeline": list(cfg.test_dataloader.dataset.pipeline),
                "tta_pipeline": list(cfg.get("tta_pipeline", [])),
            },
        }
        print(f"{ours}: {len(rows[ours]['state_dict'])} tensors")  # noqa: T201
        del model
    with gzip.open(args.output, "wt") as f:
        json.dump({"versions": versions, "rows": rows}, f, sort_keys=True, default=str)
    print(f"wrote {args.output}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
