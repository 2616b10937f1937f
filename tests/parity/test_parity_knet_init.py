"""K-Net (semantic, ADE20K R50-D8 rows) initialisation against mmsegmentation 1.2.2 (issue 18
item 4): a fresh build of each mmseg K-Net config (``init_weights()`` run) and a fresh QuerySeg
build of the matching config, compared tensor by tensor through ``tools/convert_knet.py``'s key
mapping (``tests/init_check.py``: constants exactly, random tensors by mean, std and a
Kolmogorov-Smirnov test). The ResNet is excluded: both start it from ImageNet weights.

Tensors whose shapes differ between the two builds are a config-layout question (issue 18 items
1-2, the forward parity rows), not an init one: they are counted and reported, not compared.
"""

from __future__ import annotations

import pytest
import torch
from init_check import init_mismatches
from parity_utils import KNET_ADE20K_ROWS, mmseg_knet_reference

from common.convert.cli import model_from_config
from tools.convert_knet import convert_knet

#: short name -> QuerySeg config (its mmseg config: parity_utils.KNET_ADE20K_ROWS)
ROWS = {
    "fcn": "knet_fcn_R50-D8_80k_ade20k.yaml",
    "pspnet": "knet_pspnet_R50-D8_80k_ade20k.yaml",
    "deeplabv3": "knet_deeplabv3_R50-D8_80k_ade20k.yaml",
    "upernet": "knet_upernet_R50_80k_ade20k.yaml",
}


@pytest.mark.parametrize("row", list(ROWS))
def test_knet_semantic_init_matches_mmseg(mm_refs, parity_table, row):
    ours_cfg = ROWS[row]
    torch.manual_seed(0)
    ref, _ = mmseg_knet_reference(KNET_ADE20K_ROWS[ours_cfg])  # no ImageNet download
    torch.manual_seed(1)
    ours, _ = model_from_config(f"projects/knet/configs/{ours_cfg}")
    ours_state = ours.state_dict()
    ref_state = {k: v for k, v in ref.state_dict().items() if not k.startswith("backbone.")}
    converted, report = convert_knet(ref_state, "semantic", ours_state.keys())
    assert not report.unmapped, report.unmapped
    expected, other_shape = {}, []
    for key, value in converted.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        # a bias's init depends on its layer's fan-in: compare it only if the weight agrees too
        weight = key[: -len("bias")] + "weight" if key.endswith(".bias") else key
        same_weight = weight not in converted or (
            weight in ours_state and ours_state[weight].shape == converted[weight].shape
        )
        if key not in ours_state or ours_state[key].shape != value.shape or not same_weight:
            other_shape.append(key)
        else:
            expected[key] = value
    # the compared / other-shape counts go to the parity table
    parity_table.rows.append(
        (f"K-Net {row} init", "tensors compared / of another shape", "-",
         float(len(expected)), float(len(other_shape)))
    )  # fmt: skip
    assert len(expected) > 30
    problems = init_mismatches(ours_state, expected)
    assert not problems, f"{len(problems)} tensors differ in init:\n" + "\n".join(problems)
