"""The built-in ``shapes`` dataset: files as COCO/ADE20K write them, loaders, determinism, lazy
and concurrent generation, errors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shutil

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode, PolygonMasks, polygons_to_bitmask
from PIL import Image
from pycocotools.coco import COCO

import common.data  # noqa: F401  (registers the datasets)
from common.data import shapes
from common.data import shapes_gen as gen
from common.data.shapes import ShapesSpec, configure_shapes_from_cfg, ensure_split, register_shapes
from common.engine.defaults import add_common_config

NUM_THINGS, NUM_CLASSES = len(gen.THING_CATEGORIES), len(gen.CATEGORIES)


def _coco(path: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def _rgb2id(path: str) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _digest_tree(spec: ShapesSpec, split: str, limit: int | None = None) -> dict[str, str]:
    """relative path -> sha1 of every file of a split (the first ``limit`` images per folder)."""
    out = {}
    for key, rel in gen.split_paths(split).items():
        path = os.path.join(spec.dataset_dir, rel)
        files = (
            [path]
            if key.endswith("_json")
            else sorted(os.path.join(path, f) for f in os.listdir(path))[:limit]
        )
        for f in files:
            with open(f, "rb") as fh:
                out[os.path.relpath(f, spec.dataset_dir)] = hashlib.sha1(fh.read()).hexdigest()
    return out


# ---- content ----------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_instances_json_matches_drawn_masks(shapes_tiny, split):
    spec = shapes_tiny.spec
    coco = _coco(spec.path(split, "instances_json"))
    assert sorted(c["id"] for c in coco.dataset["categories"]) == [1, 2, 4, 5, 7]
    assert len(coco.getImgIds()) == 8
    num_parts = []
    for img in coco.dataset["images"]:
        assert (img["height"], img["width"]) == (64, 64)
        assert os.path.isfile(os.path.join(spec.path(split, "image_root"), img["file_name"]))
        scene = gen.render_scene(64, 0, split, img["id"] - 1)  # regenerate this image alone
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])), key=lambda a: a["id"])
        assert len(anns) == len(scene.things)
        for ann, thing in zip(anns, scene.things):
            mask = coco.annToMask(ann).astype(bool)
            assert ann["category_id"] == thing.category_id and ann["iscrowd"] == 0
            np.testing.assert_array_equal(mask, thing.mask)
            assert ann["area"] == mask.sum()
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            assert ann["bbox"] == mask_util.toBbox(rle).tolist()
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
            # the polygons' own area (shoelace, holes cut in) equals the pixel count
            assert PolygonMasks([ann["segmentation"]]).area()[0] == pytest.approx(mask.sum())
            num_parts.append(len(ann["segmentation"]))
    assert len(num_parts) > 10


def test_mask_to_polygons_exact_with_holes_parts_flip_and_scale():
    rng = np.random.default_rng(0)
    for _ in range(40):
        mask = np.zeros((32, 32), np.uint8)
        mask[
            rng.integers(2, 12) : rng.integers(20, 30), rng.integers(2, 12) : rng.integers(20, 30)
        ] = 1
        mask[
            rng.integers(8, 14) : rng.integers(16, 20), rng.integers(8, 14) : rng.integers(16, 20)
        ] = 0
        mask[rng.random((32, 32)) < 0.03] ^= 1  # specks, extra parts, diagonal contacts
        polys = gen.mask_to_polygons(mask)
        np.testing.assert_array_equal(polygons_to_bitmask(polys, 32, 32), mask.astype(bool))
        flipped = [[32 - v if i % 2 == 0 else v for i, v in enumerate(p)] for p in polys]
        np.testing.assert_array_equal(polygons_to_bitmask(flipped, 32, 32), mask[:, ::-1] > 0)
        scaled = [[3 * v for v in p] for p in polys]
        np.testing.assert_array_equal(
            polygons_to_bitmask(scaled, 96, 96), np.kron(mask, np.ones((3, 3), np.uint8)) > 0
        )
    assert gen.mask_to_polygons(np.zeros((8, 8), bool)) == []


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_and_semantic_pngs_agree(shapes_tiny, split):
    spec = shapes_tiny.spec
    with open(spec.path(split, "panoptic_json")) as f:
        pan = json.load(f)
    cats = {c["id"]: c for c in pan["categories"]}
    assert [c["id"] for c in pan["categories"]] == [1, 2, 4, 5, 7, 10, 12, 13, 15]
    assert all({"isthing", "color", "name"} <= set(c) for c in cats.values())
    contiguous = {c["id"]: i for i, c in enumerate(pan["categories"])}
    stuff_index = {c["id"]: i + 1 for i, c in enumerate(gen.STUFF_CATEGORIES)}
    coco = _coco(spec.path(split, "instances_json"))
    for ann in pan["annotations"]:
        stem = os.path.splitext(ann["file_name"])[0]
        ids = _rgb2id(os.path.join(spec.path(split, "panoptic_root"), ann["file_name"]))
        segs = ann["segments_info"]
        assert sorted(np.unique(ids).tolist()) == sorted(s["id"] for s in segs)  # no void (0)
        np.testing.assert_array_equal(
            ids, gen.render_scene(64, 0, split, ann["image_id"] - 1).segment_ids
        )
        sem = np.asarray(Image.open(os.path.join(spec.path(split, "sem_seg_root"), stem + ".png")))
        stuff = np.asarray(
            Image.open(os.path.join(spec.path(split, "panoptic_stuff_root"), stem + ".png"))
        )
        assert sem.dtype == np.uint8 and sem.max() < NUM_CLASSES
        thing_masks = []
        for s in segs:
            m = ids == s["id"]
            assert s["area"] == m.sum() and s["iscrowd"] == 0
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            assert s["bbox"] == mask_util.toBbox(rle).tolist()
            assert np.all(sem[m] == contiguous[s["category_id"]])
            if cats[s["category_id"]]["isthing"]:
                assert np.all(stuff[m] == 0)
                thing_masks.append(m)
            else:
                assert np.all(stuff[m] == stuff_index[s["category_id"]])
        # instance JSON and panoptic PNG describe the same things
        inst = [coco.annToMask(a) > 0 for a in coco.loadAnns(coco.getAnnIds([ann["image_id"]]))]
        assert len(inst) == len(thing_masks)
        assert sorted(int(m.sum()) for m in inst) == sorted(int(m.sum()) for m in thing_masks)
        assert set(np.unique(stuff).tolist()) <= {0, 1, 2, 3, 4}


@pytest.mark.parametrize("preset", sorted(gen.PRESETS))
def test_scenes_are_varied_and_not_trivial(preset):
    things, stuff, counts, areas, colours = set(), set(), [], [], []
    for index in range(64):
        scene = gen.render_scene(64, 0, "train", index, preset)
        counts.append(len(scene.things))
        stuff |= set(np.unique(scene.stuff_map).tolist())
        for t in scene.things:
            things.add(t.category_id)
            areas.append(int(t.mask.sum()))
            colours.append(scene.image[t.mask].mean(0))
    assert things == {c["id"] for c in gen.THING_CATEGORIES}
    assert stuff == {c["id"] for c in gen.STUFF_CATEGORIES}
    p = gen.get_preset(preset)
    assert counts.count(0) == 2 and max(counts) >= p.max_things - 1  # index 7 and 39 are empty
    assert max(counts) <= p.max_things
    assert min(areas) < 0.02 * 64 * 64 < 0.15 * 64 * 64 < max(areas)  # small to large
    assert np.std(np.stack(colours), axis=0).min() > 30  # colours vary


def test_hard_preset_is_generator_v1_bit_for_bit():
    """``hard`` keeps the look of generator version 1 (the only one before presets): the sha1 of
    these scenes was computed with version 1's code."""
    h = hashlib.sha1()
    for index in range(4):
        scene = gen.render_scene(64, 0, "train", index, "hard")
        h.update(scene.image.tobytes())
        h.update(scene.segment_ids.tobytes())
    assert h.hexdigest() == "50a4596e59e98fadf667854c2ea015f3f7b388a5"


def test_standard_preset_paints_things_in_their_class_hue():
    import colorsys

    hues = {c["id"]: gen.CLASS_HUES[c["name"]] for c in gen.THING_CATEGORIES}
    seen = 0
    for index in range(24):
        scene = gen.render_scene(96, 0, "val", index, "standard")
        for t in scene.things:
            rgb = np.median(scene.image[t.mask].astype(np.float64), axis=0) / 255
            hue = colorsys.rgb_to_hsv(*rgb)[0] * 360
            assert abs((hue - hues[t.category_id] + 180) % 360 - 180) < 15, (index, t.category_id)
            assert t.mask.sum() >= 0.6 * 0.5 * 9  # never a sliver
            seen += 1
    assert seen > 30


@pytest.mark.parametrize("preset", sorted(gen.PRESETS))
def test_each_preset_is_deterministic(preset):
    a = gen.render_scene(48, 3, "train", 5, preset)
    b = gen.render_scene(48, 3, "train", 5, preset)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.segment_ids.tobytes() == b.segment_ids.tobytes()


def test_presets_differ_and_unknown_preset_names_the_known_ones(tmp_path):
    a = gen.render_scene(64, 0, "train", 1, "standard")
    b = gen.render_scene(64, 0, "train", 1, "hard")
    assert a.image.tobytes() != b.image.tobytes()
    with pytest.raises(ValueError, match="'medium'.*hard.*standard"):
        gen.render_scene(64, 0, "train", 1, "medium")
    with pytest.raises(ValueError, match="'medium'"):
        register_shapes(root=str(tmp_path), prefix="shapes_bad", preset="medium")


# ---- Detectron2 loaders and metadata -----------------------------------------------------------


def test_every_registered_name_loads(shapes_tiny):
    names = sorted(n for n in DatasetCatalog.list() if n.startswith("shapes_tiny_"))
    assert names == sorted(
        [
            f"shapes_tiny_{s}{k}"
            for s in ("train", "val")
            for k in ("", "_panoptic", "_panoptic_separated", "_panoptic_stuffonly")
        ]
        + ["shapes_tiny_sem_seg_train", "shapes_tiny_sem_seg_val"]
    )
    for name in names:
        dicts = DatasetCatalog.get(name)
        meta = MetadataCatalog.get(name)
        assert len(dicts) == 8 and meta.evaluator_type in ("coco", "coco_panoptic_seg", "sem_seg")
        for d in dicts:
            assert os.path.isfile(d["file_name"]) and d["file_name"].endswith(".jpg")
            assert (d["height"], d["width"]) == (64, 64)
            for key in ("sem_seg_file_name", "pan_seg_file_name"):
                assert key not in d or os.path.isfile(d[key])
            if "annotations" in d:
                for a in d["annotations"]:
                    assert a["bbox_mode"] == BoxMode.XYWH_ABS
                    assert 0 <= a["category_id"] < NUM_THINGS and a["segmentation"]
            if "segments_info" in d:
                for s in d["segments_info"]:
                    assert s["isthing"] == (s["category_id"] < NUM_THINGS)
                    assert 0 <= s["category_id"] < NUM_CLASSES
        kinds = {
            "coco": {"annotations", "height", "width", "image_id"},
            "coco_panoptic_seg": {"image_id", "sem_seg_file_name"},
            "sem_seg": {"sem_seg_file_name"},
        }[meta.evaluator_type]
        assert kinds <= set(dicts[0])
    empty = [d for d in DatasetCatalog.get(shapes_tiny.val) if not d["annotations"]]
    assert [d["image_id"] for d in empty] == [8]
    assert "pan_seg_file_name" in DatasetCatalog.get(shapes_tiny.val_panoptic)[0]
    assert "annotations" in DatasetCatalog.get(shapes_tiny.val_panoptic_separated)[0]


def test_metadata_follows_detectron2_conventions(shapes_tiny):
    things = ["circle", "triangle", "rectangle", "star", "ring"]
    every = things + ["sky", "grass", "water", "sand"]
    inst = MetadataCatalog.get(shapes_tiny.val)
    assert inst.thing_classes == things and len(inst.thing_colors) == 5
    assert inst.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 4: 2, 5: 3, 7: 4}
    assert os.path.isfile(inst.json_file) and os.path.isdir(inst.image_root)

    pan = MetadataCatalog.get(shapes_tiny.val_panoptic)
    assert pan.evaluator_type == "coco_panoptic_seg" and pan.ignore_label == 255
    assert pan.thing_classes == things and pan.stuff_classes == every
    assert len(pan.stuff_colors) == len(every)
    assert pan.stuff_dataset_id_to_contiguous_id == {
        c["id"]: i for i, c in enumerate(gen.CATEGORIES)
    }
    assert pan.json_file == inst.json_file
    for key in ("panoptic_root", "sem_seg_root", "image_root"):
        assert os.path.isdir(getattr(pan, key))
    assert os.path.isfile(pan.panoptic_json)

    sep = MetadataCatalog.get(shapes_tiny.val_panoptic_separated)
    assert sep.stuff_classes == ["things", "sky", "grass", "water", "sand"]
    assert sep.stuff_dataset_id_to_contiguous_id == {0: 0, 10: 1, 12: 2, 13: 3, 15: 4}
    assert sep.thing_classes == things and sep.evaluator_type == "coco_panoptic_seg"

    sem = MetadataCatalog.get(shapes_tiny.sem_seg_val)
    assert sem.stuff_classes == every and sem.evaluator_type == "sem_seg"
    assert sem.ignore_label == 255 and os.path.isdir(sem.sem_seg_root)


def test_default_names_registered_on_import(tmp_path):
    names = (
        "shapes_train",
        "shapes_val",
        "shapes_train_panoptic",
        "shapes_val_panoptic",
        "shapes_train_panoptic_separated",
        "shapes_val_panoptic_separated",
        "shapes_sem_seg_train",
        "shapes_sem_seg_val",
    )
    assert set(names) <= set(DatasetCatalog.list())
    spec = register_shapes(root=str(tmp_path))  # what `import common.data` calls (other root)
    assert spec.tag == "standard_128px_s0_600-100_v2"
    assert MetadataCatalog.get("shapes_val").image_root == os.path.join(spec.dataset_dir, "val")
    assert not os.path.exists(spec.dataset_dir)  # nothing generated before first use
    register_shapes()


# ---- determinism and parameters ---------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different(shapes_tiny, tmp_path):
    again = ShapesSpec(str(tmp_path), **shapes_tiny.params)
    ensure_split(again, "val")
    assert _digest_tree(again, "val") == _digest_tree(shapes_tiny.spec, "val")

    fewer = ShapesSpec(str(tmp_path), 64, num_train=8, num_val=3, seed=0)
    ensure_split(fewer, "val")  # image i depends on (seed, split, i) only, not on the count
    assert fewer.dataset_dir != again.dataset_dir
    images = {k: v for k, v in _digest_tree(fewer, "val").items() if k.endswith(".jpg")}
    assert len(images) == 3
    assert images.items() <= _digest_tree(shapes_tiny.spec, "val").items()

    other = ShapesSpec(str(tmp_path), 64, num_train=8, num_val=8, seed=1)
    ensure_split(other, "val")
    a, b = _digest_tree(other, "val"), _digest_tree(shapes_tiny.spec, "val")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.endswith(".jpg"))
    assert (
        gen.render_scene(64, 0, "val", 0).image.tobytes()
        != gen.render_scene(64, 0, "train", 0).image.tobytes()
    )


def test_folder_encodes_parameters_and_meta_json(shapes_tiny):
    assert os.path.basename(shapes_tiny.dataset_dir) == "standard_64px_s0_8-8_v2"
    with open(os.path.join(shapes_tiny.dataset_dir, "meta.json")) as f:
        meta = json.load(f)
    assert {k: meta[k] for k in ("image_size", "seed", "num_train", "num_val", "preset")} == {
        "image_size": 64,
        "seed": 0,
        "num_train": 8,
        "num_val": 8,
        "preset": "standard",
    }
    assert meta["preset_settings"]["class_colours"] is True
    assert set(meta["splits"]) == {"train", "val"}
    assert meta["splits"]["val"]["num_images"] == 8 and meta["splits"]["val"]["num_empty_images"]
    assert not [n for n in os.listdir(shapes_tiny.dataset_dir) if n.startswith(".tmp")]


# ---- lazy, atomic, concurrent generation ------------------------------------------------------


def test_generation_is_lazy_and_per_split(tmp_path):
    spec = register_shapes(
        root=str(tmp_path), image_size=32, num_train=3, num_val=2, seed=3, prefix="shapes_lazy"
    )
    assert not os.path.exists(spec.dataset_dir)
    assert len(DatasetCatalog.get("shapes_lazy_val_panoptic")) == 2
    with open(os.path.join(spec.dataset_dir, "meta.json")) as f:
        assert set(json.load(f)["splits"]) == {"val"}
    assert not os.path.exists(spec.path("train", "image_root"))
    assert len(DatasetCatalog.get("shapes_lazy_sem_seg_train")) == 3
    assert os.path.isdir(spec.path("train", "image_root"))

    # re-registering the same names with other parameters replaces them
    spec2 = register_shapes(
        root=str(tmp_path), image_size=32, num_train=4, num_val=2, seed=3, prefix="shapes_lazy"
    )
    assert spec2.dataset_dir != spec.dataset_dir
    assert len(DatasetCatalog.get("shapes_lazy_train")) == 4
    assert MetadataCatalog.get("shapes_lazy_train").image_root.startswith(spec2.dataset_dir)


def _count_writes(counter_path: str):
    real = gen.write_split

    def counted(*args, **kwargs):
        with open(counter_path, "a") as f:
            f.write("x\n")
        return real(*args, **kwargs)

    return counted


def _generate_in_child(root: str) -> None:
    ensure_split(ShapesSpec(root, 32, num_train=6, num_val=1, seed=5), "train")


def test_concurrent_processes_generate_once(tmp_path, monkeypatch):
    counter = str(tmp_path / "writes.txt")
    monkeypatch.setattr(gen, "write_split", _count_writes(counter))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_generate_in_child, args=(str(tmp_path),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with open(counter) as f:
        assert f.read().count("x") == 1
    spec = ShapesSpec(str(tmp_path), 32, num_train=6, num_val=1, seed=5)
    assert len(os.listdir(spec.path("train", "image_root"))) == 6
    assert not [n for n in os.listdir(spec.dataset_dir) if n.startswith(".tmp")]


def test_leftovers_of_a_killed_run_are_replaced(tmp_path):
    spec = ShapesSpec(str(tmp_path), 32, num_train=2, num_val=2, seed=0)
    os.makedirs(os.path.join(spec.dataset_dir, ".tmp-val-dead", "val"))
    os.makedirs(spec.path("val", "image_root"))
    with open(os.path.join(spec.path("val", "image_root"), "junk.jpg"), "w") as f:
        f.write("half")
    ensure_split(spec, "val")
    assert sorted(os.listdir(spec.path("val", "image_root"))) == [
        "000000000001.jpg",
        "000000000002.jpg",
    ]
    assert not [n for n in os.listdir(spec.dataset_dir) if n.startswith(".tmp")]


def test_half_written_or_foreign_folder_gives_clear_error(tmp_path):
    spec = ShapesSpec(str(tmp_path), 32, num_train=2, num_val=2, seed=0)
    ensure_split(spec, "val")
    missing = os.path.join(spec.path("val", "panoptic_root"), "000000000002.png")
    os.remove(missing)
    shapes._VERIFIED.clear()  # as a fresh process would see it
    with pytest.raises(FileNotFoundError, match="panoptic_val.*delete"):
        ensure_split(spec, "val")

    meta_path = os.path.join(spec.dataset_dir, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["seed"] = 9
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(RuntimeError, match="meta.json records parameters"):
        ensure_split(spec, "train")


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"image_size": 8}, "image_size"),
        ({"num_train": 0}, "num_train"),
        ({"seed": -1}, "seed"),
        ({"num_val": 2.5}, "num_val"),
    ],
)
def test_bad_parameters_name_the_value(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        register_shapes(root=str(tmp_path), prefix="shapes_bad", **kwargs)


def test_unknown_split_and_unknown_name():
    with pytest.raises(ValueError, match="'test'"):
        ensure_split(ShapesSpec("/nonexistent"), "test")
    with pytest.raises(KeyError, match="shapes_tarin"):
        DatasetCatalog.get("shapes_tarin")


# ---- config and CLI ---------------------------------------------------------------------------


def test_a_changed_preset_never_reuses_files(shapes_tiny, tmp_path):
    """Same sizes and seed, other preset: another folder, other images; a folder whose meta.json
    records another preset is refused, not read."""
    hard = ShapesSpec(shapes_tiny.root, **shapes_tiny.params, preset="hard")
    assert hard.dataset_dir != shapes_tiny.dataset_dir
    ensure_split(hard, "val")
    a, b = _digest_tree(hard, "val"), _digest_tree(shapes_tiny.spec, "val")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.endswith(".jpg"))

    # a standard folder renamed to the hard preset's name: its meta.json gives it away
    forged = ShapesSpec(str(tmp_path), **shapes_tiny.params, preset="hard")
    shutil.copytree(shapes_tiny.dataset_dir, forged.dataset_dir)
    with pytest.raises(RuntimeError, match="'preset': 'standard'"):
        ensure_split(forged, "val")


def test_cfg_preset_selects_folder_names_and_metadata(shapes_tiny_env):
    cfg = get_cfg()
    add_common_config(cfg)
    cfg.merge_from_list([*shapes_tiny_env.cfg_opts, "DATASETS.SHAPES.PRESET", "hard"])
    spec = configure_shapes_from_cfg(cfg)
    assert spec.preset == "hard" and os.path.basename(spec.dataset_dir).startswith("hard_64px")
    for name in ("shapes_val", "shapes_hard_val", "shapes_hard_sem_seg_train"):
        meta = MetadataCatalog.get(name)
        assert meta.shapes_preset == "hard" and meta.image_root.startswith(spec.dataset_dir)
    assert MetadataCatalog.get("shapes_standard_val").shapes_preset == "standard"
    cfg.DATASETS.SHAPES.PRESET = "medium"
    with pytest.raises(ValueError, match="unknown preset 'medium'"):
        configure_shapes_from_cfg(cfg)


def test_configure_from_cfg_reuses_the_matching_folder(shapes_tiny_env):
    cfg = get_cfg()
    add_common_config(cfg)
    cfg.merge_from_list(shapes_tiny_env.cfg_opts)
    cfg.DATASETS.TEST = ("shapes_val",)
    spec = configure_shapes_from_cfg(cfg, generate=True)
    assert spec.dataset_dir == shapes_tiny_env.dataset_dir
    assert len(DatasetCatalog.get("shapes_val")) == 8
    assert MetadataCatalog.get("shapes_val_panoptic").panoptic_root.startswith(spec.dataset_dir)

    with pytest.raises(KeyError, match="add_common_config"):
        configure_shapes_from_cfg(get_cfg())


def test_cli_pregenerates(tmp_path):
    assert (
        shapes.main(
            [
                "--root",
                str(tmp_path),
                "--image-size",
                "32",
                "--num-train",
                "2",
                "--num-val",
                "1",
                "--seed",
                "4",
            ]
        )
        == 0
    )
    spec = ShapesSpec(str(tmp_path), 32, 2, 1, 4)
    assert len(os.listdir(spec.path("train", "image_root"))) == 2
    assert len(os.listdir(spec.path("val", "sem_seg_root"))) == 1
