"""Transformer building blocks of the FastInst dual-path decoder, and its positional embeddings.

Provenance: the attention/FFN blocks follow Mask2Former's (and FastInst's) post-norm layers with
the same parameter names (``multihead_attn``/``self_attn``, ``norm``, ``linear1``/``linear2``) so
released checkpoints load; differences: batch-first tensors and the dropout taken from the config
(the official code hard-codes 0). The learnable positional embedding is initialised (truncated
normal, std 0.02); the official one is left uninitialised (FastInst issue #57).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "CrossAttentionLayer",
    "SelfAttentionLayer",
    "FFNLayer",
    "MLP",
]


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class CrossAttentionLayer(nn.Module):
    """Multi-head cross-attention + residual + LayerNorm (post-norm unless ``normalize_before``).

    Tensors are batch-first: ``tgt`` [B, L, D] attends to ``memory`` [B, S, D].
    """

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(
            d_model, nhead, dropout=dropout, batch_first=True
        )
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        memory_mask: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            tgt: [B, L, D] queries; memory: [B, S, D] keys/values.
            memory_mask: optional [B*nhead, L, S] bool, True = may not attend.
            pos: [B or 1, S, D] key positions; query_pos: [B or 1, L, D] query positions.
        Returns:
            [B, L, D].
        """
        x = self.norm(tgt) if self.normalize_before else tgt
        out = self.multihead_attn(
            query=_with_pos(x, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            need_weights=False,
        )[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class SelfAttentionLayer(nn.Module):
    """Multi-head self-attention (q = k = x + pos, v = x) + residual + LayerNorm."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt: Tensor, *, query_pos: Tensor | None = None) -> Tensor:
        """tgt: [B, L, D]; query_pos: [B or 1, L, D]. Returns [B, L, D]."""
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = _with_pos(x, query_pos)
        out = self.self_attn(q, k, value=x, need_weights=False)[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Linear -> ReLU -> Linear + residual + LayerNorm."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        normalize_before: bool = False,
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt: Tensor) -> Tensor:
        """tgt: [..., D]. Returns [..., D]."""
        x = self.norm(tgt) if self.normalize_before else tgt
        out = self.linear2(self.dropout(F.relu(self.linear1(x))))
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (DETR's MLP; keys ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., input_dim]. Returns [..., output_dim]."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
