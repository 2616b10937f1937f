"""QueryInst's dynamic mask head (one per stage, supervised in parallel).

Provenance: follows QueryInst's ``mask_heads/dynamic_mask_head.py`` (an FCNMaskHead whose input is
first modulated by a DynamicConv with parameters from the stage's post-attention query features).
Parameter names mirror the official keys (``instance_interactive_conv``, ``convs.{i}.conv``,
``convs.{i}.bn``, ``upsample``, ``conv_logits``). Differences: none in the computation; the norm of
the conv stack is configurable (BN as official, GN for small-batch CPU training).
"""

from __future__ import annotations

from torch import Tensor, nn

from .dynamic_conv import DynamicConv


class ConvNormReLU(nn.Sequential):
    """3x3 conv (no bias) + norm + ReLU, named like mmcv's ``ConvModule`` (``conv``, ``bn``/``gn``).

    Args:
        channels_in, channels_out: conv channels.
        norm: "BN" (official), "GN" (32 groups) or "" (conv with bias, no norm).
    """

    def __init__(self, channels_in: int, channels_out: int, norm: str = "BN"):
        super().__init__()
        self.add_module("conv", nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=not norm))
        if norm == "BN":
            self.add_module("bn", nn.BatchNorm2d(channels_out))
        elif norm == "GN":
            self.add_module("gn", nn.GroupNorm(min(32, channels_out), channels_out))
        elif norm:
            raise ValueError(f"mask head norm must be 'BN', 'GN' or '', got {norm!r}")
        self.add_module("activate", nn.ReLU(inplace=True))


class DynamicMaskHead(nn.Module):
    """Per-RoI class-specific mask logits from 14x14 RoI features and query features.

    DynamicConv (no projection) -> ``num_convs`` x [3x3 conv, norm, ReLU] -> 2x2 stride-2 deconv +
    ReLU -> 1x1 ``conv_logits`` to K channels: [P, C, r, r] -> [P, K, 2r, 2r].

    Args:
        num_classes: K (one mask per class; ``class_agnostic=False`` as the official code).
        in_channels: RoI / query channels C (256).
        conv_dim: channels of the conv stack and deconv (256).
        dynamic_channels: bottleneck F of the dynamic conv (64).
        num_convs: convs in the stack (4).
        norm: norm of the conv stack ("BN" official).
        dynamic: modulate the RoI features with the query (the paper's dynamic mask head);
            False: the vanilla FCN mask head of its ablation (no dynamic conv, queries unused).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 256,
        conv_dim: int = 256,
        dynamic_channels: int = 64,
        num_convs: int = 4,
        norm: str = "BN",
        dynamic: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.dynamic = dynamic
        if dynamic:
            self.instance_interactive_conv = DynamicConv(
                in_channels, dynamic_channels, in_channels, with_proj=False
            )
        self.convs = nn.ModuleList(
            ConvNormReLU(in_channels if i == 0 else conv_dim, conv_dim, norm)
            for i in range(num_convs)
        )
        last = conv_dim if num_convs else in_channels
        self.upsample = nn.ConvTranspose2d(last, conv_dim, 2, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.conv_logits = nn.Conv2d(conv_dim, num_classes, 1)
        # The reference's effective init (mmdet 3.3.0, checked by tests/parity): the conv stack
        # as mmcv's ConvModule initialises itself (Kaiming normal, fan_out, ReLU; zero bias),
        # everything else PyTorch's default. ``DynamicMaskHead.init_weights`` (Xavier on every
        # matrix, zero ``conv_logits`` bias) is never called there: the mask heads sit in a plain
        # ``nn.ModuleList``, which mmengine's recursive ``init_weights`` does not enter.
        for block in self.convs:
            nn.init.kaiming_normal_(block.conv.weight, mode="fan_out", nonlinearity="relu")
            if block.conv.bias is not None:
                nn.init.zeros_(block.conv.bias)

    def forward(self, roi_features: Tensor, attn_features: Tensor) -> Tensor:
        """
        Args:
            roi_features: [P, C, r, r] RoI features (r = 14).
            attn_features: [P, C] the matching queries' post-attention features.

        Returns:
            [P, K, 2r, 2r] mask logits (one channel per class).
        """
        p, c, h, w = roi_features.shape
        x = roi_features
        if self.dynamic:
            x = self.instance_interactive_conv(attn_features, roi_features)  # [P, h*w, C]
            x = x.transpose(1, 2).reshape(p, c, h, w)
        for conv in self.convs:
            x = conv(x)
        x = self.relu(self.upsample(x))
        return self.conv_logits(x)
