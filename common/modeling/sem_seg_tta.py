"""Multi-scale + flip test-time augmentation for semantic segmentation (``TEST.SEM_SEG_TTA``).

One wrapper for every QuerySeg model that outputs ``{"sem_seg": [C, H, W]}`` (K-Net semantic,
FastInst semantic), following mmseg's aug test: the image is resized to each ratio of the test
scale (``INPUT.MIN_SIZE_TEST`` x r, ``INPUT.MAX_SIZE_TEST`` x r, keep ratio: mmseg 0.x's
``MultiScaleFlipAug(img_scale=(2048, 512), img_ratios=...)`` with which the model-zoo numbers were
measured), each resized image is also run flipped, every output is brought back to the original
image size (flipped back) and the outputs are averaged; the evaluator takes the argmax.

What is averaged is the model's own ``sem_seg`` output: K-Net's are softmax probabilities (so
the average is mmseg's: ``SegTTAModel`` / 0.x ``aug_test`` average per-scale softmax maps resized
to the original image); FastInst's are Mask2Former's per-class scores (softmax classes x sigmoid
masks), averaged as Mask2Former's own semantic TTA does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from torch import nn

from common.data.validation import read_image_checked

__all__ = ["SemSegTTA", "sem_seg_tta_settings", "maybe_wrap_sem_seg_tta"]

logger = logging.getLogger(__name__)


def sem_seg_tta_settings(cfg: CfgNode) -> dict[str, Any]:
    """Read and check ``TEST.SEM_SEG_TTA`` (every key, enabled or not).

    Returns:
        {"enabled", "ratios", "flip"}.
    """
    t = cfg.TEST.SEM_SEG_TTA
    enabled, ratios, flip = bool(t.ENABLED), tuple(float(r) for r in t.RATIOS), bool(t.FLIP)
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(
            f"TEST.SEM_SEG_TTA.RATIOS={tuple(t.RATIOS)!r}: expected one or more positive ratios "
            "of the test scale"
        )
    if enabled and tuple(cfg.TEST.EVAL_TASKS) != ("sem_seg",):
        raise ValueError(
            "TEST.SEM_SEG_TTA.ENABLED averages only the 'sem_seg' output; it needs "
            f"TEST.EVAL_TASKS == ('sem_seg',), got {tuple(cfg.TEST.EVAL_TASKS)!r}"
        )
    return {"enabled": enabled, "ratios": ratios, "flip": flip}


class SemSegTTA(nn.Module):
    """Wraps a semantic model; ``forward`` takes the test mapper's inputs and returns
    ``[{"sem_seg": [C, height, width]}]``, the average over ratios x (no flip, flip)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        ratios: Sequence[float],
        flip: bool,
        min_size: int,
        max_size: int,
        image_format: str,
    ):
        """
        Args:
            model: returns ``{"sem_seg": [C, height, width]}`` per input in eval mode.
            ratios: scales of the test size; ``(1.0,)`` without flip is single-scale testing.
            flip: also run every scale mirrored (horizontally).
            min_size, max_size: the single-scale test size (INPUT.MIN/MAX_SIZE_TEST).
            image_format: INPUT.FORMAT (the original image is read again from ``file_name``).
        """
        super().__init__()
        self.model = model
        self.ratios = tuple(ratios)
        self.flip = flip
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.image_format = image_format
        self.training = model.training  # the wrapper follows the model's mode

    @classmethod
    def from_config(cls, cfg: CfgNode, model: nn.Module) -> SemSegTTA:
        s = sem_seg_tta_settings(cfg)
        return cls(
            model,
            ratios=s["ratios"],
            flip=s["flip"],
            min_size=cfg.INPUT.MIN_SIZE_TEST,
            max_size=cfg.INPUT.MAX_SIZE_TEST,
            image_format=cfg.INPUT.FORMAT,
        )

    def _original(self, x: dict[str, Any]) -> np.ndarray:
        """[H, W, C] uint8 image at its original size: read again from ``file_name`` (what the
        test mapper read), else the mapper's image resized back (Detectron2's TTA fallback)."""
        if "file_name" in x:
            return read_image_checked(x["file_name"], self.image_format)
        image = x["image"].permute(1, 2, 0).cpu().numpy()
        h, w = image.shape[:2]
        height, width = x.get("height", h), x.get("width", w)
        if (h, w) == (height, width):
            return image
        return T.ResizeTransform(h, w, height, width).apply_image(image)

    def augmented_inputs(self, x: dict[str, Any]) -> list[list[dict[str, Any]]]:
        """Per ratio, a batch: the resized image (and its mirror when ``flip``), each carrying
        the original ``height``/``width`` (the model resizes its output to them)."""
        image = self._original(x)
        height, width = x.get("height", image.shape[0]), x.get("width", image.shape[1])
        batches = []
        for r in self.ratios:
            # mmseg: img_scale (2048, 512) x r, truncated to int; keep-ratio rescale
            aug = T.ResizeShortestEdge(int(self.min_size * r), int(self.max_size * r), "choice")
            resized = aug.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
            views = [tensor] + ([tensor.flip(-1)] if self.flip else [])
            batches.append([{"image": v, "height": height, "width": width} for v in views])
        return batches

    def forward(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        if self.training:
            raise RuntimeError("SemSegTTA is for inference; train the wrapped model itself")
        results = []
        for x in batched_inputs:
            total, count = None, 0
            for batch in self.augmented_inputs(x):
                outputs = self.model(batch)
                for i, out in enumerate(outputs):
                    sem = out["sem_seg"].float()
                    if i == 1:  # the mirrored view: flip the output back
                        sem = sem.flip(-1)
                    total = sem if total is None else total + sem
                    count += 1
            results.append({"sem_seg": total / count})
        return results


def maybe_wrap_sem_seg_tta(cfg: CfgNode, model: nn.Module) -> nn.Module:
    """``model`` wrapped in :class:`SemSegTTA` when ``TEST.SEM_SEG_TTA.ENABLED``, else itself
    (the settings are read and checked either way)."""
    s = sem_seg_tta_settings(cfg)
    if s["enabled"]:
        logger.info(f"semantic TTA: ratios {s['ratios']}, flip {s['flip']}")
        return SemSegTTA.from_config(cfg, model)
    return model
