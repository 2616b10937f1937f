"""tools/complexity.py: parameters and GFLOPs of configs as a Markdown table."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import complexity  # noqa: E402

MRCNN = os.path.join(REPO, "common/configs/baselines/mask_rcnn_R_18_FPN_gn_scratch_shapes.yaml")
FASTINST = os.path.join(
    REPO, "projects/fastinst/configs/shapes/fastinst_R18_D1_shapes_instance.yaml"
)


def test_table_of_params_and_gflops(tmp_path, capsys):
    out = tmp_path / "cost.md"
    assert complexity.main(["--configs", MRCNN, FASTINST, "--size", "64", "64",
                            "--output", str(out)]) == 0  # fmt: skip
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 2
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    for c in cells:
        assert float(c[1]) > 1.0 and c[2] == "64x64" and float(c[3]) > 0.0
    # the R-CNN baseline's RoI heads cost more than FastInst's whole model at the same input
    assert float(cells[0][3]) > float(cells[1][3])
    assert "roi_align" in text  # uncounted ops are named


def test_test_size_follows_the_config():
    from common.engine import get_cfg, merge_config

    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, "projects/knet/configs/knet_R50_1x_coco.yaml"), [])
    assert complexity.test_size(cfg) == (800, 1333)
    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, "projects/knet/configs/knet_fcn_R50-D8_80k_ade20k.yaml"),
                 [])  # fmt: skip
    assert complexity.test_size(cfg) == (512, 512)
