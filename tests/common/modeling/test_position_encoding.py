"""The shared sine positional encoding against a direct evaluation of its formula."""

import math

import torch

from common.modeling.position_encoding import sine_position_encoding


def test_matches_formula():
    h, w, f, t = 3, 5, 4, 100.0
    pe = sine_position_encoding(h, w, num_feats=f, temperature=t)
    assert pe.shape == (1, 2 * f, h, w)
    for i in range(h):
        for j in range(w):
            for axis, pos, n in ((0, i, h), (1, j, w)):
                v = (pos + 1) / (n + 1e-6) * 2 * math.pi
                for k in range(f):
                    arg = v / t ** (2 * (k // 2) / f)
                    ref = math.sin(arg) if k % 2 == 0 else math.cos(arg)
                    assert abs(pe[0, axis * f + k, i, j].item() - ref) < 1e-5


def test_dtype_and_device():
    pe = sine_position_encoding(2, 2, num_feats=8, dtype=torch.float16)
    assert pe.dtype == torch.float16
