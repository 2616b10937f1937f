#!/usr/bin/env python
"""Record the state-dict layout and the optimizer's parameter groups of mmseg 1.2.2's seven K-Net
ADE20K models, as the fixture ``tests/data/knet_ade20k_mmseg_layouts.json.gz``.

The converter tests (``tests/tools/test_convert_knet_ade20k.py``) check every released layout
against this file, so they run without the references installed. Regenerate it with the
references of the parity suite (``python tests/parity/parity_refs.py`` installs them)::

    python scripts/knet_ade20k_layouts.py [--configs-dir DIR]

``--configs-dir``: mmseg's ``configs/`` folder (default: the one inside the installed mmseg
package, ``mmseg/.mim/configs``; the wheel of ``pip download --no-deps mmsegmentation==1.2.2``
holds it too). The models are built on the CPU with BN for SyncBN (same parameters and buffers)
and without loading the pretrained backbones; the parameter groups are those of mmengine's
``DefaultOptimWrapperConstructor`` for each config's ``optim_wrapper``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "data", "knet_ade20k_mmseg_layouts.json.gz")

#: QuerySeg config -> mmseg 1.2.2 config (configs/knet/), one per released model
ROWS = {
    "knet_fcn_R50-D8_80k_ade20k.yaml": "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512.py",
    "knet_pspnet_R50-D8_80k_ade20k.yaml": "knet-s3_r50-d8_pspnet_8xb2-adamw-80k_ade20k-512x512.py",
    "knet_deeplabv3_R50-D8_80k_ade20k.yaml": (
        "knet-s3_r50-d8_deeplabv3_8xb2-adamw-80k_ade20k-512x512.py"
    ),
    "knet_upernet_R50_80k_ade20k.yaml": "knet-s3_r50-d8_upernet_8xb2-adamw-80k_ade20k-512x512.py",
    "knet_upernet_SwinT_80k_ade20k.yaml": "knet-s3_swin-t_upernet_8xb2-adamw-80k_ade20k-512x512.py",
    "knet_upernet_SwinL_80k_ade20k.yaml": "knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-512x512.py",
    "knet_upernet_SwinL_80k_640_ade20k.yaml": (
        "knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-640x640.py"
    ),
}


def _sync_to_bn(node):
    if isinstance(node, dict):
        if node.get("type") == "SyncBN":
            node["type"] = "BN"
        for v in node.values():
            _sync_to_bn(v)
    elif isinstance(node, list):
        for v in node:
            _sync_to_bn(v)


def build_reference(config_path: str):
    """(mmseg model in eval mode, its mmengine Config); the refs must be importable."""
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(config_path)
    model_cfg = cfg.model.to_dict()
    _sync_to_bn(model_cfg)
    model_cfg.pop("pretrained", None)
    model_cfg["backbone"].pop("init_cfg", None)
    return MODELS.build(model_cfg).eval(), cfg


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

    versions = parity_refs.activate()
    ext = sys.modules["mmcv._ext"]
    if getattr(ext, "__spec__", None) is None:  # mmengine's mmcv_full_available() asks pkgutil
        import importlib.machinery

        ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)
    import mmseg

    configs = args.configs_dir or os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs")
    rows = {}
    for ours, theirs in ROWS.items():
        model, cfg = build_reference(os.path.join(configs, "knet", theirs))
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
