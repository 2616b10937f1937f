"""Dynamic instance interaction (the "DynamicConv" of Sparse R-CNN / QueryInst).

Provenance: follows mmdet's ``DynamicConv`` (QueryInst ``utils/transformer.py``) and Sparse R-CNN's
``DynamicConv``; parameter names and the split order of the ``dynamic_layer`` output match the
official checkpoints (first ``C*F`` values = ``param_in`` viewed [C, F], then ``param_out`` viewed
[F, C]). Differences: none in the computation; activation fixed to ReLU.
"""

from __future__ import annotations

from torch import Tensor, nn


class DynamicConv(nn.Module):
    """Two query-conditioned 1x1 convolutions applied to a query's RoI feature.

    For each query q with RoI feature ``X_q`` [S, C] (S = r*r positions):
    ``param_in, param_out = split(dynamic_layer(q))``;
    ``Y = ReLU(LN_out(ReLU(LN_in(X_q @ param_in)) @ param_out))`` [S, C_out]; with ``with_proj``
    ``Y`` is flattened (position-major, channel-minor: index ``s * C_out + c``) and projected to
    ``C_out`` by ``fc_layer`` + ``fc_norm`` + ReLU.

    Args:
        in_channels: query / RoI feature channels C (256 in the paper).
        feat_channels: the bottleneck width F of the dynamic parameters (64 in the paper).
        out_channels: output channels C_out (defaults to ``in_channels``).
        input_feat_shape: RoI side r (7 for the box head, 14 for the mask head); only used
            for the size of ``fc_layer``.
        with_proj: flatten and project to one vector per query (box head) or keep the spatial
            map (mask head).
    """

    def __init__(
        self,
        in_channels: int = 256,
        feat_channels: int = 64,
        out_channels: int | None = None,
        input_feat_shape: int = 7,
        with_proj: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.out_channels = out_channels or in_channels
        self.input_feat_shape = input_feat_shape
        self.with_proj = with_proj
        self.num_params_in = self.in_channels * self.feat_channels
        self.num_params_out = self.out_channels * self.feat_channels
        self.dynamic_layer = nn.Linear(self.in_channels, self.num_params_in + self.num_params_out)
        self.norm_in = nn.LayerNorm(self.feat_channels)
        self.norm_out = nn.LayerNorm(self.out_channels)
        self.activation = nn.ReLU(inplace=True)
        if with_proj:
            num_output = self.out_channels * input_feat_shape**2
            self.fc_layer = nn.Linear(num_output, self.out_channels)
            self.fc_norm = nn.LayerNorm(self.out_channels)

    def generate_parameters(self, param_feature: Tensor) -> tuple[Tensor, Tensor]:
        """Split the dynamic layer's output into the two per-query kernels.

        Args:
            param_feature: [P, C] query features.

        Returns:
            param_in [P, C, F] and param_out [P, F, C_out].
        """
        params = self.dynamic_layer(param_feature)
        param_in = params[:, : self.num_params_in].view(-1, self.in_channels, self.feat_channels)
        param_out = params[:, self.num_params_in :].view(-1, self.feat_channels, self.out_channels)
        return param_in, param_out

    def forward(self, param_feature: Tensor, input_feature: Tensor) -> Tensor:
        """
        Args:
            param_feature: [P, C] query features (one per RoI).
            input_feature: [P, C, r, r] RoI features.

        Returns:
            [P, C_out] with ``with_proj``, else [P, r*r, C_out] (position-major).
        """
        if param_feature.shape[0] != input_feature.shape[0]:
            raise ValueError(
                f"{param_feature.shape[0]} query features for {input_feature.shape[0]} RoIs"
            )
        features = input_feature.flatten(2).transpose(1, 2)  # [P, r*r, C]
        param_in, param_out = self.generate_parameters(param_feature)
        features = self.activation(self.norm_in(features.bmm(param_in)))
        features = self.activation(self.norm_out(features.bmm(param_out)))
        if self.with_proj:
            features = self.activation(self.fc_norm(self.fc_layer(features.flatten(1))))
        return features
