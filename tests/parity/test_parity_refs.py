"""The parity suite's own plumbing: the references come from ``.parity_refs/`` at their pinned
versions and not from the project's environment, and the ``mmcv._ext`` shim computes mmcv's
RoIAlign as Detectron2's ``ROIAlign`` does (forward and backward, float64)."""

from __future__ import annotations

import subprocess
import sys

import parity_refs
import pytest
import torch


def test_refs_pinned_and_outside_the_venv(mm_refs):
    assert mm_refs == parity_refs.REFS
    probe = "import importlib.util as u; print(u.find_spec('mmdet') is None)"
    out = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True)
    # -S: without site-packages; the plain interpreter must not find mmdet either
    assert out.stdout.strip() == "True"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "True", "mmdet is installed in the project's environment"


def test_unshimmed_kernel_fails_by_name(mm_refs):
    import mmcv

    with pytest.raises(NotImplementedError, match="mmcv._ext.deform_conv_forward"):
        mmcv._ext.deform_conv_forward()


@pytest.mark.parametrize("aligned", [True, False])
def test_shim_roi_align_equals_detectron2(mm_refs, aligned):
    from detectron2.layers import ROIAlign
    from mmcv.ops import RoIAlign

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 20, 24, generator=g, dtype=torch.float64)
    rois = torch.tensor(
        [[0, 1.3, 2.2, 15.7, 11.1], [1, 0.0, 0.0, 23.0, 19.0], [1, 5.5, 4.25, 9.0, 18.5]],
        dtype=torch.float64,
    )
    grad = torch.randn(3, 3, 7, 7, generator=g, dtype=torch.float64)
    outs = []
    for op in (RoIAlign(7, 0.5, 2, "avg", aligned), ROIAlign((7, 7), 0.5, 2, aligned)):
        xi = x.clone().requires_grad_(True)
        y = op(xi, rois)
        (y * grad).sum().backward()
        outs.append((y.detach(), xi.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=1e-15)
