"""The inference fast path (``MODEL.FAST_INFERENCE``): the same model, prepared for inference.

:func:`prepare_fast_inference` (after the weights are loaded):

- folds every frozen / eval-mode BatchNorm that follows a convolution into that convolution
  (Detectron2's ``Conv2d(norm=...)`` and ``Sequential(conv, bn)`` pairs): one op less per layer;
- converts the model to the channels-last memory format (oneDNN's native layout on CPU) and,
  on the CPU, runs every convolution through oneDNN (``torch.mkldnn_convolution``): PyTorch's
  dispatcher sends 1 x 1 convolutions at batch 1 and one thread to its generic
  ``_slow_conv2d_forward`` (im2col + GEMM), about 2x slower than oneDNN in channels-last
  here; while traced for export the plain ``F.conv2d`` is recorded;
- leaves attention as it is: every ``nn.MultiheadAttention`` of the four methods is called
  with ``need_weights=False`` and so already runs PyTorch's fused
  ``scaled_dot_product_attention`` kernel in inference.

:func:`fast_inference` runs a forward under ``torch.inference_mode``. The methods' own
post-processing reads ``MODEL.FAST_INFERENCE`` for their selected-queries-only paths (e.g.
FastInst upsamples only the kept queries' masks). Logits equal eager within float32 rounding
(the folded weights round differently).
"""

from __future__ import annotations

from typing import Any

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

__all__ = ["fold_batchnorm", "prepare_fast_inference", "fast_inference"]

_FOLDABLE = (FrozenBatchNorm2d, nn.BatchNorm2d, nn.SyncBatchNorm)


def _scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return scale, bn.bias - bn.running_mean * scale


def _fold_into(conv: nn.Conv2d, bn: nn.Module) -> None:
    """conv(x) then bn  ->  one conv with W * s and (b - mean) * s + beta."""
    if conv.transposed if hasattr(conv, "transposed") else False:
        raise ValueError("cannot fold BatchNorm into a transposed convolution")
    scale, shift = _scale_shift(bn)
    with torch.no_grad():
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        new_bias = (bias * scale + shift).to(conv.weight)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def _foldable(bn: nn.Module) -> bool:
    if not isinstance(bn, _FOLDABLE):
        return False
    if isinstance(bn, nn.BatchNorm2d | nn.SyncBatchNorm):
        return not bn.training and bn.track_running_stats and bn.affine
    return True


def fold_batchnorm(model: nn.Module) -> int:
    """Fold BatchNorm layers into the convolutions before them, in place.

    Handles Detectron2's ``Conv2d`` with ``norm`` (the norm becomes ``None``) and a plain
    ``nn.Conv2d`` directly followed by a BatchNorm inside an ``nn.Sequential`` (the BatchNorm
    becomes ``nn.Identity``). GroupNorm/LayerNorm do not fold and stay. Returns the count.
    """
    count = 0
    for module in model.modules():
        norm = getattr(module, "norm", None)
        if isinstance(module, nn.Conv2d) and norm is not None and _foldable(norm):
            _fold_into(module, norm)
            module.norm = None
            count += 1
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = module._modules[a], module._modules[b]
                if (
                    type(conv) is nn.Conv2d
                    and _foldable(bn)
                    and conv.out_channels == bn.num_features
                ):
                    _fold_into(conv, bn)
                    module._modules[b] = nn.Identity()
                    count += 1
    return count


def _onednn_forward(conv: nn.Conv2d):
    """A forward for ``conv`` (plain or Detectron2's, with its norm and activation) that calls
    oneDNN directly on CPU float32 inputs outside tracing, else the module's own forward."""
    plain = conv.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or x.dim() != 4
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or torch.is_grad_enabled()
        ):
            return plain(x)
        y = torch.mkldnn_convolution(
            x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups
        )
        norm, act = getattr(conv, "norm", None), getattr(conv, "activation", None)
        if norm is not None:
            y = norm(y)
        if act is not None:
            y = act(y)
        return y

    return forward


def use_onednn_convolutions(model: nn.Module) -> int:
    """Route every zero-padded ``nn.Conv2d`` of ``model`` through :func:`_onednn_forward` (in
    place; inference without autograd only). Returns the count."""
    count = 0
    for m in model.modules():
        if type(m).forward in (nn.Conv2d.forward, Conv2d.forward) and m.padding_mode == "zeros":
            if isinstance(m.padding, str):
                continue
            m.forward = _onednn_forward(m)
            count += 1
    return count


def prepare_fast_inference(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """Eval mode, BatchNorm folded, channels-last weights, oneDNN convolutions; in place,
    returns ``model``. Call it after loading the weights (a folded model no longer matches a
    checkpoint)."""
    model.eval()
    model.queryseg_folded_batchnorms = fold_batchnorm(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if torch.backends.mkldnn.is_available():
            model.queryseg_onednn_convolutions = use_onednn_convolutions(model)
    model.queryseg_fast_inference = True
    return model


def fast_inference(model: nn.Module, batched_inputs: list[dict[str, Any]]) -> list[dict]:
    """``model(batched_inputs)`` under ``torch.inference_mode`` (the channels-last weights of
    :func:`prepare_fast_inference` make the convolutions produce channels-last maps)."""
    with torch.inference_mode():
        return model(batched_inputs)
