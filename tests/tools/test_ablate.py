"""tools/ablate.py: every shipped definition merges, a bad key fails before anything runs, and
the runner produces one row per override set (tiny `shapes` split, Mask R-CNN baseline)."""

from __future__ import annotations

import collections
import csv
import os

import pytest

from tools import (
    ablate,
    bench_core,
    bench_report,
    benchmark,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MASK_RCNN = "common/configs/baselines/mask_rcnn_R_18_FPN_gn_scratch_shapes.yaml"


def _value(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", ablate.list_ablations())
def test_shipped_definition_merges_every_variant(name, tmp_path):
    a = ablate.load_ablation(name)
    if not os.path.isfile(a.base_path):
        pytest.skip(f"{a.base} (the base of {name}) is not in the tree")
    measurer = bench_core.Measurer(benchmark.settings_for("quick"), str(tmp_path))
    ablate.validate(a, measurer)  # raises SystemExit naming the variant on a bad key
    assert len(a.entries()) == len(a.variants) >= 2
    for entry in a.entries():
        cfg = measurer.build_cfg(entry, str(tmp_path))
        for key, text in zip(entry.overrides[::2], entry.overrides[1::2]):
            value = _value(cfg, key)
            assert str(value) == text or repr(value) == text or value == eval(text), (key, text)


def test_overrides_from_yaml_become_yacs_text(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(
        "title: t\nbase: b.yaml\noverrides: [SOLVER.BASE_LR, 0.5]\nvariants:\n"
        "  one: [A.B, [1.0, 2.0], C.D, True, E.F, name]\n  two: []\n"
    )
    a = ablate.load_ablation(str(path))
    assert a.variants == {"one": ("A.B", "[1.0, 2.0]", "C.D", "True", "E.F", "name"), "two": ()}
    assert a.entries()[0].overrides == ("SOLVER.BASE_LR", "0.5", *a.variants["one"])
    assert [e.name for e in a.entries(["two"])] == ["two"]


def test_a_misspelt_key_fails_before_anything_runs(tmp_path):
    a = ablate.ablation_from_args(
        os.path.join(REPO, MASK_RCNN),
        ["ok=MODEL.ROI_MASK_HEAD.NUM_CONV 2", "typo=MODEL.ROI_MASK_HEAD.NUM_CONVS 2"],
    )
    with pytest.raises(SystemExit, match=r"'typo'.*did you mean MODEL.ROI_MASK_HEAD.NUM_CONV"):
        ablate.run_ablation(a, benchmark.settings_for("quick"), str(tmp_path), progress=False)
    assert not (tmp_path / "rows").exists()


def test_runner_gives_one_row_per_override_set(shapes_tiny_env, tmp_path):
    definition = tmp_path / "mask_head.yaml"
    definition.write_text(
        f"title: Mask head depth\nbase: {MASK_RCNN}\n"
        "variants:\n"
        "  4 convs (default): []\n"
        "  1 conv: [MODEL.ROI_MASK_HEAD.NUM_CONV, 1]\n"
    )
    out = tmp_path / "out"
    argv = [
        str(definition),
        "--output",
        str(out),
        "--max-iter",
        "4",
        "--ims-per-batch",
        "2",
        "--num-workers",
        "0",
        "--input-size",
        "64",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--no-progress",
        *shapes_tiny_env.cfg_opts,
        "INPUT.MIN_SIZE_TRAIN",
        "(64,)",
        "MODEL.ROI_BOX_HEAD.NUM_CONV",
        "0",
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        "20",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        "50",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "32",
        "TEST.DETECTIONS_PER_IMAGE",
        "10",
    ]
    assert ablate.main(argv) == 0
    with open(out / "ablation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["4 convs (default)", "1 conv"]
    assert float(rows[1]["params_m"]) < float(rows[0]["params_m"])  # 3 fewer mask-head convs
    for r in rows:
        assert all(r[k] != "" for k, _ in bench_report.COLUMNS)
        assert r["setting_seed"] == "42"
    md = (out / "ablation.md").read_text()
    assert "## Mask head depth" in md and "| 1 conv |" in md
    assert "`MODEL.ROI_MASK_HEAD.NUM_CONV 1`" in md
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_list_shows_every_definition_its_paper_table_and_config_state(capsys, tmp_path):
    assert ablate.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ablate.list_ablations():
        a = ablate.load_ablation(name)
        assert f"{name}  (ready)" in out  # every shipped base config exists
        assert a.paper, f"{name} names no paper table"
        assert f"paper: {a.paper}" in out
    assert "neither [18.2]" in out  # a reference number from the paper, next to its row
    # a definition whose base is absent is listed as such
    (tmp_path / "gone.yaml").write_text(
        "title: t\npaper: P Table 1\nbase: no/such.yaml\nvariants:\n  a: []\n  b: []\n"
        "reference:\n  a: 1.0\n"
    )
    text = ablate.describe(ablate.load_ablation(str(tmp_path / "gone.yaml")))
    assert "MISSING no/such.yaml" in text and "paper: P Table 1" in text and "a [1.0]" in text


def test_reference_must_name_variants(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("title: t\nbase: b.yaml\nvariants:\n  a: []\nreference:\n  z: 1\n")
    with pytest.raises(ValueError, match="names no variant"):
        ablate.load_ablation(str(path))


def test_the_paper_column_reaches_the_table():
    row = {"name": "neither", "task": "instance", "paper": "18.2", "config": "a.yaml"}
    header = collections.defaultdict(lambda: "x")  # every header field
    text = bench_report.render_markdown([row], header, title="t")
    assert "| Paper (ref.) |" in text and "| 18.2 |" in text
