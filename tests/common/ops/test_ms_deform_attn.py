"""Multi-scale deformable attention: PyTorch path vs a naive loop, compiled CPU/CUDA kernels vs the
PyTorch path (forward and gradients), gradcheck in float64, float16/bfloat16 handling.

Compiled-kernel tests use a prebuilt ``common._C``, or the JIT build (``common.ops.build.load``):
with ``QS_BUILD_OPS=1`` it is built when missing (CPU sources only without a GPU: ~30 s once on 2
free cores, then cached); without it an up-to-date cached build is used, else they skip. CUDA
tests need a GPU and use a CUDA ``common._C`` or JIT-build one.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import common.ops.build as ops_build
from common.ops.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)

# (N, M, D, level shapes, Lq, P): several levels of different (non-square) sizes.
CASES = [
    (2, 2, 8, [(6, 4), (3, 2)], 5, 3),
    (1, 8, 32, [(20, 17), (10, 9), (5, 5)], 30, 4),
    (3, 1, 71, [(7, 7)], 4, 2),
    (2, 4, 5, [(9, 1), (1, 6), (2, 2), (4, 3)], 7, 1),
]


def make_inputs(
    N: int, M: int, D: int, shapes, Lq: int, P: int, dtype=torch.float64, device="cpu", seed=0
):
    """Random inputs; ~30% of the sampling locations fall outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    L = len(shapes)
    value = torch.randn(N, int(sizes.sum()), M, D, generator=g, dtype=dtype)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=dtype) + 0.05
    attn = attn / attn.sum((-1, -2), keepdim=True)
    to = {"device": device}
    return (
        value.to(**to),
        spatial_shapes.to(**to),
        level_start_index.to(**to),
        loc.to(**to),
        attn.to(**to),
    )


def naive_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Point-by-point bilinear sampling (zeros outside, align_corners=False), for reference."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out = value.new_zeros(N, Lq, M, D)
    start = 0
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        v = value[:, start : start + H * W].view(N, H, W, M, D)
        start += H * W
        for n in range(N):
            for q in range(Lq):
                for m in range(M):
                    for p in range(P):
                        x, y = sampling_locations[n, q, m, lvl, p].tolist()
                        w_im, h_im = x * W - 0.5, y * H - 0.5
                        h0, w0 = math.floor(h_im), math.floor(w_im)
                        lh, lw = h_im - h0, w_im - w0
                        acc = value.new_zeros(D)
                        for dh, dw, wt in (
                            (0, 0, (1 - lh) * (1 - lw)),
                            (0, 1, (1 - lh) * lw),
                            (1, 0, lh * (1 - lw)),
                            (1, 1, lh * lw),
                        ):
                            hh, ww = h0 + dh, w0 + dw
                            if 0 <= hh < H and 0 <= ww < W:
                                acc = acc + wt * v[n, hh, ww, m]
                        out[n, q, m] += attention_weights[n, q, m, lvl, p] * acc
    return out.view(N, Lq, M * D)


def _outputs_and_grads(fn, value, shapes, lsi, loc, attn, grad_seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, lsi, leaves[1], leaves[2])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), grads


def _impl(name):
    return lambda v, s, lsi, loc, a: ms_deform_attn(v, s, lsi, loc, a, impl=name)


@pytest.fixture(scope="module")
def compiled_cpu():
    """The compiled ops module (CPU kernels), made the one ``compiled_ops()`` returns."""
    ext = ops_build.compiled_ops()  # common._C, or a JIT build when QS_BUILD_OPS=1
    if ext is None:
        if not ops_build.jit_build_is_fresh(with_cuda=False):
            pytest.skip("compiled ops not built: set QS_BUILD_OPS=1 (JIT, ~30 s once, cached)")
        ext = ops_build.load(with_cuda=False)  # an up-to-date cached JIT build: no compiling
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops_build, "_compiled", ext)
        yield ext


@pytest.fixture(scope="module")
def compiled_cuda():
    """The compiled ops module with CUDA kernels (needs a GPU)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ext = ops_build.compiled_ops()
    if ext is None or not ext.with_cuda():
        ext = ops_build.load(with_cuda=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops_build, "_compiled", ext)
        yield ext


def test_pytorch_path_matches_naive_loop():
    for case in CASES[:2] + CASES[3:]:
        value, shapes, _, loc, attn = make_inputs(*case)
        ref = naive_ms_deform_attn(value, shapes, loc, attn)
        out = ms_deform_attn_pytorch(value, shapes, loc, attn)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        # spatial shapes may also be given as a list of (H, W)
        torch.testing.assert_close(ms_deform_attn_pytorch(value, shapes.tolist(), loc, attn), out)


def test_pytorch_path_gradcheck():
    value, shapes, lsi, loc, attn = make_inputs(1, 2, 3, [(4, 3), (2, 2)], 3, 2)
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    fn = _impl("pytorch")
    assert torch.autograd.gradcheck(lambda v, l, a: fn(v, shapes, lsi, l, a), inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_compiled_cpu_matches_pytorch(compiled_cpu, case, dtype):
    inputs = make_inputs(*case, dtype=dtype)
    ref, ref_grads = _outputs_and_grads(_impl("pytorch"), *inputs)
    out, grads = _outputs_and_grads(_impl("compiled"), *inputs)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(out, ref, **tol)
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        torch.testing.assert_close(g, r, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


def test_compiled_cpu_gradcheck(compiled_cpu):
    value, shapes, lsi, loc, attn = make_inputs(2, 2, 3, [(4, 3), (2, 5)], 3, 2)
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    fn = _impl("compiled")
    assert torch.autograd.gradcheck(lambda v, l, a: fn(v, shapes, lsi, l, a), inputs)


def test_auto_prefers_compiled_cpu_kernel(compiled_cpu, monkeypatch):
    module = importlib.import_module("common.ops.ms_deform_attn")
    calls = []
    original = module.MSDeformAttnFunction.apply
    monkeypatch.setattr(
        module.MSDeformAttnFunction, "apply", lambda *a: calls.append(1) or original(*a)
    )
    inputs = make_inputs(*CASES[0], dtype=torch.float32)
    ms_deform_attn(*inputs)
    expected = 1 if module.CPU_KERNEL_PREFERRED else 0
    assert len(calls) == expected
    ms_deform_attn(*inputs, impl="pytorch")
    assert len(calls) == expected


def test_compiled_missing_raises(monkeypatch):
    monkeypatch.setattr(ops_build, "_compiled", None)
    inputs = make_inputs(*CASES[0], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="not built"):
        ms_deform_attn(*inputs, impl="compiled")
    ms_deform_attn(*inputs)  # auto falls back to PyTorch
    with pytest.raises(ValueError):
        ms_deform_attn(*inputs, impl="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["pytorch", "compiled"])
def test_low_precision_inputs(request, impl, dtype):
    if impl == "compiled":
        request.getfixturevalue("compiled_cpu")
    value, shapes, lsi, loc, attn = make_inputs(*CASES[1], dtype=torch.float32)
    ref = ms_deform_attn(value, shapes, lsi, loc, attn, impl="pytorch")
    low = [t.to(dtype).requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(low[0], shapes, lsi, low[1], low[2], impl=impl)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype for t in low)


def test_module_shapes_init_and_autocast(request):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    # Mask2Former's init: zero offset weights, ring of directions scaled by point index.
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    torch.testing.assert_close(bias[:, :, 2], 3 * bias[:, :, 0])
    assert torch.allclose(bias[..., 0, :].abs().amax(-1), torch.ones(4, 2))
    shapes = torch.tensor([[6, 5], [3, 3]])
    lsi = torch.tensor([0, 30])
    src = torch.randn(2, 39, 32)
    query = torch.randn(2, 7, 32)
    ref2 = torch.rand(2, 7, 2, 2)
    ref4 = torch.cat([ref2, torch.rand(2, 7, 2, 2) * 0.3], -1)
    out2 = attn(query, ref2, src, shapes, lsi)
    out4 = attn(query, ref4, src, shapes, lsi, torch.zeros(2, 39, dtype=torch.bool))
    assert out2.shape == out4.shape == (2, 7, 32)
    out2.sum().backward()
    assert attn.sampling_offsets.weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, ref2, src, shapes, lsi)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), out2.detach(), rtol=0.1, atol=0.1)


def test_module_pytorch_vs_compiled(compiled_cpu):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    shapes = torch.tensor([[6, 5], [3, 3]])
    args = (torch.randn(2, 7, 32), torch.rand(2, 7, 2, 2), torch.randn(2, 39, 32), shapes)
    outs = []
    for impl in ("pytorch", "compiled"):
        attn.impl = impl
        outs.append(attn(*args, torch.tensor([0, 30])))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES + [(2, 8, 32, [(40, 40), (20, 20), (10, 10)], 300, 4)])
def test_cuda_matches_pytorch(compiled_cuda, case, dtype):
    inputs = make_inputs(*case, dtype=dtype, device="cuda")
    ref, ref_grads = _outputs_and_grads(_impl("pytorch"), *inputs)
    out, grads = _outputs_and_grads(_impl("compiled"), *inputs)
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-3}
    torch.testing.assert_close(out, ref, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gradcheck_and_half(compiled_cuda):
    value, shapes, lsi, loc, attn = make_inputs(2, 2, 35, [(4, 3), (2, 5)], 3, 2, device="cuda")
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    fn = _impl("compiled")
    assert torch.autograd.gradcheck(lambda v, l, a: fn(v, shapes, lsi, l, a), inputs)
    half = [t.detach().half() for t in (value, loc, attn)]
    out = ms_deform_attn(half[0], shapes, lsi, half[1], half[2])
    assert out.dtype == torch.float16
    ref = ms_deform_attn(value, shapes, lsi, loc, attn, impl="pytorch")
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0.02, atol=0.02)


def _check_non_finite_like_pytorch(bad, where, device):
    value, shapes, lsi, loc, attn = make_inputs(2, 2, 4, [(5, 4), (3, 2)], 3, 2)
    if where == "attn_outside":
        loc[1, 2, 1, 0, 1] = torch.tensor([1.7, 0.4], dtype=loc.dtype)
        attn[1, 2, 1, 0, 1] = bad
    else:
        loc[1, 2, 1, 0, 1, 0 if where == "loc_x" else 1] = bad
    inputs = [t.to(device) for t in (value, shapes, lsi, loc, attn)]
    ref, ref_grads = _outputs_and_grads(_impl("pytorch"), *inputs)
    out, grads = _outputs_and_grads(_impl("compiled"), *inputs)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    finite = ~ref.isnan()
    torch.testing.assert_close(out[finite], ref[finite])
    if where != "attn_outside":  # grid_sample's gradients of the point itself are NaN as well
        assert grads[2][1, 2, 1, 0, 1].isnan() and ref_grads[2][1, 2, 1, 0, 1].isnan()
        assert grads[1][1, 2, 1, 0, 1].isnan().any()
        assert not grads[0].isnan().any() and not ref_grads[0].isnan().any()


NON_FINITE = pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
WHERE = pytest.mark.parametrize("where", ["loc_x", "loc_y", "attn_outside"])


@NON_FINITE
@WHERE
def test_compiled_cpu_propagates_non_finite_like_pytorch(compiled_cpu, bad, where):
    """A NaN/Inf sampling location (or a NaN/Inf weight of a point outside the map) gives NaN in
    the kernel as in grid_sample, instead of a silent zero that keeps a diverging loss finite."""
    _check_non_finite_like_pytorch(bad, where, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@NON_FINITE
@WHERE
def test_cuda_propagates_non_finite_like_pytorch(compiled_cuda, bad, where):
    _check_non_finite_like_pytorch(bad, where, "cuda")
