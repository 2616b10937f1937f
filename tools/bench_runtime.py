"""Inference runtimes side by side (``tools/benchmark.py --runtime ...``).

For each model (random weights are fine: the work does not depend on them, except how many
detections reach the post-processing) and each thread count, one fixed image of the config's
official test size (a COCO 4:3 image resized to the test short side) runs through:

- ``eager``: the model as built, under ``no_grad`` (QuerySeg's default path);
- ``fast``: ``MODEL.FAST_INFERENCE`` (``common.modeling.fast_inference``: BatchNorm folded,
  channels-last, ``inference_mode``, selected-queries post-processing);
- ``onnxruntime``: the inference core exported to ONNX (``common.modeling.export``) in
  onnxruntime's CPU provider, then the model's own post-processing (its fast variant).

Reported per row: median latency of ``--timing-iters`` calls after one warm-up (the runtimes
interleaved call by call, so that other load on a shared machine hits them alike), the speed-up
over eager at the same thread count, peak memory (``bench_measure.peak_memory_mb``; for
onnxruntime the torch model's weight bytes stand for the session's copy), GFLOP/s (2 FLOPs per
multiply-add of fvcore's count of one forward, divided by the latency) and its fraction of the
machine's 3 x 3 convolution rate measured in the same run (:func:`conv_rate`), the max abs
difference of the raw core outputs against eager, and whether the final results agree.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

RUNTIMES = ("eager", "fast", "onnxruntime")

#: name -> (config, (h, w)): each method's official COCO test size for a 4:3 image
RUNTIME_MODELS = {
    "FastInst-D1 R50": (
        "projects/fastinst/configs/fastinst_R50_ppm-fpn_D1_576_50ep_coco.yaml",
        (576, 768),
    ),
    "K-Net R50": ("projects/knet/configs/knet_R50_1x_coco.yaml", (800, 1067)),
    "QueryInst R50": ("projects/queryinst/configs/queryinst_R50_FPN_1x_coco.yaml", (800, 1067)),
    "EmbedMask R50": ("projects/embedmask/configs/embedmask_R50_1x_coco.yaml", (800, 1067)),
}
#: per-model overrides: a randomly initialised FCOS scores below 0.05 (its prior is 0.01), so
#: EmbedMask runs at threshold 0 to post-process its full 100 detections as a trained model does
RUNTIME_OPTS = {"EmbedMask R50": ["MODEL.FCOS.INFERENCE_TH", "0.0"]}


@dataclasses.dataclass
class RuntimeRow:
    model: str
    runtime: str
    threads: int
    latency_ms: float
    peak_mb: float
    gflop: float
    conv_gflops: float
    max_abs_diff: float | None = None
    agreement: str = ""
    speedup: float | None = None

    @property
    def gflops(self) -> float:
        return self.gflop / (self.latency_ms / 1e3)


def conv_rate(threads: int, size: tuple[int, int] = (72, 96), channels: int = 256, iters: int = 5):
    """The machine's 3 x 3 convolution rate in GFLOP/s (2 FLOPs per multiply-add): a
    [1, C, h, w] x C -> C 3 x 3 convolution (FastInst-D1's stride-8 map by default), median of
    ``iters`` calls under ``inference_mode``."""
    torch.set_num_threads(threads)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
    x = torch.randn(1, channels, *size)
    flop = 2 * channels * channels * 9 * size[0] * size[1]
    times = []
    with torch.inference_mode():
        for i in range(iters + 2):
            t0 = time.perf_counter()
            conv(x)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    times.sort()
    return flop / times[len(times) // 2] / 1e9


def build_model(config: str, opts: Sequence[str], fast: bool) -> torch.nn.Module:
    """Random-weight eval model of ``config`` (seeded: eager and fast get the same weights)."""
    from detectron2.modeling import build_model as d2_build

    from common.engine import get_cfg, merge_config, setup_queryseg

    setup_queryseg()
    cfg = get_cfg()
    flag = "True" if fast else "False"
    merge_config(
        cfg,
        config,
        ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts, "MODEL.FAST_INFERENCE", flag],
    )
    torch.manual_seed(0)
    model = d2_build(cfg).eval()
    if cfg.MODEL.FAST_INFERENCE:
        from common.modeling.fast_inference import prepare_fast_inference

        prepare_fast_inference(model)
    return model


def sample_input(size: tuple[int, int]) -> list[dict[str, Any]]:
    """A smooth random image (blobs, so that random-weight models still see structure)."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 3, size[0] // 32 + 1, size[1] // 32 + 1, generator=g) * 255
    image = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return [{"image": image[0].round(), "height": size[0], "width": size[1]}]


class _OnnxRunner:
    """Export once, then preprocess (torch) -> onnxruntime core -> post-processing (torch)."""

    def __init__(self, model: torch.nn.Module, inputs: list[dict], threads: int, folder: str):
        from common.modeling.export import core_inputs, export_onnx, onnxruntime_session

        self.model = model
        images, sizes = core_inputs(model, inputs)
        self.path = os.path.join(folder, "core.onnx")
        if not os.path.isfile(self.path):
            self.names = export_onnx(model, images.tensor, sizes, self.path)
        else:
            self.names = list(model.core_output_names)
        self.session = onnxruntime_session(self.path, threads=threads)

    def raw(self, inputs: list[dict]) -> tuple[dict, Any]:
        from common.modeling.export import core_inputs, run_onnxruntime

        images, sizes = core_inputs(self.model, inputs)
        return run_onnxruntime(self.session, images.tensor, sizes, self.names), images

    def __call__(self, inputs: list[dict]) -> list[dict]:
        with torch.inference_mode():
            outputs, images = self.raw(inputs)
            return self.model.core_postprocess(outputs, inputs, images)


def _raw(model, inputs) -> dict[str, torch.Tensor]:
    from common.modeling.export import core_inputs

    with torch.inference_mode():
        images, sizes = core_inputs(model, inputs)
        out = model.inference_core(images.tensor, sizes)
        return {k: out[k].contiguous() for k in model.core_output_names}


def _time(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def _time_interleaved(fns: dict[str, Any], iters: int) -> dict[str, float]:
    """Median ms of each call, the runtimes interleaved round by round (one warm-up round):
    on a shared machine, load that comes and goes hits every runtime alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def measure_model(
    name: str,
    config: str,
    size: tuple[int, int],
    runtimes: Sequence[str],
    threads: Sequence[int],
    iters: int,
    opts: Sequence[str] = (),
    conv_rates: dict[int, float] | None = None,
) -> list[RuntimeRow]:
    """Every (thread count, runtime) row of one model; see the module docstring."""
    from common.modeling.export import compare_results, max_abs_diff
    from common.modeling.fast_inference import fast_inference

    if __package__:
        from .bench_measure import count_gflops, peak_memory_mb
    else:
        from bench_measure import count_gflops, peak_memory_mb

    inputs = sample_input(size)
    eager = build_model(config, opts, fast=False)
    gflop = 2 * count_gflops(eager, inputs)[0]
    fast = build_model(config, opts, fast=True) if {"fast", "onnxruntime"} & set(runtimes) else None
    with torch.no_grad():
        reference = eager(inputs)
    ref_raw = _raw(eager, inputs)
    rows = []
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        for t in threads:
            rate = (conv_rates or {}).get(t) or conv_rate(t)
            torch.set_num_threads(t)
            runs = {}  # runtime -> (call, model, raw outputs)
            for runtime in runtimes:
                if runtime == "eager":

                    def fn(m=eager):
                        with torch.no_grad():
                            return m(inputs)

                    runs[runtime] = (fn, eager, ref_raw)
                elif runtime == "fast":

                    def fn(m=fast):
                        return fast_inference(m, inputs)

                    runs[runtime] = (fn, fast, _raw(fast, inputs))
                elif runtime == "onnxruntime":
                    runner = _OnnxRunner(fast, inputs, t, folder)

                    def fn(r=runner):
                        return r(inputs)

                    runs[runtime] = (fn, fast, runner.raw(inputs)[0])
                else:
                    raise ValueError(f"--runtime must be among {RUNTIMES}, got {runtime!r}")
            latencies = _time_interleaved({k: v[0] for k, v in runs.items()}, iters)
            for runtime, (fn, model, raw) in runs.items():
                peak, _ = peak_memory_mb(fn, model, device)
                agreement = compare_results(reference, fn())
                rows.append(
                    RuntimeRow(
                        model=name,
                        runtime=runtime,
                        threads=t,
                        latency_ms=latencies[runtime],
                        peak_mb=peak,
                        gflop=gflop,
                        conv_gflops=rate,
                        max_abs_diff=max(max_abs_diff(ref_raw, raw).values()),
                        agreement=_agreement_text(agreement),
                    )
                )
            base = next((r for r in rows if r.threads == t and r.runtime == "eager"), None)
            for r in rows:
                if r.threads == t and base is not None:
                    r.speedup = base.latency_ms / r.latency_ms
    return rows


def _agreement_text(report: dict[str, float]) -> str:
    if "count_a" in report:
        same = report["count_a"] == report["count_b"] and report["class_agreement"] == 1.0
        verdict = "same" if same else "DIFFERENT"
        text = f"{verdict} ({int(report['count_b'])} inst, mask IoU >= {report['mask_iou']:.4f}"
        return text + f", box diff {report.get('box_diff', 0.0):.2g} px)"
    if "panoptic_pixel_agreement" in report:
        return f"pixels {report['panoptic_pixel_agreement']:.4f}"
    if "sem_seg_argmax_agreement" in report:
        return f"argmax {report['sem_seg_argmax_agreement']:.4f}"
    return "-"


def format_table(rows: Sequence[RuntimeRow]) -> str:
    """One Markdown table of all rows."""
    lines = [
        "| model | runtime | threads | latency (ms) | speed-up | peak mem (MiB) | GFLOP | "
        "GFLOP/s | of 3x3-conv rate | max abs diff (raw) | final results vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = "0" if not r.max_abs_diff else f"{r.max_abs_diff:.2g}"
        speedup = "-" if r.speedup is None else f"{r.speedup:.2f}x"
        lines.append(
            f"| {r.model} | {r.runtime} | {r.threads} | {r.latency_ms:.0f} | "
            f"{speedup} | {r.peak_mb:.0f} | {r.gflop:.1f} | {r.gflops:.1f} | "
            f"{r.gflops / r.conv_gflops:.0%} of {r.conv_gflops:.0f} | {diff} | {r.agreement} |"
        )
    return "\n".join(lines)


def profile_top_ops(
    config: str, size: tuple[int, int], fast: bool, threads: int, top: int = 12, opts=()
) -> str:
    """``torch.profiler`` table (CPU self time) of one forward, the ``top`` ops."""
    from common.modeling.fast_inference import fast_inference

    torch.set_num_threads(threads)
    model = build_model(config, opts, fast=fast)
    inputs = sample_input(size)
    with torch.no_grad():
        model(inputs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        if fast:
            fast_inference(model, inputs)
        else:
            with torch.no_grad():
                model(inputs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def run(
    models: Sequence[str],
    runtimes: Sequence[str],
    threads: Sequence[int],
    iters: int,
    opts: Sequence[str] = (),
    profile: bool = False,
    repo: str = ".",
) -> str:
    """The whole runtime comparison as Markdown (conv rates, table, optional profiles)."""
    unknown = [m for m in models if m not in RUNTIME_MODELS]
    if unknown:
        raise ValueError(f"unknown --runtime-models {unknown}; choose from {list(RUNTIME_MODELS)}")
    rates = {t: conv_rate(t) for t in threads}
    rows = []
    for name in models:
        config, size = RUNTIME_MODELS[name]
        model_opts = [*RUNTIME_OPTS.get(name, []), *opts]
        rows += measure_model(
            name, os.path.join(repo, config), size, runtimes, threads, iters, model_opts, rates
        )
    out = [
        f"torch {torch.__version__}, CPU, batch 1, random weights, median of {iters} calls; "
        "3x3-conv rate: " + ", ".join(f"{rates[t]:.0f} GFLOP/s at {t} thread(s)" for t in threads),
        "",
        format_table(rows),
    ]
    if profile:
        for name in models:
            config, size = RUNTIME_MODELS[name]
            for fast in (False, True):
                label = "fast" if fast else "eager"
                out += ["", f"{name}, {label}, 1 thread: torch.profiler top ops", "```"]
                out.append(profile_top_ops(os.path.join(repo, config), size, fast, 1, opts=opts))
                out.append("```")
    return "\n".join(out)


def compile_probe(config: str, size: tuple[int, int], threads: int, iters: int = 3, opts=()) -> str:
    """Whether ``torch.compile`` helps on this machine: the fast model's backbone (most of the
    convolution time) eager vs ``torch.compile`` (inductor), latency and compile time."""
    torch.set_num_threads(threads)
    model = build_model(config, opts, fast=True)
    from common.modeling.export import core_inputs

    images, _ = core_inputs(model, sample_input(size))
    x = images.tensor
    backbone = model.backbone

    def eager_fn():
        with torch.inference_mode():
            return backbone(x)

    eager_ms = _time(eager_fn, iters)
    compiled = torch.compile(backbone)
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
    compile_s = time.perf_counter() - t0

    def compiled_fn():
        with torch.inference_mode():
            return compiled(x)

    compiled_ms = _time(compiled_fn, iters)
    return (
        f"torch.compile probe ({threads} thread(s), backbone of {os.path.basename(config)} at "
        f"{size[0]}x{size[1]}): fast eager {eager_ms:.0f} ms, compiled {compiled_ms:.0f} ms "
        f"(x{eager_ms / compiled_ms:.2f}), first compiled call {compile_s:.0f} s"
    )
