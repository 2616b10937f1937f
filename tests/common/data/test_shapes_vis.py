"""The synthetic video dataset ``shapes_vis`` and the YouTube-VIS 2019 loader."""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from common.data.shapes_vis import register_shapes_vis, render_clip
from common.data.ytvis import YTVISFormatError, load_ytvis_json


@pytest.fixture(scope="module")
def tiny_vis(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vis"))
    spec = register_shapes_vis(
        root=root, image_size=48, num_train=4, num_val=2, num_frames=6, prefix="svis_test"
    )
    return spec


def test_render_is_deterministic_and_moves():
    a = render_clip(48, 6, 0, "train", 3, "standard")
    b = render_clip(48, 6, 0, "train", 3, "standard")
    assert np.array_equal(a.frames, b.frames)
    assert len(a.tracks) == len(b.tracks) >= 1
    for (ca, ma), (cb, mb) in zip(a.tracks, b.tracks):
        assert ca == cb and np.array_equal(ma, mb)
    c = render_clip(48, 6, 1, "train", 3, "standard")
    assert not np.array_equal(a.frames, c.frames)
    # somewhere in the first clips a shape moves: its mask differs between frames
    moved = any(
        not np.array_equal(m[0], m[-1])
        for i in range(4)
        for _, m in render_clip(48, 6, 0, "train", i, "standard").tracks
    )
    assert moved


def test_json_is_youtube_vis_2019(tiny_vis):
    DatasetCatalog.get("svis_test_train")  # generates the split
    with open(tiny_vis.json_file("train")) as f:
        data = json.load(f)
    assert len(data["videos"]) == 4 and {c["id"] for c in data["categories"]} == {1, 2, 4, 5, 7}
    absent = 0
    for anno in data["annotations"]:
        video = data["videos"][anno["video_id"] - 1]
        assert len(anno["segmentations"]) == len(anno["bboxes"]) == video["length"] == 6
        for seg, box, area in zip(anno["segmentations"], anno["bboxes"], anno["areas"]):
            if seg is None:
                assert box is None and area is None
                absent += 1
                continue
            m = mask_util.decode(seg)
            assert m.shape == (48, 48) and m.sum() == area
            assert mask_util.toBbox(seg).tolist() == box
    assert absent > 0  # shapes enter late, vanish or drift out of the frame


def test_loader_gives_per_frame_tracks(tiny_vis):
    dicts = DatasetCatalog.get("svis_test_val")
    assert len(dicts) == 2
    meta = MetadataCatalog.get("svis_test_val")
    assert meta.evaluator_type == "ytvis" and len(meta.thing_classes) == 5
    d = dicts[0]
    assert len(d["file_names"]) == len(d["annotations"]) == d["length"] == 6
    ids = {a["id"] for frame in d["annotations"] for a in frame}
    assert ids and all(0 <= a["category_id"] < 5 for f in d["annotations"] for a in f)


def test_bad_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "videos": [{"id": 1, "length": 2, "width": 4, "height": 4, "file_names": ["a"]}],
                "categories": [{"id": 1, "name": "x"}],
            }
        )
    )
    with pytest.raises(YTVISFormatError, match="bad.json.*video id=1 has length 2"):
        load_ytvis_json(str(bad), str(tmp_path))


def test_ytvis_2019_builtin_registered():
    meta = MetadataCatalog.get("ytvis_2019_train")
    assert meta.evaluator_type == "ytvis" and len(meta.thing_classes) == 40
    assert meta.json_file.endswith("ytvis_2019/train.json")
    assert MetadataCatalog.get("ytvis_2019_val").image_root.endswith("valid/JPEGImages")


def test_bad_video_annotation_names_json_annotation_and_video(tmp_path):
    from common.data.validation import DataError, load_train_dicts
    from common.data.ytvis import register_ytvis_instances
    from common.engine import get_cfg

    rle = mask_util.encode(np.asfortranarray(np.ones((4, 4), np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    data = {
        "videos": [{"id": 3, "length": 1, "width": 4, "height": 4, "file_names": ["v/0.jpg"]}],
        "annotations": [
            {"id": 11, "video_id": 3, "category_id": 1, "iscrowd": 0, "segmentations": [rle],
             "bboxes": [[0, 0, -2, 4]], "areas": [16]}
        ],
        "categories": [{"id": 1, "name": "x"}],
    }  # fmt: skip
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    register_ytvis_instances("svis_broken", {}, str(path), str(tmp_path))
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ("svis_broken",)
    with pytest.raises(DataError, match=r"broken\.json: annotation id=11 of video id=3"):
        load_train_dicts(cfg, need_masks=True)
