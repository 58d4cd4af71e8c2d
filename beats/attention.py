"""Multi-head self-attention with the GRU-gated relative position bias (spec section 6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .modules import QuantNoiseLinear


def relative_position_buckets(
    length: int, num_buckets: int, max_distance: int, device: torch.device | None = None
) -> torch.Tensor:
    """Bucket index (S, S) int64 of the offset j - i for every query i and key j.

    Half the buckets hold positive offsets. Within a half, offsets below ``nb // 2`` get a
    bucket each; larger ones are spaced logarithmically up to ``max_distance`` and clamp to
    the last bucket. Computed in float32 in the original's order so that edges match.
    """
    positions = torch.arange(length, dtype=torch.long, device=device)
    offset = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    exact = half // 2
    base = (offset > 0).to(torch.long) * half
    distance = offset.abs()
    scaled = (
        torch.log(distance.float() / exact)
        / math.log(max_distance / exact)
        * (half - exact)
    ).to(torch.long)
    large = torch.clamp(exact + scaled, max=half - 1)
    return base + torch.where(distance < exact, distance, large)


class MultiheadAttention(nn.Module):
    """Self-attention over (B, S, C) with an optional relative position bias and GRU gate.

    Scores for head h, query i, key j: ``q_i . k_j / sqrt(d) + G[h, i] * P[h, i, j]``,
    with -inf at padded keys. ``P`` comes from the table ``relative_attention_bias``, which
    only layer 0 stores and every layer shares (`position_bias` builds it). ``G`` is the
    per-query GRU gate (``grep_linear``, ``grep_a``) or 1.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        has_relative_attention_bias: bool = False,
        num_buckets: int = 320,
        max_distance: int = 800,
        gru_rel_pos: bool = False,
        quant_noise: float = 0.0,
        quant_noise_block_size: int = 8,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.gru_rel_pos = gru_rel_pos

        def proj() -> QuantNoiseLinear:
            return QuantNoiseLinear(embed_dim, embed_dim, p=quant_noise,
                                    block_size=quant_noise_block_size)

        self.k_proj, self.v_proj, self.q_proj, self.out_proj = proj(), proj(), proj(), proj()
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)
        if gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        self._buckets: dict[tuple[int, str, int | None], torch.Tensor] = {}

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """The ungated bias P (H, S, S) for a sequence of ``length`` positions."""
        key = (length, device.type, device.index)
        buckets = self._buckets.get(key)
        if buckets is None:
            buckets = relative_position_buckets(length, self.num_buckets, self.max_distance,
                                                device)
            if len(self._buckets) >= 16:  # a handful of lengths at a time is the usual case
                self._buckets.clear()
            self._buckets[key] = buckets
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, S, C); key_padding_mask (B, S) True at padding; position_bias (H, S, S)."""
        batch, length, _ = x.shape
        heads, d = self.num_heads, self.head_dim

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, heads, d).transpose(1, 2)  # (B, H, S, d)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))

        bias: torch.Tensor | None = None
        if position_bias is not None:
            bias = position_bias.to(q.dtype).unsqueeze(0)  # (1, H, S, S)
            if self.gru_rel_pos:
                z = self.grep_linear(q).view(batch, heads, length, 2, 4).sum(-1)
                gate_a, gate_b = torch.sigmoid(z).chunk(2, dim=-1)  # (B, H, S, 1) each
                gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
                bias = gate * bias  # (B, H, S, S)
        if key_padding_mask is not None:
            neg = torch.zeros(batch, 1, 1, length, dtype=q.dtype, device=q.device)
            neg = neg.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            bias = neg if bias is None else bias + neg

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(batch, length, self.embed_dim)
        return self.out_proj(out)
