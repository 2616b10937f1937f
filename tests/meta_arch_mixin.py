"""One end-to-end test body every QuerySeg meta-architecture (and each baseline) reuses.

Subclass it in ``tests/projects/<p>/test_<p>_meta_arch.py``::

    class TestKNetInstance(MetaArchTestMixin):
        config_file = "projects/knet/configs/shapes/knet_R18_shapes_instance.yaml"
        task = "instance"                      # "instance" | "panoptic" | "semantic"
        overrides = ["MODEL.KNET.NUM_STAGES", "1"]   # optional: make it small/fast
        expected_loss_keys = {"loss_mask_s0", ...}   # optional: keys that must be present

It builds the model from the YAML on the CPU (no weights) and checks, on synthetic batches made
here (so the test needs no dataset on disk):
- training on a full, a half-empty (one image without instances) and an empty batch gives a dict
  of finite scalar losses with a gradient for the loss, the same keys in all three;
- evaluation returns Detectron2's output format for the task, at the requested ``height``/``width``
  when given and at the input size when not.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances
from detectron2.utils.events import EventStorage

from common.engine import get_cfg, merge_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """[n,h,w] bool: random axis-aligned ellipses, each at least 6x6 pixels."""
    masks = np.zeros((n, h, w), bool)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        ry, rx = rng.integers(3, h // 3), rng.integers(3, w // 3)
        cy, cx = rng.integers(ry, h - ry), rng.integers(rx, w - rx)
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return masks


def make_batch(
    task: str,
    counts: list[int],
    num_things: int,
    num_stuff: int = 0,
    size: tuple[int, int] = (64, 96),
    seed: int = 0,
    with_targets: bool = True,
) -> list[dict]:
    """Synthetic mapper-format inputs.

    Args:
        task: "instance" | "panoptic" | "semantic".
        counts: number of thing instances per image (len = batch size).
        num_things, num_stuff: class counts (panoptic/semantic classes are things then stuff).
        size: (H, W) of every image.
    Returns:
        list of dicts with "image" [3,H,W] uint8, "height", "width" and, when ``with_targets``,
        "instances" (gt_classes, gt_masks, gt_boxes; panoptic adds stuff segments and
        gt_is_thing) and "sem_seg" [H,W] long for panoptic/semantic.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    batch = []
    for n in counts:
        d = {
            "image": torch.as_tensor(rng.integers(0, 255, (3, h, w), dtype=np.uint8)),
            "height": h,
            "width": w,
        }
        if with_targets:
            things = _random_masks(rng, n, h, w)
            thing_cls = rng.integers(0, num_things, n).tolist()
            masks, classes, is_thing = list(things), list(thing_cls), [True] * n
            sem = np.full((h, w), 255, np.int64)
            if num_stuff:
                stuff_map = (np.arange(w)[None, :] * num_stuff // w).repeat(h, 0)
                visible = ~things.any(0) if n else np.ones((h, w), bool)
                for s in range(num_stuff):
                    m = (stuff_map == s) & visible
                    if m.any():
                        masks.append(m)
                        classes.append(num_things + s)
                        is_thing.append(False)
            for m, c in zip(masks, classes):
                sem[m] = c
            if task == "semantic":
                present = [c for c in range(num_things + num_stuff) if (sem == c).any()]
                masks, classes = [sem == c for c in present], present
                is_thing = [c < num_things for c in present]
            inst = Instances((h, w))
            inst.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
            stacked = np.stack(masks) if masks else np.zeros((0, h, w), bool)
            inst.gt_masks = BitMasks(torch.as_tensor(stacked))
            inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
            if task == "panoptic":
                inst.gt_is_thing = torch.as_tensor(is_thing, dtype=torch.bool)
            d["instances"] = inst
            if task in ("panoptic", "semantic"):
                d["sem_seg"] = torch.as_tensor(sem)
        batch.append(d)
    return batch


class MetaArchTestMixin:
    """Mixin: set ``config_file`` (repo-relative), ``task``; optionally ``overrides`` and
    ``expected_loss_keys``."""

    config_file: str = ""
    task: str = "instance"
    overrides: list[str] = []
    expected_loss_keys: set[str] | None = None
    image_size: tuple[int, int] = (64, 96)

    # ---- helpers -----------------------------------------------------------------------
    def build_cfg(self):
        cfg = get_cfg()
        merge_config(cfg, os.path.join(REPO, self.config_file), [*self.overrides])
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.WEIGHTS = ""
        return cfg

    def class_counts(self, cfg) -> tuple[int, int]:
        """(num_things, num_stuff) the model predicts; override for unusual heads."""
        from detectron2.data import MetadataCatalog

        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None
        things = len(getattr(meta, "thing_classes", []) or []) or 3
        if self.task == "instance":
            return things, 0
        stuff_all = getattr(meta, "stuff_classes", []) or []
        if self.task == "semantic":
            return 0, len(stuff_all) or 5
        return things, max(len(stuff_all) - things, 1)

    @pytest.fixture(scope="class")
    def model(self):
        torch.manual_seed(0)
        cfg = self.build_cfg()
        m = build_model(cfg)
        m.qs_class_counts = self.class_counts(cfg)
        return m

    def batch(self, model, counts, **kw):
        things, stuff = model.qs_class_counts
        if self.task == "semantic":
            # semantic datasets list every class as "stuff"; split them for the generator
            things, stuff = max(stuff // 2, 1), stuff - max(stuff // 2, 1)
        return make_batch(self.task, counts, things, stuff, size=self.image_size, **kw)

    def _train_step(self, model, counts):
        model.train()
        with EventStorage(0):  # as inside Detectron2's trainers
            losses = model(self.batch(model, counts))
        assert isinstance(losses, dict) and losses, "training must return a non-empty loss dict"
        for k, v in losses.items():
            assert v.dim() == 0, f"{k} is not a scalar: shape {tuple(v.shape)}"
            assert torch.isfinite(v), f"{k} is not finite: {v}"
        total = sum(losses.values())
        model.zero_grad()
        total.backward()
        return losses

    # ---- tests -------------------------------------------------------------------------
    def test_train_full_half_empty_and_empty_batches(self, model):
        full = self._train_step(model, [3, 2])
        half = self._train_step(model, [2, 0])
        empty = self._train_step(model, [0, 0])
        assert set(full) == set(half) == set(empty), "loss keys must not depend on the batch"
        if self.expected_loss_keys is not None:
            missing = set(self.expected_loss_keys) - set(full)
            assert not missing, f"missing loss keys: {sorted(missing)}"
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads, "no parameter received a gradient"

    @pytest.mark.parametrize("with_size", [True, False])
    def test_inference_format(self, model, with_size):
        model.eval()
        batch = self.batch(model, [2, 1], with_targets=False)
        if with_size:
            for d in batch:
                d["height"], d["width"] = 2 * self.image_size[0], 2 * self.image_size[1] + 10
        else:
            for d in batch:
                d.pop("height"), d.pop("width")
        with torch.no_grad():
            outs = model(batch)
        assert len(outs) == len(batch)
        for d, out in zip(batch, outs):
            hw = (d.get("height", self.image_size[0]), d.get("width", self.image_size[1]))
            self.check_output(out, hw)

    def check_output(self, out: dict, hw: tuple[int, int]) -> None:
        """Detectron2's output format for the task, at image size ``hw``."""
        if self.task == "instance" or "instances" in out:
            inst = out["instances"]
            assert inst.image_size == hw
            for f in ("pred_classes", "scores", "pred_masks"):
                assert inst.has(f), f"instances lack {f}"
            assert inst.pred_masks.shape[-2:] == hw
            if len(inst):
                assert inst.scores.min() >= 0
            if inst.has("pred_boxes"):
                assert inst.pred_boxes.tensor.shape == (len(inst), 4)
        if self.task == "panoptic":
            pan, info = out["panoptic_seg"]
            assert tuple(pan.shape) == hw
            ids = set(torch.unique(pan).tolist()) - {0, -1}
            assert ids <= {s["id"] for s in info}
            for s in info:
                assert {"id", "category_id", "isthing"} <= set(s)
        if self.task == "semantic":
            sem = out["sem_seg"]
            assert sem.dim() == 3 and tuple(sem.shape[-2:]) == hw
