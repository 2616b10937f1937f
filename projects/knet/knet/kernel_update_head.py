"""K-Net's kernel update head: group feature assembling -> adaptive kernel update -> kernel
interaction -> FFN -> classification and dynamic mask prediction.

Provenance: follows ``knet/kernel_updator.py`` and ``knet/{det,seg}/kernel_update_head.py``
(ZwwWayne/K-Net @5e50ee5), including the reshape by which kernels wider than the updator
(512-d in the FCN/PSP/ASPP semantic configs) are updated as independent 256-d chunks. Only the
released options are kept (no relative coordinates, mask/feature stride 1); for K = 1 the
per-image dynamic convolution is an einsum (same values).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class KernelUpdator(nn.Module):
    """Adaptive kernel update (paper Eq. 3-5): gates computed from the assembled group feature
    F and the previous kernel K decide how much of each goes into the new kernel.

    ``new = update_gate * LN(F_out) + input_gate * LN(K_out)``, then Linear-LN-ReLU, where
    ``F_in, F_out = split(dynamic_layer(F))``, ``K_in, K_out = split(input_layer(K))``,
    ``gate = F_in * K_in``, ``input_gate = sigmoid(LN(Linear(gate)))`` and
    ``update_gate = sigmoid(LN(Linear(gate)))``.

    ``adaptive=False`` is the paper's ablation without adaptive kernel update (its Table 2a):
    both gates are 1, i.e. ``new = LN(F_out) + LN(K_out)`` then the same Linear-LN-ReLU; the
    gate layers and the F_in / K_in halves are not built.
    """

    def __init__(
        self,
        *,
        in_channels: int = 256,
        feat_channels: int = 256,
        out_channels: int = 256,
        adaptive: bool = True,
    ):
        """
        Args:
            in_channels: width of one chunk of F and K (the official ``in_channels``).
            feat_channels: width of the gated features.
            out_channels: width of the updated kernel chunk.
            adaptive: gate F and K (paper Eq. 3-5); False: their plain sum.
        """
        super().__init__()
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.out_channels = out_channels
        self.adaptive = adaptive
        halves = 2 if adaptive else 1  # F_in / K_in only feed the gates
        self.dynamic_layer = nn.Linear(in_channels, halves * feat_channels)
        self.input_layer = nn.Linear(in_channels, halves * feat_channels)
        if adaptive:
            self.input_gate = nn.Linear(in_channels, feat_channels)
            self.update_gate = nn.Linear(in_channels, feat_channels)
            self.norm_in = nn.LayerNorm(feat_channels)
        self.norm_out = nn.LayerNorm(feat_channels)
        if adaptive:
            self.input_norm_in = nn.LayerNorm(feat_channels)
        self.input_norm_out = nn.LayerNorm(feat_channels)
        self.fc_layer = nn.Linear(feat_channels, out_channels)
        self.fc_norm = nn.LayerNorm(out_channels)

    def forward(self, group_feats: Tensor, kernels: Tensor) -> Tensor:
        """
        Args:
            group_feats: assembled features F, any shape with numel = M * in_channels
                ([B, N, C] with C a multiple of in_channels: M = B * N * C / in_channels).
            kernels: previous kernels, numel = M * K2 * in_channels ([B, N, K2, C]).

        Returns:
            [M, K2, out_channels]: the updated kernel chunks (row m = chunk m of F).
        """
        return F.relu(self.fc_norm(self.fc_layer(self.gated_sum(group_feats, kernels))))

    def gated_sum(self, group_feats: Tensor, kernels: Tensor) -> Tensor:
        """``update_gate * LN(F_out) + input_gate * LN(K_out)`` (paper Eq. 3-5), before the
        output Linear-LN-ReLU. Same arguments as :meth:`forward`; returns [M, K2, feat]."""
        feats = group_feats.reshape(-1, self.in_channels)
        num_rows = feats.shape[0]
        params = self.dynamic_layer(feats)
        if not self.adaptive:  # the ablation: both gates are 1
            inputs = self.input_layer(kernels.reshape(num_rows, -1, self.feat_channels))
            return self.norm_out(params).unsqueeze(-2) + self.input_norm_out(inputs)
        param_in = params[:, : self.feat_channels]
        param_out = params[:, -self.feat_channels :]
        inputs = self.input_layer(kernels.reshape(num_rows, -1, self.feat_channels))
        input_in = inputs[..., : self.feat_channels]
        input_out = inputs[..., -self.feat_channels :]
        gate_feats = input_in * param_in.unsqueeze(-2)
        input_gate = self.input_norm_in(self.input_gate(gate_feats)).sigmoid()
        update_gate = self.norm_in(self.update_gate(gate_feats)).sigmoid()
        param_out = self.norm_out(param_out)
        input_out = self.input_norm_out(input_out)
        return update_gate * param_out.unsqueeze(-2) + input_gate * input_out


class KernelUpdateHead(nn.Module):
    """One K-Net iteration: update N kernels with the features their masks select and predict
    new masks (and, for the detection codebase, classes)."""

    def __init__(
        self,
        *,
        num_classes: int = 80,
        in_channels: int = 256,
        conv_kernel_size: int = 1,
        num_heads: int = 8,
        feedforward_channels: int = 2048,
        num_cls_fcs: int = 1,
        num_mask_fcs: int = 1,
        dropout: float = 0.0,
        updator_channels: int = 256,
        hard_mask_thr: float | None = 0.5,
        with_cls: bool = True,
        reference_init: str = "mmdet",
        adaptive_kernel_update: bool = True,
        kernel_interaction: bool = True,
    ):
        """
        Args:
            num_classes: classifier outputs (sigmoid, no background column); 0 with
                ``with_cls=False``.
            in_channels: C, the kernel and feature width.
            conv_kernel_size: K, the spatial size of every kernel.
            num_heads, feedforward_channels, dropout: kernel interaction MHA and FFN.
            num_cls_fcs, num_mask_fcs: Linear(no bias)-LN-ReLU layers of the two branches.
            updator_channels: chunk width of :class:`KernelUpdator` (C * K^2 must be a multiple).
            hard_mask_thr: group feature assembling with binary masks ``sigmoid(m) > thr``
                (instance/panoptic); None: soft masks ``softmax(m, dim=kernels)`` (semantic).
            with_cls: build the classification branch (False in the semantic variant).
            reference_init: the initialisation of the reference the weights follow. "mmdet"
                (ZwwWayne/K-Net, instance/panoptic: its ``KernelIterHead.init_weights`` calls
                each head's ``init_weights``): Xavier-uniform on every matrix, the focal prior
                on ``fc_cls``. "mmseg" (mmsegmentation 1.2.2, semantic): that ``init_weights``
                never runs (the heads sit in a plain ``nn.ModuleList``), so every layer keeps
                PyTorch's default. In both, ``feat_transform`` is an mmcv ``ConvModule``
                initialised at construction (Kaiming-normal fan_out, zero bias), which the
                Xavier pass then overwrites in "mmdet" except the bias.
            adaptive_kernel_update: gated kernel update (:class:`KernelUpdator`); False: the
                paper's ablation with the plain sum of F and K.
            kernel_interaction: self-attention among the kernels; False: the paper's ablation
                without it (no attention, no attention norm; the FFN stays).
        """
        if reference_init not in ("mmdet", "mmseg"):
            raise ValueError(f"reference_init must be 'mmdet' or 'mmseg', got {reference_init!r}")
        super().__init__()
        if (in_channels * conv_kernel_size**2) % updator_channels:
            raise ValueError(
                f"kernel width {in_channels}x{conv_kernel_size}^2 is not a multiple of "
                f"updator_channels={updator_channels}"
            )
        self.in_channels = in_channels
        self.conv_kernel_size = conv_kernel_size
        self.hard_mask_thr = hard_mask_thr
        self.with_cls = with_cls
        self.num_classes = num_classes
        embed = in_channels * conv_kernel_size**2
        self.feat_transform = nn.Conv2d(in_channels, in_channels, 1)
        self.kernel_update_conv = KernelUpdator(
            in_channels=updator_channels,
            feat_channels=updator_channels,
            out_channels=updator_channels,
            adaptive=adaptive_kernel_update,
        )
        self.kernel_interaction = kernel_interaction
        if kernel_interaction:
            self.attention = nn.MultiheadAttention(embed, num_heads, dropout=dropout)
            self.attention_norm = nn.LayerNorm(embed)
        self.ffn = nn.Sequential(
            nn.Linear(in_channels, feedforward_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(feedforward_channels, in_channels),
            nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(in_channels)
        if with_cls:
            self.cls_fcs = _fc_ln_relu_stack(in_channels, num_cls_fcs)
            self.fc_cls = nn.Linear(in_channels, num_classes)
        self.mask_fcs = _fc_ln_relu_stack(in_channels, num_mask_fcs)
        self.fc_mask = nn.Linear(in_channels, in_channels)
        self._reset_parameters(reference_init)

    def _reset_parameters(self, reference_init: str) -> None:
        nn.init.kaiming_normal_(self.feat_transform.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.feat_transform.bias)
        if reference_init == "mmseg":
            return
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        if self.with_cls:
            nn.init.constant_(self.fc_cls.bias, -math.log((1 - 0.01) / 0.01))

    def assemble(self, feats: Tensor, mask_logits: Tensor) -> Tensor:
        """Group feature assembling (paper Eq. 2).

        Args:
            feats: transformed features X [B, C, H, W].
            mask_logits: previous mask logits [B, N, h, w] (resized bilinearly to H x W).

        Returns:
            [B, N, C]: sum of X over each (hard or soft) mask.
        """
        if tuple(mask_logits.shape[-2:]) != tuple(feats.shape[-2:]):
            mask_logits = F.interpolate(
                mask_logits, feats.shape[-2:], mode="bilinear", align_corners=False
            )
        if self.hard_mask_thr is None:
            weights = mask_logits.softmax(dim=1)
        else:
            weights = (mask_logits.sigmoid() > self.hard_mask_thr).to(feats.dtype)
        return torch.einsum("bnhw,bchw->bnc", weights, feats)

    def forward(
        self, feats: Tensor, kernels: Tensor, mask_logits: Tensor
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """
        Args:
            feats: the feature map every stage reads [B, C, H, W] (``x_feats``).
            kernels: previous kernels [B, N, C, K, K] (or [B, N, C]).
            mask_logits: previous mask logits [B, N, h, w].

        Returns:
            cls_logits [B, N, num_classes] (None without the classification branch),
            mask_logits [B, N, H, W] (at the resolution of ``feats``),
            kernels [B, N, C, K, K] (the object features fed to the next stage).
        """
        b, n = kernels.shape[:2]
        k = self.conv_kernel_size
        c = self.in_channels
        x = self.feat_transform(feats)
        group_feats = self.assemble(x, mask_logits)
        # [B, N, C, K, K] -> [B, N, K*K, C]
        kernels = kernels.reshape(b, n, c, -1).permute(0, 1, 3, 2)
        obj = self.kernel_update_conv(group_feats, kernels)
        # kernel interaction: self-attention over the N kernels of each image
        if self.kernel_interaction:
            obj = obj.reshape(b, n, -1).transpose(0, 1)  # [N, B, K*K*C]
            obj = self.attention_norm(obj + self.attention(obj, obj, obj, need_weights=False)[0])
            obj = obj.transpose(0, 1)
        obj = obj.reshape(b, n, -1, c)  # [B, N, K*K, C]
        obj = self.ffn_norm(obj + self.ffn(obj))

        cls_logits = None
        if self.with_cls:
            cls_logits = self.fc_cls(self.cls_fcs(obj.sum(-2)))
        mask_kernels = self.fc_mask(self.mask_fcs(obj))  # [B, N, K*K, C]
        if k == 1:
            new_masks = torch.einsum("bnc,bchw->bnhw", mask_kernels[:, :, 0], x)
        else:
            weight = mask_kernels.permute(0, 1, 3, 2).reshape(b, n, c, k, k)
            new_masks = torch.cat(
                [F.conv2d(x[i : i + 1], weight[i], padding=k // 2) for i in range(b)]
            )
        return cls_logits, new_masks, obj.permute(0, 1, 3, 2).reshape(b, n, c, k, k)


def _fc_ln_relu_stack(channels: int, num: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num):
        layers += [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels)]
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
