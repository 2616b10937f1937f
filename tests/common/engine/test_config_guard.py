"""No silent no-ops (common.engine.config_guard): a key the config sets must be used by the built
run. Quiet for every shipped config; fires, naming the key and the meta-architecture, for another
method's key and for a key nothing reads; QUERYSEG.ALLOW_UNUSED_KEYS turns it into a warning."""

from __future__ import annotations

import glob
import os

import pytest

from common.engine import Trainer, get_cfg, merge_config
from common.engine.config_guard import (
    UnusedConfigKeysError,
    find_unused_keys,
    project_namespaces,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
KNET = "projects/knet/configs/shapes/knet_R18_shapes_instance.yaml"
FASTINST = "projects/fastinst/configs/shapes/fastinst_R18_D1_shapes_instance.yaml"


def _shipped_configs() -> list[str]:
    """Every runnable config: the projects' (bases included) and the Detectron2 baselines (the
    dataset overlays of common/configs/ are bases of those, not runs)."""
    paths = glob.glob(os.path.join(REPO, "projects/*/configs/**/*.yaml"), recursive=True)
    paths += glob.glob(os.path.join(REPO, "common/configs/baselines/*.yaml"))
    return sorted(os.path.relpath(p, REPO) for p in paths)


def _dry(path: str, opts=()):
    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, path), list(opts))
    return cfg


def test_every_shipped_config_is_quiet():
    """One test over all configs (models on the meta device: ~0.1 s each); the ablation
    definitions are vetted by tests/tools/test_ablate.py (ablate.validate runs the same check)."""
    paths = _shipped_configs()
    assert len(paths) > 40
    loud = {}
    for path in paths:
        cfg = _dry(path)
        unused = Trainer.dry_check_config(cfg)
        if unused:
            loud[path] = unused
    assert not loud


def test_namespaces_come_from_the_projects():
    ns = project_namespaces()
    assert ns["MODEL.KNET"] == "knet"
    assert ns["MODEL.FASTINST"] == "fastinst"
    assert ns["MODEL.QUERYINST"] == "queryinst"
    assert ns["MODEL.EMBEDMASK"] == "embedmask"
    # a key a project adds to a shared node is no namespace
    assert not any(n.startswith("MODEL.SEM_SEG_HEAD") for n in ns)


def test_foreign_key_is_an_error_naming_key_and_arch():
    cfg = _dry(KNET, ["MODEL.FASTINST.NUM_OBJECT_QUERIES", "7"])
    with pytest.raises(UnusedConfigKeysError) as e:
        Trainer.dry_check_config(cfg)
    msg = str(e.value)
    assert "MODEL.FASTINST.NUM_OBJECT_QUERIES=7" in msg
    assert "KNet" in msg and "'fastinst'" in msg and "the command line" in msg
    assert "QUERYSEG.ALLOW_UNUSED_KEYS" in msg


def test_foreign_key_the_other_way_round():
    cfg = _dry(FASTINST, ["MODEL.KNET.COST_DICE", "5.0"])
    with pytest.raises(UnusedConfigKeysError, match=r"MODEL\.KNET\.COST_DICE.*'knet'.*FastInst"):
        Trainer.dry_check_config(cfg)


def test_unread_key_is_an_error():
    # a Detectron2 key no part of K-Net reads (it has no ROI heads)
    cfg = _dry(KNET, ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "7"])
    with pytest.raises(UnusedConfigKeysError) as e:
        Trainer.dry_check_config(cfg)
    assert "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=7" in str(e.value)
    assert "nothing in the built KNet model" in str(e.value)


def test_read_keys_and_defaults_pass():
    # a key K-Net reads; and an unread key set to its default value changes nothing to flag
    cfg = _dry(KNET, ["MODEL.KNET.COST_DICE", "5.0", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512"])
    assert Trainer.dry_check_config(cfg) == []


def test_opt_out_warns_instead(caplog):
    cfg = _dry(
        KNET, ["MODEL.FASTINST.NUM_OBJECT_QUERIES", "7", "QUERYSEG.ALLOW_UNUSED_KEYS", "True"]
    )
    unused = Trainer.dry_check_config(cfg)
    assert [k for k, _ in unused] == ["MODEL.FASTINST.NUM_OBJECT_QUERIES"]
    assert "MODEL.FASTINST.NUM_OBJECT_QUERIES" in caplog.text


def test_clone_records_into_the_same_tracker_and_dump_records_nothing():
    cfg = _dry(KNET, ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "7"])
    cfg.dump()
    str(cfg)
    cfg.clone()
    cfg.freeze()
    assert "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE" in dict(find_unused_keys(cfg))
    clone = cfg.clone()
    assert clone.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 7
    assert "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE" not in dict(find_unused_keys(cfg))


def test_train_net_stops_before_training(shapes_tiny, tmp_path, monkeypatch):
    """train_net.py refuses the foreign key before the first iteration (in-process)."""
    import train_net

    monkeypatch.setenv("DETECTRON2_DATASETS", shapes_tiny.root)
    args = [
        "--config-file", os.path.join(REPO, KNET), *shapes_tiny.cfg_opts,
        "MODEL.FASTINST.NUM_OBJECT_QUERIES", "7", "SOLVER.MAX_ITER", "1",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path),
    ]  # fmt: skip
    with pytest.raises(UnusedConfigKeysError, match="MODEL.FASTINST.NUM_OBJECT_QUERIES"):
        train_net.cli(args)
    assert not os.path.exists(tmp_path / "model_final.pth")
