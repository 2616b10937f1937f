"""Helpers of the parity tests (see ``tests/parity/conftest.py`` for the suite's interface).

- :func:`perturb_state_dict`: random weights in any layout, with every tensor moved off its
  init (BatchNorm statistics and LayerNorm/BN affine included), so no layer is an identity.
- :func:`diff`: max absolute and relative difference of two tensors.
- :class:`ParityTable`: the rows a test compares; the session prints them and writes
  ``output/parity/parity_table.md`` (the closing note's table).
- :func:`mm_config`, :func:`build_mm_model`: a reference model from the configs shipped in the
  mmdet / mmseg wheels (``<package>/.mim/configs``).
- :data:`KNET_ADE20K_ROWS`, :func:`mmseg_knet_reference`: K-Net's seven released ADE20K rows and
  their mmseg models built on the CPU (the parity tests and ``scripts/knet_ade20k_layouts.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


def perturb_state_dict(
    state: Mapping[str, torch.Tensor], seed: int, rel: float = 0.3
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` where every floating tensor is moved by seeded noise.

    Each float tensor ``t`` becomes ``t + rel * s * N(0, 1)`` with ``s`` its std (1 for a
    constant tensor: LayerNorm/BN weights and biases, zero biases, embeddings' constant columns);
    ``running_var`` becomes ``U(0.5, 1.5) * max(t, 1e-2)`` (positive); integer tensors (BN
    counters) get a random count. Keys are sorted, so the result depends only on ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(state):
        t = state[key]
        if not t.is_floating_point():
            out[key] = torch.randint(1, 1000, t.shape, generator=g).to(t.dtype)
            continue
        t64 = t.detach().double()
        if key.endswith("running_var"):
            new = torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5
            new = new * t64.clamp(min=1e-2)
        else:
            s = float(t64.std()) if t.numel() > 1 else 0.0
            if not math.isfinite(s) or s < 1e-6:
                s = 1.0
            new = t64 + rel * s * torch.randn(t.shape, generator=g, dtype=torch.float64)
        out[key] = new.to(t.dtype)
    return out


def diff(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |ours - ref|, that divided by max |ref|) in float64; shapes must agree."""
    if tuple(ours.shape) != tuple(ref.shape):
        raise AssertionError(f"shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    if a.numel() == 0:
        return 0.0, 0.0
    abs_diff = float((a - b).abs().max())
    scale = float(b.abs().max())
    return abs_diff, abs_diff / scale if scale > 0 else abs_diff


@dataclass
class ParityTable:
    """Rows ``(case, tensor, dtype, max abs, max rel)``; :meth:`add` returns the differences."""

    rows: list[tuple[str, str, str, float, float]] = field(default_factory=list)

    def add(self, case: str, tensor: str, ours: torch.Tensor, ref: torch.Tensor):
        abs_diff, rel_diff = diff(ours, ref)
        dtype = str(ref.dtype).replace("torch.", "")
        self.rows.append((case, tensor, dtype, abs_diff, rel_diff))
        return abs_diff, rel_diff

    def check(self, case: str, tensor: str, ours, ref, rtol: float) -> None:
        """:meth:`add`, then assert ``max rel <= rtol`` naming the tensor."""
        abs_diff, rel_diff = self.add(case, tensor, ours, ref)
        assert rel_diff <= rtol, (
            f"{case} / {tensor}: max |diff| {abs_diff:.3g}, relative {rel_diff:.3g} > {rtol:g}"
        )

    def markdown(self) -> str:
        lines = ["| case | tensor | dtype | max abs diff | max rel diff |", "|---|---|---|---|---|"]
        for case, tensor, dtype, a, r in self.rows:
            lines.append(f"| {case} | {tensor} | {dtype} | {a:.3g} | {r:.3g} |")
        return "\n".join(lines) + "\n"


def mm_config(package: str, relpath: str, configs_dir: str | None = None):
    """An mmengine ``Config`` of a config file shipped in ``<package>/.mim/configs/``.

    Args:
        package: "mmdet" or "mmseg".
        relpath: e.g. "queryinst/queryinst_r50_fpn_1x_coco.py".
        configs_dir: another ``configs/`` folder to read it from (e.g. an unpacked wheel's).
    """
    import importlib

    from mmengine.config import Config

    if configs_dir is None:
        root = os.path.dirname(importlib.import_module(package).__file__)
        configs_dir = os.path.join(root, ".mim", "configs")
    return Config.fromfile(os.path.join(configs_dir, relpath))


def build_mm_model(scope: str, model_cfg) -> torch.nn.Module:
    """Build ``model_cfg`` in the registry of ``scope`` ("mmdet" or "mmseg") and run its
    ``init_weights`` (the reference's fresh initialisation)."""
    import importlib

    from mmengine.registry import init_default_scope

    init_default_scope(scope)
    importlib.import_module(f"{scope}.utils").register_all_modules(init_default_scope=False)
    registry = importlib.import_module(f"{scope}.registry").MODELS
    model = registry.build(model_cfg)
    model.init_weights()
    return model


#: K-Net's released ADE20K rows: QuerySeg config (projects/knet/configs/) -> mmseg 1.2.2 config
#: (configs/knet/)
KNET_ADE20K_ROWS = {
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


def sync_bn_to_bn(node) -> None:
    """Replace every ``type="SyncBN"`` in a (nested) mmengine config dict by ``"BN"``, in place:
    the same parameters and buffers, and buildable / runnable without a process group."""
    if isinstance(node, dict):
        if node.get("type") == "SyncBN":
            node["type"] = "BN"
        for v in node.values():
            sync_bn_to_bn(v)
    elif isinstance(node, list):
        for v in node:
            sync_bn_to_bn(v)


def mmseg_knet_reference(mm_cfg_name: str, configs_dir: str | None = None):
    """(model, mmengine ``Config``) of mmseg's ``configs/knet/<mm_cfg_name>``, built on the CPU:
    SyncBN -> BN, no pretrained backbone, ``init_weights()`` run (draws from torch's global RNG:
    seed it first for a reproducible model). ``configs_dir`` as in :func:`mm_config`."""
    cfg = mm_config("mmseg", f"knet/{mm_cfg_name}", configs_dir)
    model_cfg = cfg.model.to_dict()
    sync_bn_to_bn(model_cfg)
    model_cfg.pop("pretrained", None)
    model_cfg["backbone"].pop("init_cfg", None)
    return build_mm_model("mmseg", model_cfg), cfg
