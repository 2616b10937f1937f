"""tools/pretrain_shapes_backbone.py: the crop classifier learns the shapes (slow), and the file it
writes initialises exactly the config's backbone (K-Net: ``backbone.``; QueryInst:
``backbone.bottom_up.``) through the strict checkpointer."""

from __future__ import annotations

import os

import pytest
import torch

from common.convert.cli import model_from_config
from common.convert.core import load_checkpoint_file
from common.engine.checkpoint import QSCheckpointer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.pretrain_shapes_backbone import bottom_up, object_crops, pretrain  # noqa: E402

KNET = os.path.join(REPO, "projects/knet/configs/shapes/knet_R18_shapes_instance.yaml")
QUERYINST = os.path.join(REPO, "projects/queryinst/configs/shapes/queryinst_R18_FPN_shapes.yaml")
SMALL = ["DATASETS.SHAPES.IMAGE_SIZE", "64", "DATASETS.SHAPES.NUM_VAL", "50"]


@pytest.fixture(autouse=True)
def _datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))


def test_crops_are_labelled_squares_around_every_object(tmp_path):
    from detectron2.data import DatasetCatalog

    from common.data.shapes import register_shapes

    register_shapes(image_size=64, num_train=3, num_val=1)
    dicts = DatasetCatalog.get("shapes_train")
    images, labels = object_crops(dicts, 16, "RGB")
    assert images.shape == (sum(len(d["annotations"]) for d in dicts), 3, 16, 16)
    assert images.dtype == torch.uint8 and labels.min() >= 0 and labels.max() < 5
    assert images.float().std() > 0


@pytest.mark.parametrize(
    "config,prefix", [(KNET, "backbone."), (QUERYINST, "backbone.bottom_up.")],
    ids=["knet", "queryinst"],
)  # fmt: skip
def test_written_backbone_loads_strictly_into_the_model(tmp_path, config, prefix):
    out = str(tmp_path / "backbone.pth")
    pretrain(config, out, SMALL, num_images=4, iters=2, batch=4, crop=16)
    state = load_checkpoint_file(out)["model"]
    model, _ = model_from_config(config, SMALL)
    assert set(state) == {k for k in model.state_dict() if k.startswith(prefix)}
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(prefix)}
    QSCheckpointer(model, strict=True).load(out)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert all(torch.equal(loaded[k], v) for k, v in before.items())  # heads untouched


def test_refuses_a_config_that_does_not_train_on_shapes(tmp_path):
    with pytest.raises(ValueError, match="coco_2017_train.*not a shapes split"):
        pretrain(KNET, str(tmp_path / "b.pth"), ["DATASETS.TRAIN", "('coco_2017_train',)"])
    assert not os.path.exists(tmp_path / "b.pth")


@pytest.mark.slow
def test_crop_classifier_learns_the_shapes(tmp_path):
    # the defaults at 64 px measured 76-78 % val accuracy (chance 20 %, 5 classes), ~2 min idle
    torch.set_num_threads(2)
    stats = pretrain(KNET, str(tmp_path / "b.pth"), SMALL)
    assert stats["num_classes"] == 5
    assert stats["val_acc"] > 0.6, stats


@pytest.fixture
def tiny_benchmark_pretrain(monkeypatch):
    """BENCHMARK_PRETRAIN at a size a test can afford (the keys, and so the cache name, stay)."""
    from tools import pretrain_shapes_backbone as psb

    small = {**psb.BENCHMARK_PRETRAIN, "num_images": 4, "iters": 2, "batch": 4, "crop": 16}
    monkeypatch.setattr(psb, "BENCHMARK_PRETRAIN", small)
    calls = []
    real = psb.pretrain

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(psb, "pretrain", counted)
    return calls


def test_benchmark_backbone_starts_every_quick_row_from_the_same_weights(
    tmp_path, tiny_benchmark_pretrain, monkeypatch
):
    """--backbone shapes: pre-trained once (cached), every row's MODEL.WEIGHTS initialises its
    bottom-up network exactly (strict load) with the same tensors, whatever its key prefix; the
    path is absolute (a relative $DETECTRON2_DATASETS resolved where the benchmark started)."""
    from tools import bench_core, benchmark

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DETECTRON2_DATASETS", "datasets")

    settings = benchmark.settings_for(
        "quick", backbone="shapes", image_size=64, num_train=4, num_val=2
    )
    measurer = bench_core.Measurer(settings, str(tmp_path / "out"))
    entries = benchmark.schedule_rows(benchmark.DEFAULT_ENTRIES, settings)[0]
    reference = None
    for entry in entries:
        cfg = measurer.build_cfg(entry, str(tmp_path / "out" / "row"))
        weights = cfg.MODEL.WEIGHTS
        assert os.path.isabs(weights), weights
        assert weights.startswith(str(tmp_path / "datasets" / "shapes" / "pretrained")), weights
        model, _ = model_from_config(entry.path, ["DATASETS.SHAPES.IMAGE_SIZE", "64"])
        QSCheckpointer(model, strict=True).load(weights)
        net, _ = bottom_up(model)
        state = net.state_dict()
        if reference is None:
            reference = state
        assert state.keys() == reference.keys(), entry.name
        assert all(torch.equal(state[k], reference[k]) for k in state), entry.name
    assert len(tiny_benchmark_pretrain) == 1  # pre-trained once for all rows
    header = measurer.header(0.0)
    assert header["init"].startswith(
        "R18-GN backbone pre-trained once on shapes crops (R18-GN_standard"
    )
    assert "init R18-GN" in benchmark.render_markdown([], header, title="t")


def test_benchmark_backbone_refuses_a_row_with_another_backbone(tmp_path, tiny_benchmark_pretrain):
    from tools import bench_core, benchmark

    settings = benchmark.settings_for("quick", backbone="shapes", image_size=64)
    entry = benchmark.Entry("K-Net R50", KNET, overrides=("MODEL.RESNETS.DEPTH", "50"))
    measurer = bench_core.Measurer(settings, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="K-Net R50: its backbone .* is not the R18-GN"):
        measurer.build_cfg(entry, str(tmp_path / "out" / "row"))
    clash = benchmark.settings_for(
        "quick", backbone="shapes", image_size=64, opts=("MODEL.WEIGHTS", "x.pth")
    )
    with pytest.raises(ValueError, match=r"MODEL.WEIGHTS .*\(--backbone shapes\)"):
        bench_core.Measurer(clash, str(tmp_path / "out")).build_cfg(entry, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="backbone 'imagenet'"):
        benchmark.settings_for("quick", backbone="imagenet")
