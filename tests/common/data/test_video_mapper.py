"""The "video_instance" mapper: frame sampling and one augmentation for the whole clip."""

from __future__ import annotations

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from common.data.mappers import MAPPER_REGISTRY, VideoInstanceDatasetMapper, build_mapper
from common.data.shapes_vis import register_shapes_vis
from common.engine import get_cfg


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vis_map"))
    register_shapes_vis(
        root=root, image_size=48, num_train=3, num_val=1, num_frames=6, prefix="svis_map"
    )
    return DatasetCatalog.get("svis_map_train")


def test_registered_and_serves_test():
    assert "video_instance" in MAPPER_REGISTRY
    cfg = get_cfg()
    cfg.INPUT.DATASET_MAPPER_NAME = "video_instance"
    assert isinstance(build_mapper(cfg, is_train=False), VideoInstanceDatasetMapper)
    assert not build_mapper(cfg, is_train=False).is_train


def test_sampling_stays_in_range():
    m = VideoInstanceDatasetMapper(
        is_train=True, augmentations=[], image_format="RGB", num_frames=3, sampling_frame_range=2
    )
    np.random.seed(0)
    for _ in range(50):
        frames = m.sample_frames(10)
        assert len(frames) == 3 and frames == sorted(frames)
        assert max(frames) - min(frames) <= 4 and all(0 <= f < 10 for f in frames)
    assert m.sample_frames(1) == [0, 0, 0]  # a one-frame clip repeats its frame


def test_one_augmentation_for_all_frames(clips):
    video = clips[0]
    m = VideoInstanceDatasetMapper(
        is_train=True,
        augmentations=[T.RandomFlip(prob=1.0), T.ResizeShortestEdge(96, 200)],
        image_format="RGB",
        num_frames=3,
        sampling_frame_range=2,
    )
    np.random.seed(1)
    out = m(video)
    assert len(out["images"]) == len(out["instances"]) == 3
    for f, image, inst in zip(out["frame_indices"], out["images"], out["instances"]):
        raw = utils.read_image(video["file_names"][f], "RGB")
        expected = np.asarray(T.ResizeTransform(48, 48, 96, 96).apply_image(raw[:, ::-1]))
        assert image.shape == (3, 96, 96)
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - expected).mean() < 1
        ids = sorted(a["id"] for a in video["annotations"][f])
        assert sorted(inst.gt_ids.tolist()) == ids
        assert inst.gt_masks.tensor.shape[1:] == (96, 96)


def test_test_mode_returns_every_frame(clips):
    m = VideoInstanceDatasetMapper(
        is_train=False, augmentations=[], image_format="RGB", num_frames=2, sampling_frame_range=1
    )
    out = m(clips[1])
    assert out["frame_indices"] == list(range(6)) and "instances" not in out
