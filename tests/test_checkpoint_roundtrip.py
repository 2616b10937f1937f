"""A QuerySeg checkpoint saved by train_net.py loads back with --eval-only and gives the same
predictions and metrics, for every method; a checkpoint of another method is refused by name."""

import json
import os
import re
import subprocess
import sys

import pytest
from test_train_net import REPO, TINY, run_train_net

METHODS = {
    "knet": "projects/knet/configs/shapes/knet_R18_shapes_instance.yaml",
    "queryinst": "projects/queryinst/configs/shapes/queryinst_R18_FPN_shapes.yaml",
    "fastinst": "projects/fastinst/configs/shapes/fastinst_R18_D1_shapes_instance.yaml",
    "embedmask": "projects/embedmask/configs/shapes/embedmask_R18_shapes.yaml",
}
# 2 iterations, evaluation at the end; every detection kept so that the comparison sees many
RUN = [*TINY, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100000", "SEED", "1"]


def _copypaste(log: str) -> list[str]:
    """The evaluator's ``copypaste:`` result lines (task names and numbers)."""
    return [m.group(1) for m in re.finditer(r"copypaste: (.*)", log)]


def _predictions(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "inference", "coco_instances_results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, datasets_root):
    """{method: (output dir, train log)}, trained lazily."""
    cache = {}

    def get(method):
        if method not in cache:
            out = tmp_path_factory.mktemp(method)
            cache[method] = out, run_train_net(["--config-file", METHODS[method], *RUN], out,
                                               datasets_root)  # fmt: skip
        return cache[method]

    return get


@pytest.mark.parametrize("method", sorted(METHODS))
def test_eval_only_reproduces_the_training_run(method, trained, datasets_root, tmp_path):
    out, train_log = trained(method)
    log = run_train_net(
        ["--config-file", METHODS[method], "--eval-only", *RUN,
         "MODEL.WEIGHTS", str(out / "model_final.pth")],
        tmp_path, datasets_root,
    )  # fmt: skip
    assert _copypaste(train_log), train_log[-2000:]
    assert _copypaste(log) == _copypaste(train_log)
    before, after = _predictions(out), _predictions(tmp_path)
    assert before, "the trained model predicted nothing: the comparison would be empty"
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert (a["image_id"], a["category_id"], a["segmentation"]) == (
            b["image_id"], b["category_id"], b["segmentation"])  # fmt: skip
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)


def test_checkpoint_of_another_method_is_refused(trained, datasets_root, tmp_path):
    out, _ = trained("embedmask")
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "train_net.py",
        "--config-file",
        METHODS["fastinst"],
        "--eval-only",
        *RUN,
        "MODEL.WEIGHTS",
        str(out / "model_final.pth"),
        "OUTPUT_DIR",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "is a checkpoint of EmbedMask, but the config builds FastInst" in proc.stderr
    assert "model_final.pth" in proc.stderr
