"""demo/demo.py with a video model: a clip folder in, one overlay per frame out, one colour per
track (random weights: the plumbing is tested, not the predictions)."""

from __future__ import annotations

import os

import cv2
import numpy as np

from demo import demo
from demo.predictor import track_colour

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VIS = os.path.join(REPO, "projects/queryinst/configs/shapes/queryinst_vis_R18_FPN_shapes_vis.yaml")


def test_track_colours_differ():
    assert len({tuple(track_colour(i)) for i in range(1, 20)}) == 19


def test_clip_folder_gives_one_overlay_per_frame(tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    rng = np.random.default_rng(0)
    for t in range(3):
        frame = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        frame[10:30, 5 + 4 * t : 25 + 4 * t] = (40, 40, 220)
        cv2.imwrite(str(clip / f"{t:05d}.jpg"), frame)
    out = tmp_path / "out"
    rc = demo.main(
        ["--config-file", VIS, "--clip-input", str(clip), "--output", str(out),
         "--confidence-threshold", "0.0", "--opts", "MODEL.QUERYINST.VIS.SCORE_THRESH", "0.0"]
    )  # fmt: skip
    assert rc == 0
    written = sorted(os.listdir(out))
    assert written == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert cv2.imread(str(out / written[0])).shape == (48, 64, 3)
