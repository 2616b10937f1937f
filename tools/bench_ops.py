#!/usr/bin/env python
"""Benchmark multi-scale deformable attention: forward + backward of the op at pixel-decoder size.

Default problem (Mask2Former's encoder at 640x640): batch 2, levels res3-res5 = 80^2 + 40^2 + 20^2
= 8400 positions, every position a query, 8 heads, 3 levels, 4 points, 256 channels (D = 32).
Implementations: the PyTorch (grid_sample) path and the compiled CPU kernel on CPU; on a GPU the
PyTorch path and the CUDA kernel too. The compiled module is a prebuilt ``common._C`` or the JIT
build (``--build``, or ``QS_BUILD_OPS=1``). Usage::

    python tools/bench_ops.py                    # CPU (and CUDA if present), default size
    python tools/bench_ops.py --build --iters 10 # JIT-build the ops first if needed
    python tools/bench_ops.py --size 1024 --batch 1 --devices cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import common.ops.build as ops_build
from common.ops.ms_deform_attn import ms_deform_attn


def make_problem(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Random (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(args.size // s, args.size // s) for s in (8, 16, 32, 64, 128)[: args.levels]]
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    S = int(sizes.sum())
    N, M, L, P, D = args.batch, args.heads, args.levels, args.points, args.dim // args.heads
    value = torch.randn(N, S, M, D, generator=g)
    # reference point of each query (its own pixel centre) + offsets of a few pixels
    locations = torch.rand(N, S, M, L, P, 2, generator=g) * 1.1 - 0.05
    weights = torch.rand(N, S, M, L * P, generator=g).softmax(-1).view(N, S, M, L, P)
    tensors = (value, spatial_shapes, level_start_index, locations, weights)
    return tuple(t.to(device) for t in tensors)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_impl(impl: str, problem: tuple[torch.Tensor, ...], iters: int, warmup: int) -> dict:
    """Median forward, backward and forward+backward seconds of ``ms_deform_attn(impl=impl)``."""
    value, shapes, lsi, loc, attn = problem
    device = value.device
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    fwd, bwd = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + iters):
        for t in leaves:
            t.grad = None
        _sync(device)
        t0 = time.perf_counter()
        out = ms_deform_attn(leaves[0], shapes, lsi, leaves[1], leaves[2], impl=impl)
        _sync(device)
        t1 = time.perf_counter()
        out.backward(torch.ones_like(out))
        _sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    result = {
        "fwd": statistics.median(fwd),
        "bwd": statistics.median(bwd),
        "total": statistics.median(f + b for f, b in zip(fwd, bwd)),
    }
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=640, help="square input size (pixels)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--levels", type=int, default=3, help="levels from stride 8 upwards")
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256, help="model channels (heads x D)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--build", action="store_true", help="JIT-build the ops if missing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ext = ops_build.compiled_ops()
    if ext is None and args.build:
        ext = ops_build.load()
        ops_build._compiled = ext
    where = "none" if ext is None else getattr(ext, "__file__", "?")
    with_cuda = bool(ext is not None and ext.with_cuda())
    queries = sum((args.size // s) ** 2 for s in (8, 16, 32, 64, 128)[: args.levels])
    print(
        f"ms_deform_attn forward+backward | batch {args.batch}, {args.size}x{args.size} input, "
        f"{queries} queries = values, {args.heads} heads, {args.levels} levels, "
        f"{args.points} points, {args.dim} dims | torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads | compiled ops: {where} (CUDA: {with_cuda})"
    )
    rows = []
    for dev in args.devices:
        if dev == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        device = torch.device(dev)
        problem = make_problem(args, device)
        impls = ["pytorch"]
        if ext is not None and (dev == "cpu" or with_cuda):
            impls.append("compiled")
        for impl in impls:
            r = time_impl(impl, problem, args.iters, args.warmup)
            kernel = "cuda kernel" if dev == "cuda" else "cpu kernel"
            name = f"{dev}/{impl if impl == 'pytorch' else kernel}"
            rows.append((dev, name, r))
    header = f"{'implementation':<22}{'forward ms':>12}{'backward ms':>13}{'fwd+bwd ms':>12}"
    print(header + f"{'speed-up':>10}")
    base = {}
    for dev, name, r in rows:
        base.setdefault(dev, r["total"])
        line = f"{name:<22}{r['fwd'] * 1e3:>12.1f}{r['bwd'] * 1e3:>13.1f}{r['total'] * 1e3:>12.1f}"
        line += f"{base[dev] / r['total']:>9.2f}x"
        if "peak_mb" in r:
            line += f"  peak {r['peak_mb']:.0f} MiB"
        print(line)


if __name__ == "__main__":
    main()
