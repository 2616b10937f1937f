"""Multi-scale + flip semantic TTA (common.modeling.sem_seg_tta, ``TEST.SEM_SEG_TTA``) on
random-weight K-Net and FastInst semantic models and the tiny `shapes` split."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from common.data.mappers import build_mapper
from common.engine import get_cfg, merge_config
from common.modeling.sem_seg_tta import SemSegTTA, maybe_wrap_sem_seg_tta, sem_seg_tta_settings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
KNET = "projects/knet/configs/shapes/knet_upernet_R18_shapes_semantic.yaml"
FASTINST = "projects/fastinst/configs/shapes/fastinst_R18_D1_shapes_semantic.yaml"


def _cfg(config, shapes, *opts):
    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, config), [
        *shapes.cfg_opts, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        "DATASETS.TRAIN", f"('{shapes.sem_seg_train}',)",
        "DATASETS.TEST", f"('{shapes.sem_seg_val}',)", "INPUT.MIN_SIZE_TEST", "64", *opts,
    ])  # fmt: skip
    return cfg


@pytest.fixture(scope="module", params=[KNET, FASTINST], ids=["knet", "fastinst"])
def setup(request, shapes_tiny):
    cfg = _cfg(request.param, shapes_tiny)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    mapper = build_mapper(cfg, is_train=False)
    inputs = [mapper(d) for d in DatasetCatalog.get(shapes_tiny.sem_seg_val)[:2]]
    return cfg, model, inputs


def _wrap(cfg, model, ratios, flip):
    return SemSegTTA(model, ratios=ratios, flip=flip, min_size=cfg.INPUT.MIN_SIZE_TEST,
                     max_size=cfg.INPUT.MAX_SIZE_TEST, image_format=cfg.INPUT.FORMAT)  # fmt: skip


@torch.no_grad()
def test_one_scale_without_flip_is_single_scale_exactly(setup):
    cfg, model, inputs = setup
    tta = _wrap(cfg, model, (1.0,), False)
    for x in inputs:  # one image per batch, as the test loader gives them
        assert torch.equal(model([x])[0]["sem_seg"], tta([x])[0]["sem_seg"])


@torch.no_grad()
def test_the_switch_changes_the_outputs(setup):
    cfg, model, inputs = setup
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TEST.SEM_SEG_TTA.ENABLED = True
    wrapped = maybe_wrap_sem_seg_tta(cfg, model)
    assert isinstance(wrapped, SemSegTTA) and wrapped.ratios == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert wrapped.flip
    single, tta = model(inputs), wrapped(inputs)
    for x, a, b in zip(inputs, single, tta):
        assert b["sem_seg"].shape == a["sem_seg"].shape == (a["sem_seg"].shape[0], x["height"],
                                                             x["width"])  # fmt: skip
        assert (a["sem_seg"] - b["sem_seg"]).abs().max() > 1e-4
    # 6 scales x 2 views; the test scale x r (64 px short side: 32, 48, 64, 80, 96, 112)
    batches = wrapped.augmented_inputs(inputs[0])
    assert [len(b) for b in batches] == [2] * 6
    assert [min(b[0]["image"].shape[-2:]) for b in batches] == [32, 48, 64, 80, 96, 112]
    assert torch.equal(batches[0][1]["image"], batches[0][0]["image"].flip(-1))
    if cfg.MODEL.META_ARCHITECTURE == "KNetSemantic":  # softmax probabilities averaged
        total = tta[0]["sem_seg"].sum(0)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


@torch.no_grad()
def test_flip_is_consistent(setup):
    """In memory (no file): TTA(flip x) = flip(TTA(x)); a mirror-symmetric image gives a
    mirror-symmetric result equal to (m(x) + flip(m(x))) / 2."""
    cfg, model, inputs = setup
    image = inputs[0]["image"]
    h, w = image.shape[-2:]
    as_input = [{"image": image, "height": h, "width": w}]
    flipped = [{"image": image.flip(-1), "height": h, "width": w}]
    tta = _wrap(cfg, model, (0.75, 1.0, 1.5), True)
    a, b = tta(as_input)[0]["sem_seg"], tta(flipped)[0]["sem_seg"]
    assert torch.allclose(a.flip(-1), b, atol=1e-5)
    sym = torch.cat([image[..., : w // 2], image[..., : w // 2].flip(-1)], dim=-1)
    out = _wrap(cfg, model, (1.0,), True)([{"image": sym, "height": h, "width": w}])[0]["sem_seg"]
    m = model([{"image": sym, "height": h, "width": w}])[0]["sem_seg"]
    assert torch.allclose(out, out.flip(-1), atol=1e-6)
    assert torch.allclose(out, (m + m.flip(-1)) / 2, atol=1e-6)


def test_bad_settings_are_named(shapes_tiny):
    cfg = _cfg(KNET, shapes_tiny)
    cfg.defrost()
    cfg.TEST.SEM_SEG_TTA.RATIOS = (1.0, -0.5)
    with pytest.raises(ValueError, match="TEST.SEM_SEG_TTA.RATIOS"):
        sem_seg_tta_settings(cfg)
    cfg.TEST.SEM_SEG_TTA.RATIOS = (1.0,)
    cfg.TEST.SEM_SEG_TTA.ENABLED = True
    cfg.TEST.EVAL_TASKS = ("sem_seg", "panoptic_seg")
    with pytest.raises(ValueError, match="TEST.EVAL_TASKS"):
        sem_seg_tta_settings(cfg)


def test_train_net_eval_only_with_tta(tmp_path, shapes_tiny):
    """train_net.py --eval-only evaluates the wrapped model with the usual SemSegEvaluator."""
    cmd = [
        sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", KNET, "--eval-only",
        *shapes_tiny.cfg_opts, "MODEL.WEIGHTS", "", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TEST", "64", "TEST.SEM_SEG_TTA.ENABLED", "True",
        "TEST.SEM_SEG_TTA.RATIOS", "(0.75, 1.0)",
        "OUTPUT_DIR", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, DETECTRON2_DATASETS=shapes_tiny.root, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "semantic TTA: ratios (0.75, 1.0), flip True" in log
    assert "copypaste: mIoU" in log
