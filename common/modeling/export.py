"""Export and run a meta-architecture's *inference core* in another runtime.

Every QuerySeg meta-architecture splits inference in two (the pattern of Detectron2's
``TracingAdapter`` and SparseInst's ``forward_test``, with the post-processing kept in Python):

- ``inference_core(images, image_sizes) -> dict[str, Tensor]``: normalised, padded images
  [B, 3, H, W] and the unpadded (h, w) [B, 2] in, the raw output tensors (logits, masks, boxes)
  out, named by the class attribute ``core_output_names``. Traceable: fixed tensor code only.
- ``core_postprocess(outputs, batched_inputs, images) -> list[dict]``: the model's own
  post-processing (the code its ``forward`` runs) turning those tensors into Detectron2's
  ``instances`` / ``sem_seg`` / ``panoptic_seg``.

:class:`InferenceCore` wraps the first for ``torch.onnx.export`` / ``torch.jit.trace``; an
exported graph is specialised to the padded input size it was traced at (sizes become constants
while tracing), so a runtime is fed images of that size. Nothing here imports a project.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from detectron2.structures import ImageList
from torch import Tensor, nn

__all__ = [
    "ExportError",
    "InferenceCore",
    "core_inputs",
    "export_onnx",
    "export_torchscript",
    "onnxruntime_session",
    "run_onnxruntime",
    "max_abs_diff",
    "compare_results",
    "TraceableAdaptiveAvgPool2d",
]


class ExportError(RuntimeError):
    """A model (or one of its operators) that cannot be exported; the message names both."""


def _check_protocol(model: nn.Module) -> None:
    for attr in ("inference_core", "core_postprocess", "core_output_names"):
        if not hasattr(model, attr):
            raise ExportError(
                f"{type(model).__name__} has no {attr!r}: only meta-architectures with an "
                "inference core (QuerySeg's K-Net, QueryInst, FastInst, EmbedMask) export"
            )


def _pool_matrix(n: int, o: int, like: Tensor) -> Tensor:
    """[o, n] averaging matrix of adaptive pooling: row i averages [floor(i n / o),
    ceil((i + 1) n / o))."""
    m = torch.zeros(o, n, dtype=like.dtype, device=like.device)
    for i in range(o):
        start, end = (i * n) // o, -((-(i + 1) * n) // o)
        m[i, start:end] = 1.0 / (end - start)
    return m


class TraceableAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` (same module, same state) that, while traced for export, pools
    with two constant averaging matrices: the same bins and values, and an ONNX graph for any
    input size (ONNX's own adaptive pooling needs the output to divide the input, which a
    pyramid pooling module's 3 x 3 and 6 x 6 bins do not on small inputs)."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_tracing():
            return super().forward(x)
        size = self.output_size
        oh, ow = (size, size) if isinstance(size, int) else size
        h, w = int(x.shape[-2]), int(x.shape[-1])
        oh, ow = oh or h, ow or w
        ph, pw = _pool_matrix(h, oh, x), _pool_matrix(w, ow, x)
        return torch.matmul(torch.matmul(ph, x), pw.t())


class InferenceCore(nn.Module):
    """``model.inference_core`` as a module of positional tensors: ``forward(images,
    image_sizes)`` returns the tuple of ``model.core_output_names``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        _check_protocol(model)
        self.model = model
        self.output_names = tuple(model.core_output_names)

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        outputs = self.model.inference_core(images, image_sizes)
        return tuple(outputs[k] for k in self.output_names)


def core_inputs(model: nn.Module, batched_inputs: list[dict[str, Any]]) -> tuple[ImageList, Tensor]:
    """The model's own preprocessing: (ImageList [B, 3, H_pad, W_pad], image sizes [B, 2]
    long (h, w))."""
    images = model.preprocess_image(batched_inputs)
    sizes = torch.tensor([list(s) for s in images.image_sizes], dtype=torch.long)
    return images, sizes.to(images.tensor.device)


_OP_PATTERNS = (
    r"Exporting the operator '([^']+)'",
    r"unrecognized namespace ([\w:]+)",
    r"Couldn't export Python operator (\w+)",
    r"export of operator (\w+)",
)


def _operator_of(error: BaseException) -> str:
    text = str(error)
    for pattern in _OP_PATTERNS:
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return "unknown"


def export_onnx(
    model: nn.Module, images: Tensor, image_sizes: Tensor, path: str, opset: int = 17
) -> list[str]:
    """Trace ``model.inference_core`` into an ONNX file (the TorchScript-based exporter: every
    op of the cores has a standard ONNX symbol; the deformable attention takes its PyTorch path
    while tracing). Returns the output names.

    Raises:
        ExportError: naming the model and the operator ONNX has no symbol for.
    """
    core = InferenceCore(model).eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's fused inference kernel has no ONNX symbol: trace its plain path
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(
                core,
                (images, image_sizes),
                path,
                input_names=["images", "image_sizes"],
                output_names=list(core.output_names),
                opset_version=opset,
                dynamo=False,
            )
    except Exception as e:  # the exporter raises several types; re-raise with the operator
        if "is not installed" in str(e):
            raise ImportError(f"ONNX export needs: pip install onnx ({e})") from e
        raise ExportError(
            f"cannot export {type(model).__name__} to ONNX (opset {opset}): operator "
            f"{_operator_of(e)!r} has no ONNX translation ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return list(core.output_names)


def export_torchscript(model: nn.Module, images: Tensor, image_sizes: Tensor, path: str) -> None:
    """``torch.jit.trace`` of ``model.inference_core``, saved to ``path``.

    Raises:
        ExportError: naming the model and the operator the tracer rejected.
    """
    core = InferenceCore(model).eval()
    try:
        with torch.no_grad():
            traced = torch.jit.trace(core, (images, image_sizes), check_trace=False)
        traced.save(path)
    except Exception as e:
        raise ExportError(
            f"cannot export {type(model).__name__} to TorchScript: operator "
            f"{_operator_of(e)!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def onnxruntime_session(
    path: str, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0
):
    """An ``onnxruntime.InferenceSession`` (``pip install -e .[export]``); ``threads`` > 0 sets
    the intra-op thread count."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(
            "onnxruntime is not installed: pip install onnxruntime (or .[export])"
        ) from e
    options = ort.SessionOptions()
    # no busy-waiting between runs: the Python post-processing shares the cores with the pool
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=list(providers))


def run_onnxruntime(
    session, images: Tensor, image_sizes: Tensor, output_names: Sequence[str]
) -> dict[str, Tensor]:
    """Run an exported core: the same named outputs as ``inference_core``, as CPU tensors.

    Raises:
        ValueError: when the images' size is not the one the graph was exported at.
    """
    feeds = {"images": images.detach().cpu().numpy(), "image_sizes": image_sizes.cpu().numpy()}
    wanted = {i.name: i.shape for i in session.get_inputs()}
    shape = wanted["images"]
    if all(isinstance(d, int) for d in shape) and list(shape) != list(images.shape):
        raise ValueError(
            f"the ONNX graph was exported for images {list(shape)}, got {list(images.shape)}: "
            "export again at this size (tools/export_model.py --sample-image)"
        )
    outputs = session.run(list(output_names), {k: v for k, v in feeds.items() if k in wanted})
    return {k: torch.from_numpy(v) for k, v in zip(output_names, outputs)}


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, float]:
    """Per output name, max |a - b| (float32; integer outputs compare exactly too)."""
    diffs = {}
    for k in a:
        x, y = a[k].detach().cpu(), b[k].detach().cpu()
        if x.shape != y.shape:
            raise ValueError(f"output {k!r}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
        diffs[k] = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
    return diffs


def _instances_agreement(a, b) -> dict[str, float]:
    n = min(len(a), len(b))
    out = {"count_a": float(len(a)), "count_b": float(len(b))}
    if n == 0:
        out.update(class_agreement=1.0 if len(a) == len(b) else 0.0, mask_iou=1.0, score_diff=0.0)
        return out
    out["class_agreement"] = float((a.pred_classes[:n] == b.pred_classes[:n]).float().mean())
    out["score_diff"] = float((a.scores[:n] - b.scores[:n]).abs().max())
    if a.has("pred_boxes") and b.has("pred_boxes"):
        box_diff = (a.pred_boxes.tensor[:n] - b.pred_boxes.tensor[:n]).abs().max()
        out["box_diff"] = float(box_diff)
    ma, mb = a.pred_masks[:n].flatten(1), b.pred_masks[:n].flatten(1)
    inter = (ma & mb).sum(1).float()
    union = (ma | mb).sum(1).float()
    out["mask_iou"] = float(torch.where(union > 0, inter / union.clamp(min=1), 1.0).min())
    return out


def compare_results(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, float]:
    """Agreement of two runs' final results (per image, the worst value over images):
    instances: counts, class agreement, min mask IoU, max score and box differences (paired in
    order);
    sem_seg: max probability difference and the fraction of equal argmax pixels;
    panoptic: the fraction of equal segment-id pixels and whether the segment lists agree."""
    report: dict[str, float] = {}

    def worst(key: str, value: float, lower_is_worse: bool = True) -> None:
        if key not in report:
            report[key] = value
        else:
            report[key] = min(report[key], value) if lower_is_worse else max(report[key], value)

    for ra, rb in zip(a, b):
        if "instances" in ra:
            for k, v in _instances_agreement(ra["instances"], rb["instances"]).items():
                worst(k, v, lower_is_worse=k not in ("score_diff", "box_diff"))
        if "sem_seg" in ra:
            sa, sb = ra["sem_seg"], rb["sem_seg"]
            worst("sem_seg_diff", float((sa - sb).abs().max()), lower_is_worse=False)
            worst("sem_seg_argmax_agreement", float((sa.argmax(0) == sb.argmax(0)).float().mean()))
        if "panoptic_seg" in ra:
            (pa, ia), (pb, ib) = ra["panoptic_seg"], rb["panoptic_seg"]
            worst("panoptic_pixel_agreement", float((pa == pb).float().mean()))
            worst("panoptic_segments_equal", float(ia == ib))
    return report
