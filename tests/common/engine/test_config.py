"""Every YAML merges after all config functions run; config errors name the file and the key."""

import glob
import os

import pytest
import yaml

from common.engine import get_cfg, load_yaml_with_bases, merge_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ALL_YAMLS = sorted(
    glob.glob(os.path.join(REPO, "common", "configs", "**", "*.yaml"), recursive=True)
    + glob.glob(os.path.join(REPO, "projects", "*", "configs", "**", "*.yaml"), recursive=True)
)


def test_found_the_configs():
    assert any("baselines" in p for p in ALL_YAMLS)


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_yaml_merges(path):
    cfg = get_cfg()
    merge_config(cfg, path, [])
    cfg.freeze()


def test_misspelt_key_names_file_and_suggests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("SOLVER:\n  BASE_LRR: 0.1\n")
    with pytest.raises(KeyError) as e:
        merge_config(get_cfg(), str(bad), [])
    msg = str(e.value)
    assert "bad.yaml" in msg and "SOLVER.BASE_LRR" in msg and "SOLVER.BASE_LR" in msg


def test_misspelt_override_is_reported():
    with pytest.raises(KeyError, match="command-line override.*SOLVER.MAX_ITERS"):
        merge_config(get_cfg(), None, ["SOLVER.MAX_ITERS", "10"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        merge_config(get_cfg(), str(tmp_path / "nope.yaml"), [])


def test_list_base_merges_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("SOLVER:\n  BASE_LR: 0.1\n  MAX_ITER: 7\n")
    (tmp_path / "b.yaml").write_text("SOLVER:\n  BASE_LR: 0.2\n")
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text(yaml.safe_dump({"_BASE_": ["a.yaml", "b.yaml"], "SEED": 3}))
    merged = load_yaml_with_bases(str(leaf))
    assert merged == {"SOLVER": {"BASE_LR": 0.2, "MAX_ITER": 7}, "SEED": 3}
    cfg = merge_config(get_cfg(), str(leaf), ["SOLVER.MAX_ITER", "9"])
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, cfg.SEED) == (0.2, 9, 3)


def test_invalid_yaml_is_named(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("SOLVER: [unclosed\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        merge_config(get_cfg(), str(bad), [])
