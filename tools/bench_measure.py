"""Measuring one built model, shared by ``tools/benchmark.py`` and ``tools/ablate.py``.

All measurements use the same fixed input, batch 1, model in eval mode, under ``no_grad``:

- parameters: ``sum(p.numel())`` over ``model.parameters()``;
- GFLOPs: Detectron2's fvcore ``FlopCountAnalysis`` (one fused multiply-add counts as one FLOP, as
  the papers' tables do), plus fused attention, which fvcore does not count; other ops fvcore has
  no handle for (RoIAlign, top-k, element-wise ops) are not counted and are listed in the log;
- latency: :func:`measure_latency`, the median of ``repeats`` timed calls after ``warmup`` calls
  (CUDA synchronised around each call on a GPU);
- peak memory: :func:`peak_memory_mb`; on CUDA ``torch.cuda.max_memory_allocated`` over one
  forward; on the CPU the model's parameter and buffer bytes plus the process's peak-RSS increase
  during one forward (Linux ``/proc/self/status`` VmHWM after resetting it through
  ``/proc/self/clear_refs``, with freed heap returned first by ``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import gc
import math
import re
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: metric column -> (evaluator result key, metric name).
METRICS = {
    "AP": ("segm", "AP"),
    "box_AP": ("bbox", "AP"),
    "PQ": ("panoptic_seg", "PQ"),
    "PQ_th": ("panoptic_seg", "PQ_th"),
    "mIoU": ("sem_seg", "mIoU"),
    # video instance segmentation (common.data.ytvis_evaluation): mask-tube AP, its own columns
    "vAP": ("video_segm", "AP"),
    "vAR10": ("video_segm", "AR10"),
    "IDSW": ("video_segm", "IDSW"),
}


@dataclass
class LatencyStats:
    """Latency of ``repeats`` timed calls, in milliseconds."""

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    times_ms: list[float]


def measure_latency(
    fn: Callable[[], Any],
    *,
    warmup: int = 5,
    repeats: int = 20,
    synchronize: Callable[[], None] | None = None,
    on_call: Callable[[], None] | None = None,
) -> LatencyStats:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; median etc. in ms.

    Args:
        fn: one inference (e.g. ``lambda: model(inputs)``).
        synchronize: called after each call before the clock is read (``torch.cuda.synchronize``
            on a GPU, so that asynchronous kernels are counted).
        on_call: called after every call (progress reporting).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = synchronize or (lambda: None)
    tick = on_call or (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
        tick()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        tick()
    return LatencyStats(
        statistics.median(times), statistics.fmean(times), min(times), max(times), times
    )


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


def peak_memory_mb(
    fn: Callable[[], Any], model: torch.nn.Module, device: torch.device
) -> tuple[float, str]:
    """Peak memory of one call of ``fn`` (one forward), in MiB, and how it was measured.

    CUDA: ``max_memory_allocated`` (weights + activations). CPU: the model's parameter/buffer
    bytes plus the peak-RSS increase during the call (VmHWM - VmRSS before); where VmHWM cannot
    be reset, the ``ru_maxrss`` increase (a lower bound: 0 if an earlier peak was higher).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    tensors = [*model.parameters(), *model.buffers()]
    model_mb = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    gc.collect()
    if _reset_peak_rss():
        before = _proc_status_kb("VmRSS")
        fn()
        peak = _proc_status_kb("VmHWM")
        return model_mb + max(peak - before, 0) / 1024, "weights + peak RSS increase (VmHWM)"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return model_mb + (after - before) / 1024, "weights + ru_maxrss increase (lower bound)"


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _sdpa_flop(inputs: list, outputs: list) -> int:
    """``scaled_dot_product_attention(q [...,Lq,E], k [...,Lk,E], v [...,Lk,Ev])``: the
    multiply-adds of q k^T and of attn v."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _native_mha_flop(inputs: list, outputs: list) -> int:
    """``_native_multi_head_attention`` (nn.MultiheadAttention's eval fast path), batch-first
    q [B,Lq,E], k/v [B,Lk,E]: input projections, q k^T, attn v and the output projection."""
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    b, lq, e = q
    lk = k[1]
    return b * (lq * e * e + 2 * lk * e * e + 2 * lq * lk * e + lq * e * e)


#: Marker in count_gflops' uncounted-ops dict: the count comes from torch's FlopCounterMode.
FLOP_COUNTER_FALLBACK = "(fvcore trace empty: counted with torch FlopCounterMode)"


def count_gflops(model: torch.nn.Module, inputs: list[dict]) -> tuple[float, dict[str, int]]:
    """GFLOPs of one eval-mode forward on ``inputs`` with fvcore (1 multiply-add = 1 FLOP).

    Attention (``scaled_dot_product_attention``, ``_native_multi_head_attention``), which fvcore
    does not count, is counted here as its matrix products.

    Returns:
        (GFLOPs, {op name: number of calls} of the ops fvcore could not count).
    """
    from detectron2.utils.analysis import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fca = FlopCountAnalysis(model, inputs)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            fca.set_op_handle(
                **{
                    "aten::scaled_dot_product_attention": _sdpa_flop,
                    "aten::_native_multi_head_attention": _native_mha_flop,
                }
            )
            total = fca.total()
            if total > 0:
                return total / 1e9, dict(fca.unsupported_ops())
            # An output that does not depend on the computation (e.g. an empty panoptic map from
            # a randomly initialised model) leaves the traced graph empty; count the executed ops
            # with PyTorch's FlopCounterMode instead (it counts 2 FLOPs per multiply-add).
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                model(inputs)
            return counter.get_total_flops() / 2e9, {FLOP_COUNTER_FALLBACK: 1}
    finally:
        model.train(was_training)


def extract_metrics(results: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """{"AP": mask AP, "PQ": ..., "mIoU": ...} from evaluator results (None when absent)."""
    out = {}
    for col, (task, key) in METRICS.items():
        value = results.get(task, {}).get(key)
        out[col] = None if value is None else float(value)
    return out


def task_of(results: dict[str, Any]) -> str:
    """ "panoptic" | "instance" | "semantic" | "video" from which evaluator produced results."""
    if "video_segm" in results:
        return "video"
    if "panoptic_seg" in results:
        return "panoptic"
    if "segm" in results or "bbox" in results:
        return "instance"
    return "semantic" if "sem_seg" in results else "none"
