"""A corpus of broken inputs, generated here, and one test per case: each gets a one-line error
(or, where dropping is right, a warning) that names the culprit: the file, the annotation or
image id, the key or the value. Data errors are raised before any model is built.

The kill -9 / resume and checkpoint-write cases are in ``tests/test_exact_resume.py``; NaN/Inf
sampling locations in the compiled kernel in ``tests/common/ops/test_ms_deform_attn.py``."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from common.convert.core import CheckpointError, load_checkpoint_file
from common.data.validation import DataError, check_dataset_files, load_train_dicts
from common.engine import get_cfg, merge_config
from common.engine.checkpoint import QSCheckpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK_RCNN = os.path.join(REPO, "common/configs/baselines/mask_rcnn_R_18_FPN_gn_scratch_shapes.yaml")


def _one_line(msg: str) -> str:
    assert "\n" not in msg.strip(), f"not one line: {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# COCO JSON: a copy of the tiny `shapes` train JSON with one annotation broken
# ---------------------------------------------------------------------------------------------


def _broken_coco(shapes_tiny, tmp_path, name: str, breaks) -> tuple[str, str, dict]:
    """Register ``name`` as the tiny train JSON after ``breaks(data)``; returns the JSON path,
    the broken annotation's image file name and the annotation."""
    src = os.path.join(shapes_tiny.dataset_dir, "annotations", "instances_train.json")
    with open(src) as f:
        data = json.load(f)
    anno = breaks(data)
    path = str(tmp_path / f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    image_root = os.path.join(shapes_tiny.dataset_dir, "train")
    register_coco_instances(name, {}, path, image_root)
    image = next(i for i in data["images"] if i["id"] == anno["image_id"])
    return path, os.path.basename(image["file_name"]), anno


def _first_anno(data: dict) -> dict:
    return data["annotations"][0]


def _train_cfg(name: str):
    cfg = get_cfg()
    merge_config(cfg, MASK_RCNN, ["DATASETS.TRAIN", f"('{name}',)"])
    return cfg


def _set(key, value):
    def breaks(data):
        anno = _first_anno(data)
        anno[key] = value
        return anno

    return breaks


@pytest.mark.parametrize(
    "case,breaks,expect",
    [
        ("empty_segmentation", _set("segmentation", []), "has no 'segmentation'"),
        ("negative_width", _set("bbox", [3.0, 4.0, -5.0, 6.0]), "negative width"),
        ("nan_bbox", _set("bbox", [3.0, float("nan"), 5.0, 6.0]), "invalid 'bbox'"),
    ],
)
def test_bad_annotation_is_named_before_the_model_is_built(
    shapes_tiny, tmp_path, case, breaks, expect
):
    name = f"bad_{case}"
    _, image, anno = _broken_coco(shapes_tiny, tmp_path, name, breaks)
    with pytest.raises(DataError) as e:
        load_train_dicts(_train_cfg(name), need_masks=True)
    msg = _one_line(str(e.value))
    assert image in msg and f"id={anno['id']}" in msg and expect in msg


def test_unknown_category_names_the_json_and_the_id(shapes_tiny, tmp_path):
    path, _, _ = _broken_coco(shapes_tiny, tmp_path, "bad_category", _set("category_id", 99))
    with pytest.raises(DataError) as e:
        load_train_dicts(_train_cfg("bad_category"), need_masks=True)
    msg = _one_line(str(e.value))
    assert path in msg and "category_id=99" in msg


@pytest.mark.parametrize("segmentation", [[[1.0, 2.0, 3.0, 4.0]], [[]]], ids=["2-point", "[[]]"])
def test_dropped_polygon_is_a_warning_naming_json_image_and_id(
    shapes_tiny, tmp_path, caplog, segmentation
):
    name = f"drop_{len(segmentation[0])}"
    path, image, anno = _broken_coco(
        shapes_tiny, tmp_path, name, _set("segmentation", segmentation)
    )
    with caplog.at_level(logging.WARNING, logger="common.data.validation"):
        dicts = load_train_dicts(_train_cfg(name), need_masks=True)
    assert all(a.get("id") != anno["id"] for d in dicts for a in d["annotations"])
    msgs = [r.getMessage() for r in caplog.records if r.name == "common.data.validation"]
    assert any(path in m and image in m and f"id={anno['id']}" in m for m in msgs), msgs


def test_trainer_checks_the_data_before_building_the_model(shapes_tiny, tmp_path, monkeypatch):
    from common.engine import Trainer

    _broken_coco(shapes_tiny, tmp_path, "bad_trainer", _set("segmentation", []))
    cfg = _train_cfg("bad_trainer")
    cfg.OUTPUT_DIR = str(tmp_path / "out")

    def no_model(*a, **k):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(Trainer, "build_model", classmethod(no_model))
    with pytest.raises(DataError, match="has no 'segmentation'"):
        Trainer(cfg)


def test_missing_and_corrupt_images_are_named(shapes_tiny, tmp_path):
    from common.data.validation import read_image_checked

    with pytest.raises(DataError, match="image file not found: .*nope.jpg"):
        read_image_checked(str(tmp_path / "nope.jpg"), "RGB")
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match="cannot read image .*corrupt.jpg"):
        read_image_checked(str(bad), "RGB")


# ---------------------------------------------------------------------------------------------
# Missing datasets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,hint",
    [
        ("coco_2017_train", "prepare COCO"),
        ("coco_2017_val_panoptic", "prepare COCO"),
        ("ade20k_sem_seg_train", "prepare ADE20K"),
    ],
)
def test_missing_builtin_dataset_gives_a_hint(name, hint):
    meta = MetadataCatalog.get(name)
    if any(
        os.path.exists(getattr(meta, f)) for f in ("image_root", "json_file") if hasattr(meta, f)
    ):
        pytest.skip(f"{name} is present here")
    with pytest.raises(FileNotFoundError) as e:
        check_dataset_files([name])
    msg = _one_line(str(e.value))
    assert name in msg and hint in msg and "does not exist" in msg


def test_train_net_hints_at_a_missing_coco_before_building_the_model(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "empty"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "train_net.py", "--config-file", MASK_RCNN,
           "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "('coco_2017_val',)",
           "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "dataset coco_2017_train" in log and "prepare COCO" in log
    assert "Model:" not in log  # Detectron2 logs the model when it has built it


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_typo_in_a_base_file_names_the_base(tmp_path):
    _write(tmp_path / "base.yaml", "SOLVER:\n  BASE_LRR: 0.1\n")
    leaf = _write(tmp_path / "leaf.yaml", "_BASE_: base.yaml\nSEED: 3\n")
    with pytest.raises(KeyError) as e:
        merge_config(get_cfg(), leaf, [])
    msg = _one_line(str(e.value))
    assert "base.yaml" in msg and "leaf.yaml" not in msg and "SOLVER.BASE_LR?" in msg


def test_type_mismatch_names_the_file_and_key(tmp_path):
    _write(tmp_path / "base.yaml", "SOLVER:\n  MAX_ITER: many\n")
    leaf = _write(tmp_path / "leaf.yaml", "_BASE_: base.yaml\n")
    with pytest.raises(ValueError) as e:
        merge_config(get_cfg(), leaf, [])
    msg = _one_line(str(e.value))
    assert "base.yaml" in msg and "SOLVER.MAX_ITER" in msg and "many" in msg


def test_type_mismatch_in_an_override_is_named():
    with pytest.raises(ValueError, match="command-line override.*SOLVER.MAX_ITER"):
        merge_config(get_cfg(), None, ["SOLVER.MAX_ITER", "'many'"])


def test_missing_base_names_the_file_that_refers_to_it(tmp_path):
    leaf = _write(tmp_path / "leaf.yaml", "_BASE_: [gone.yaml]\n")
    with pytest.raises(FileNotFoundError) as e:
        merge_config(get_cfg(), leaf, [])
    msg = _one_line(str(e.value))
    assert msg.startswith(leaf) and "gone.yaml" in msg


def test_misspelt_key_in_the_leaf_names_the_leaf(tmp_path):
    _write(tmp_path / "base.yaml", "SEED: 1\n")
    leaf = _write(tmp_path / "leaf.yaml", "_BASE_: base.yaml\nSOLVER:\n  MAX_ITERR: 3\n")
    with pytest.raises(KeyError, match=r"leaf.yaml: unknown config key SOLVER.MAX_ITERR"):
        merge_config(get_cfg(), leaf, [])


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_text_file_as_weights_names_the_file(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_text("this is not a checkpoint, only some text\n" * 4)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_file(str(path))
    assert str(path) in _one_line(str(e.value))


@pytest.mark.parametrize("blob", [b"", b"\x80\x02}q\x00(X", os.urandom(64)], ids=str)
def test_empty_truncated_or_random_weights_name_the_file(tmp_path, blob):
    path = tmp_path / "weights.pth"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint_file(str(path))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": _Evil()}))
    with pytest.raises(CheckpointError, match=r"evil.pkl: refusing to unpickle .*system"):
        load_checkpoint_file(str(path))


def test_wrong_model_checkpoint_names_both_models(tmp_path):
    class ModelA(torch.nn.Linear):
        pass

    class ModelB(torch.nn.Linear):
        pass

    QSCheckpointer(ModelA(2, 2), str(tmp_path)).save("a")
    with pytest.raises(CheckpointError, match=r"a.pth is a checkpoint of ModelA.*builds ModelB"):
        QSCheckpointer(ModelB(2, 2)).load(str(tmp_path / "a.pth"))


# ---------------------------------------------------------------------------------------------
# Demo output
# ---------------------------------------------------------------------------------------------


def test_demo_unwritable_output_is_an_error_and_writes_nothing(tmp_path):
    from demo.demo import write_image

    image = np.zeros((4, 4, 3), np.uint8)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=str(blocker / "out.png")):
        write_image(str(blocker / "out.png"), image)
    with pytest.raises(ValueError, match=r"'\.nope'.*out.nope"):
        write_image(str(tmp_path / "out.nope"), image)
    write_image(str(tmp_path / "ok.png"), image)
    assert sorted(os.listdir(tmp_path)) == ["file", "ok.png"]


# ---------------------------------------------------------------------------------------------
# Processes, threads and loader workers on a CPU-only machine
# ---------------------------------------------------------------------------------------------


def test_num_gpus_on_cpu_says_what_it_does_and_warns_oversubscription(monkeypatch, caplog):
    import train_net
    from common.engine import trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer, "available_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    args = argparse.Namespace(num_gpus=8, num_machines=1)
    with caplog.at_level(logging.INFO, logger="queryseg"):
        train_net._log_process_plan(args)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "no CUDA: running 8 CPU processes over gloo" in text
    assert "8 process(es) x 1 thread(s) = 8 > 2 CPU core(s)" in text


def test_loader_workers_are_capped_at_the_cores(monkeypatch, caplog):
    from common.engine import trainer

    monkeypatch.setattr(trainer, "available_cores", lambda: 2)
    monkeypatch.setattr(trainer, "_WARNED_WORKERS", set())
    with caplog.at_level(logging.WARNING, logger="common.engine.trainer"):
        assert trainer.capped_num_workers(4) == 2
        assert trainer.capped_num_workers(1) == 1
    assert any("NUM_WORKERS 4 > 2" in r.getMessage() for r in caplog.records)


def test_same_corpus_is_independent_of_test_order(shapes_tiny, tmp_path):
    """The broken copies never touch the shared tiny dataset."""
    src = os.path.join(shapes_tiny.dataset_dir, "annotations", "instances_train.json")
    with open(src) as f:
        before = json.load(f)
    _broken_coco(shapes_tiny, tmp_path, "bad_isolation", _set("segmentation", []))
    with open(src) as f:
        assert json.load(f) == copy.deepcopy(before)


def test_nan_loss_names_the_iteration_and_the_losses():
    """Already Detectron2's behaviour (kept here so the corpus covers it): the non-finite-loss
    check names the iteration and every loss term."""
    from detectron2.engine import SimpleTrainer
    from detectron2.utils.events import EventStorage

    with EventStorage(0), pytest.raises(FloatingPointError) as e:
        losses = {"loss_mask": torch.tensor(float("nan")), "loss_cls": torch.tensor(0.5)}
        SimpleTrainer.write_metrics(losses, 0.0, cur_iter=3)
    assert "iteration=3" in str(e.value) and "loss_mask" in str(e.value)


def test_demo_unopenable_video_writer_is_an_error(tmp_path, monkeypatch, capsys):
    import cv2

    from demo import demo

    video = str(tmp_path / "in.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5, (16, 16))
    if not writer.isOpened():
        pytest.skip("this OpenCV cannot write MJPG")
    for _ in range(3):
        writer.write(np.zeros((16, 16, 3), np.uint8))
    writer.release()
    monkeypatch.setattr(demo, "render_frame", lambda demos, frame, cols: frame)
    out = str(tmp_path / "missing" / "dir" / "out.mp4")
    args = argparse.Namespace(
        webcam=False, video_input=video, output=out, max_frames=0, grid_cols=0
    )
    assert demo.run_video([], args) == 1
    assert f"cannot write video {out}" in capsys.readouterr().err
    assert not os.path.exists(out)
