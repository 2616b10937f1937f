"""demo/demo.py: overlays for instance / panoptic / semantic models, the comparison grid, video
input, and an unreadable image reported by name while the rest of the batch still runs.

The models are the Detectron2 baselines on the tiny `shapes` split with random weights (the
demo warns about that); what is tested is the plumbing, not the predictions."""

from __future__ import annotations

import logging
import os

import cv2
import numpy as np
import pytest

from demo import demo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASELINES = os.path.join(REPO, "common/configs/baselines")
MASK_RCNN = os.path.join(BASELINES, "mask_rcnn_R_18_FPN_gn_scratch_shapes.yaml")
PANOPTIC_FPN = os.path.join(BASELINES, "panoptic_fpn_R_18_gn_scratch_shapes.yaml")
#: Detectron2's semantic FPN (SemanticSegmentor) on the ADE20K-style `shapes` labels (9 classes)
SEMANTIC_OPTS = [
    "MODEL.META_ARCHITECTURE",
    "SemanticSegmentor",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
    "9",
    "DATASETS.TEST",
    "('shapes_sem_seg_val',)",
    # the Panoptic FPN config's instance keys (and FAST's) do nothing in a semantic model
    "QUERYSEG.ALLOW_UNUSED_KEYS",
    "True",
]
FAST = [
    "INPUT.MIN_SIZE_TEST",
    "64",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "20",
    "TEST.DETECTIONS_PER_IMAGE",
    "5",
]


@pytest.fixture
def images(shapes_tiny_env, tmp_path):
    """Two readable val images of the tiny split copied into a folder, plus a broken file."""
    folder = tmp_path / "in"
    folder.mkdir()
    val = os.path.join(shapes_tiny_env.dataset_dir, "val")
    for name in sorted(os.listdir(val))[:2]:
        cv2.imwrite(str(folder / name.replace(".jpg", ".png")), cv2.imread(os.path.join(val, name)))
    return folder


def _run(args, opts=()):
    return demo.main(
        [
            *args,
            "--confidence-threshold",
            "0.0",
            "--opts",
            *os.environ["_QS_TINY_OPTS"].split(),
            *FAST,
            *opts,
        ]
    )


@pytest.fixture(autouse=True)
def _tiny_opts(shapes_tiny_env, monkeypatch):
    monkeypatch.setenv("_QS_TINY_OPTS", " ".join(shapes_tiny_env.cfg_opts))


@pytest.mark.parametrize(
    "task,config,opts",
    [
        ("instance", MASK_RCNN, []),
        ("panoptic", PANOPTIC_FPN, []),
        ("semantic", PANOPTIC_FPN, SEMANTIC_OPTS),
    ],
    ids=["instance", "panoptic", "semantic"],
)
def test_folder_in_overlays_out_for_each_task(task, config, opts, images, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="queryseg.demo"):
        assert (
            _run(["--config-file", config, "--input", str(images), "--output", str(out)], opts) == 0
        )
    written = sorted(os.listdir(out))
    assert written == sorted(f.replace(".png", ".jpg") for f in os.listdir(images))
    for name in written:
        overlay = cv2.imread(str(out / name))
        assert overlay.shape == (64, 64, 3)
    assert sum(f": {task} in " in r.getMessage() for r in caplog.records) == 2  # drawn task
    assert any("random weights" in r.getMessage() for r in caplog.records)


def test_comparison_mode_writes_a_labelled_grid(images, tmp_path):
    out = tmp_path / "grid"
    first = sorted(os.listdir(images))[0]
    assert (
        _run(
            [
                "--config-file",
                MASK_RCNN,
                PANOPTIC_FPN,
                "--labels",
                "Mask R-CNN",
                "PFPN",
                "--input",
                str(images / first),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    (name,) = os.listdir(out)
    assert name == first.replace(".png", "_grid.jpg")
    grid = cv2.imread(str(out / name))
    # input | Mask R-CNN | Panoptic FPN, 64 px each, 4 px apart, under a 24 px label strip
    assert grid.shape == (64 + 24, 3 * 64 + 2 * 4, 3)
    assert (grid[:24] < 200).any(), "labels are drawn"


def test_unreadable_image_is_reported_and_the_rest_still_runs(images, tmp_path, capsys):
    (images / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    rc = _run(
        [
            "--config-file",
            MASK_RCNN,
            "--input",
            str(images),
            str(tmp_path / "nope.jpg"),
            "--output",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert f"cannot read image {images / 'broken.png'}" in err
    assert f"{tmp_path / 'nope.jpg'}: no such file or folder" in err
    assert "2 input(s) failed; 2 overlay(s) written" in err
    assert len(os.listdir(out)) == 2


def test_video_in_video_out(images, tmp_path):
    video = str(tmp_path / "clip.mp4")
    frame = cv2.imread(str(images / sorted(os.listdir(images))[0]))
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 64))
    for shift in range(3):
        writer.write(np.roll(frame, 4 * shift, axis=1))
    writer.release()
    out = str(tmp_path / "overlay.mp4")
    assert _run(["--config-file", MASK_RCNN, "--video-input", video, "--output", out]) == 0
    cap = cv2.VideoCapture(out)
    count = 0
    while cap.read()[0]:
        count += 1
    assert count == 3
