"""common.checkpoint: safe loading, the converter core, and strict loading in train_net.py."""

import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from common.convert.core import (
    CheckpointError,
    ConversionReport,
    Rule,
    check_against_model,
    class_permutation,
    convert_state_dict,
    extract_model_state,
    load_checkpoint_file,
    permute_rows,
    save_converted,
)
from common.engine.checkpoint import QSCheckpointer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_only_refuses_arbitrary_objects_and_names_the_file(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {"w": torch.ones(1)}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pth.*weights_only"):
        load_checkpoint_file(path)
    assert "payload" in load_checkpoint_file(path, trusted=True)


def test_pkl_goes_through_the_restricted_unpickler(tmp_path):
    good = tmp_path / "R-50.pkl"
    with open(good, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": np.ones((2, 3), np.float32)}}, f)
    assert load_checkpoint_file(str(good))["blobs"]["conv1_w"].shape == (2, 3)
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match=r"bad.pkl: refusing to unpickle (posix|os)\.system"):
        load_checkpoint_file(str(bad))


def test_missing_and_truncated_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.pth"):
        load_checkpoint_file(str(tmp_path / "nope.pth"))
    path = tmp_path / "cut.pth"
    torch.save({"model": {"w": torch.ones(100)}}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_checkpoint_file(str(path))


def test_numpy_arrays_load_with_weights_only(tmp_path):
    path = str(tmp_path / "np.pth")
    torch.save({"model": {"w": np.arange(4, dtype=np.float32)}}, path)
    state = extract_model_state(load_checkpoint_file(path), path)
    assert torch.equal(state["w"], torch.arange(4.0))


def test_extract_model_state_layouts():
    w = torch.zeros(2)
    assert extract_model_state({"state_dict": {"module.a": w}, "meta": {}}) == {"a": w}
    assert extract_model_state({"model": {"a": w}, "iteration": 3}) == {"a": w}
    assert extract_model_state({"a": w}) == {"a": w}
    with pytest.raises(CheckpointError, match="non-tensor entries: b"):
        extract_model_state({"a": w, "b": "x"}, "f.pth")


def test_rules_map_split_drop_and_report_unmapped():
    src = {
        "neck.lateral_convs.0.conv.weight": torch.ones(2, 2),
        "attn.qkv.weight": torch.arange(6.0).reshape(6, 1),
        "bn.num_batches_tracked": torch.tensor(3),
        "mystery.weight": torch.ones(1),
    }
    rules = [
        Rule(r"neck\.lateral_convs\.(\d)\.conv\.(weight|bias)", r"fpn_lateral\1.\2"),
        Rule(r"attn\.qkv\.weight", ["q.weight", "k.weight", "v.weight"], lambda t: t.chunk(3)),
        Rule(r".*num_batches_tracked", None),
    ]
    out, report = convert_state_dict(src, rules)
    assert sorted(out) == ["fpn_lateral0.weight", "k.weight", "q.weight", "v.weight"]
    torch.testing.assert_close(out["k.weight"], torch.tensor([[2.0], [3.0]]))
    assert report.unmapped == ["mystery.weight"] and not report.ok
    assert "mystery.weight" in report.format()


def test_check_against_model_and_refusal_to_write(tmp_path):
    model = nn.Linear(3, 2)
    state = {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    report = check_against_model(state, model)
    assert report.missing == ["bias"] and report.unexpected == ["extra"]
    assert report.shapes == [("weight", (2, 4), (2, 3))]
    dst = tmp_path / "out.pth"
    refused = r"(?s)not writing .*bias.*extra.*\(2, 4\) vs \(2, 3\)"
    with pytest.raises(CheckpointError, match=refused):
        save_converted(state, report, str(dst), "src.pth")
    assert not dst.exists()
    good = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    save_converted(good, check_against_model(good, model), str(dst), "src.pth", "Linear")
    saved = torch.load(dst, weights_only=True)
    assert saved["meta_architecture"] == "Linear" and not saved["matching_heuristics"]


def test_class_permutation_by_name():
    perm = class_permutation(["a", "b", "c"], ["c", "a", "b"], "fc_cls")
    t = torch.tensor([[0.0], [1.0], [2.0], [9.0]])  # 3 classes + a background row
    torch.testing.assert_close(permute_rows(perm, extra=1)(t), torch.tensor([[2.0], [0], [1], [9]]))
    with pytest.raises(CheckpointError, match=r"absent from the source: \['d'\]"):
        class_permutation(["a", "b"], ["a", "d"], "fc_cls")


class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, classes)


def test_strict_loading_refuses_partial_and_wrong_models(tmp_path):
    src = Net()
    ckpt = QSCheckpointer(src, str(tmp_path))
    ckpt.save("full")
    path = str(tmp_path / "full.pth")
    assert torch.load(path, weights_only=True)["meta_architecture"] == "Net"

    # the same model loads completely
    dst = Net()
    QSCheckpointer(dst).load(path)
    assert torch.equal(dst.head.weight, src.head.weight)

    # another number of classes: a shape error naming the key, unless strictness is off
    with pytest.raises(CheckpointError, match=r"(?s)full.pth .*head.weight: \(3, 4\) vs \(5, 4\)"):
        QSCheckpointer(Net(classes=5)).load(path)
    QSCheckpointer(Net(classes=5), strict=False).load(path)  # Detectron2's warn-and-continue

    # a checkpoint of another meta-architecture
    class Other(Net):
        pass

    with pytest.raises(CheckpointError, match="checkpoint of Net, but the config builds Other"):
        QSCheckpointer(Other()).load(path)

    # ... unless the model declares that a Net checkpoint initialises it, and which of its
    # keys such a checkpoint leaves fresh (QueryInstVIS from an image QueryInst)
    class Extended(Net):
        initialises_from = {"Net": ("track.",)}

        def __init__(self):
            super().__init__()
            self.track = nn.Linear(4, 2)

    ext = Extended()
    fresh = ext.track.weight.detach().clone()
    QSCheckpointer(ext).load(path)
    assert torch.equal(ext.head.weight, src.head.weight)
    assert torch.equal(ext.track.weight, fresh)
    # the declared prefixes excuse nothing else: a missing head key still stops the load
    state = {k: v for k, v in src.state_dict().items() if k != "head.bias"}
    torch.save({"model": state, "meta_architecture": "Net"}, tmp_path / "net_cut.pth")
    with pytest.raises(CheckpointError, match=r"(?s)does not provide.*head.bias"):
        QSCheckpointer(Extended()).load(str(tmp_path / "net_cut.pth"))

    # a full-model checkpoint with a missing key
    state = dict(src.state_dict())
    del state["head.bias"]
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"(?s)does not provide.*head.bias"):
        QSCheckpointer(Net()).load(str(tmp_path / "partial.pth"))


def test_backbone_initialisation_may_leave_the_heads_missing(tmp_path):
    src = Net()
    state = {k: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    torch.save({"model": state}, tmp_path / "imagenet.pth")
    dst = Net()
    QSCheckpointer(dst).load(str(tmp_path / "imagenet.pth"))
    assert torch.equal(dst.backbone[0].weight, src.backbone[0].weight)
    # ... but not incomplete where it does cover the model
    del state["backbone.1.running_var"]
    torch.save({"model": state}, tmp_path / "imagenet_cut.pth")
    with pytest.raises(CheckpointError, match="backbone.1.running_var"):
        QSCheckpointer(Net()).load(str(tmp_path / "imagenet_cut.pth"))
    # keys under backbone. that match nothing are unexpected
    torch.save({"model": {"backbone.body.conv.weight": torch.ones(1)}}, tmp_path / "mm.pth")
    with pytest.raises(CheckpointError, match="backbone.body.conv.weight"):
        QSCheckpointer(Net()).load(str(tmp_path / "mm.pth"))


def test_report_ok_only_when_empty():
    assert ConversionReport().ok
    assert not ConversionReport(missing=["x"]).ok
