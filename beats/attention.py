"""Multi-head self-attention with the GRU-gated relative position bias (spec section 6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .modules import QuantNoiseLinear, is_tracing


def relative_position_buckets(
    length: int, num_buckets: int, max_distance: int, device: torch.device | None = None
) -> torch.Tensor:
    """Bucket index (S, S) int64 of the offset j - i for every query i and key j.

    Half the buckets hold positive offsets. Within a half, offsets below ``nb // 2`` get a
    bucket each; larger ones are spaced logarithmically up to ``max_distance`` and clamp to
    the last bucket. Computed in float32 in the original's order so that edges match.
    """
    positions = torch.arange(length, dtype=torch.long, device=device)
    return offset_buckets(positions[None, :] - positions[:, None], num_buckets, max_distance)


def offset_buckets(offset: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket index (int64, same shape) of each relative offset j - i in ``offset``."""
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


class Workspace:
    """Scratch tensors that every layer reuses within one forward pass outside autograd.

    A fresh (B, H, S, S) allocation per layer costs more than writing it (page faults on
    CPU), so the encoder hands one workspace to all its layers. It is only made when no
    gradient is recorded and no graph is being captured, and it lives for one forward.
    """

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor ``name`` of ``shape`` with ``like``'s dtype and device."""
        tensor = self._tensors.get(name)
        if (tensor is None or tensor.shape != shape or tensor.dtype != like.dtype
                or tensor.device != like.device):
            tensor = self._tensors[name] = like.new_empty(shape)
        return tensor


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
        if is_tracing():  # a traced graph computes them itself (length may be symbolic)
            buckets = relative_position_buckets(length, self.num_buckets, self.max_distance,
                                                device)
        else:
            buckets = self._cached_buckets(length, device)
        # Contiguous once here rather than read strided by every layer's gate product.
        return self.relative_attention_bias(buckets).permute(2, 0, 1).contiguous()

    def position_bias_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The ungated bias P (B, H, S', S') of sequences whose entries sit at ``positions``.

        ``positions`` (B, S') int64 holds each entry's index in the full sequence (for
        pre-training on kept patches only), so query i and key j get the bucket of the
        true offset ``positions[j] - positions[i]``.
        """
        offset = positions.unsqueeze(1) - positions.unsqueeze(2)  # [b, i, j] = p_j - p_i
        buckets = offset_buckets(offset, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(0, 3, 1, 2).contiguous()

    def _cached_buckets(self, length: int, device: torch.device) -> torch.Tensor:
        key = (length, device.type, device.index)
        buckets = self._buckets.get(key)
        if buckets is None:
            # Built outside inference mode: a tensor made under inference_mode (after
            # `embed`, say) cannot be saved for backward by a later training forward.
            with torch.inference_mode(False):
                buckets = relative_position_buckets(length, self.num_buckets,
                                                    self.max_distance, device)
            if len(self._buckets) >= 16:  # a handful of lengths at a time is the usual case
                self._buckets.clear()
            self._buckets[key] = buckets
        return buckets

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v (B, H, S, d) and the gate logits (B, H, S, 2) or None, in one product.

        The three projections are stacked into one weight. With the GRU gate, 2 H more
        rows give its logits directly: the gate sums ``grep_linear``'s 8 outputs in two
        groups of 4, so for head h and group a the logit is ``u_a . q_h + c_a`` with
        ``u_a`` the summed rows of its weight and ``c_a`` its summed bias, and
        ``q_h = Wq_h x + bq_h`` makes that one more linear function of x. Same values as
        the original's order of operations, to float rounding.

        The stacked weight is built on every call (a copy of 3 C^2 numbers, cheap next to
        the product), so it follows training, ``load_state_dict`` and quantisation noise
        without any cache; the state-dict keys are unchanged.
        """
        batch, length, _ = x.shape
        heads, d, dim = self.num_heads, self.head_dim, self.embed_dim
        weights = [p.noisy_weight() for p in (self.q_proj, self.k_proj, self.v_proj)]
        biases = [self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]
        if self.gru_rel_pos:
            u = self.grep_linear.weight.view(2, 4, d).sum(1)  # (2, d)
            c = self.grep_linear.bias.view(2, 4).sum(1)  # (2,)
            wq, bq = weights[0].view(heads, d, dim), biases[0].view(heads, d)
            weights.append(torch.einsum("ad,hdc->hac", u, wq).reshape(2 * heads, dim))
            biases.append((torch.einsum("ad,hd->ha", u, bq) + c).reshape(2 * heads))
        out = F.linear(x, torch.cat(weights), torch.cat(biases))
        qkv = out[..., : 3 * dim].view(batch, length, 3, heads, d)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        gate_logits = None
        if self.gru_rel_pos:
            gate_logits = out[..., 3 * dim:].view(batch, length, heads, 2).transpose(1, 2)
        return q, k, v, gate_logits

    def attention_mask(
        self,
        gate_logits: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        position_bias: torch.Tensor | None,
        *,
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The additive score mask ``G * P`` (-inf at padded keys) for SDPA, or None.

        Args:
            gate_logits: (B, H, S, 2) the GRU gate's two logits per head and query, or
                None without the gate (G = 1).
            key_padding_mask: (B, S) True at padding, or None when nothing is padded.
            position_bias: (H, S, S) ungated bias P, (B, H, S, S) one per clip, or None.
            dtype: the mask's dtype (the queries').
            out: optional (B, H, S, S) buffer to write the mask into when it has to be
                materialised (outside autograd only); saves a large allocation per layer.

        Returns:
            None, or a mask broadcastable to (B, H, S, S): (B, 1, 1, S) padding only,
            (1, H, S, S) an ungated shared bias, else (B, H, S, S).
        """
        neg = None
        if key_padding_mask is not None:
            batch, length = key_padding_mask.shape
            neg = torch.zeros(batch, 1, 1, length, dtype=dtype, device=key_padding_mask.device)
            neg = neg.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if position_bias is None:
            return neg
        bias = position_bias.to(dtype)
        if bias.dim() == 3:
            bias = bias.unsqueeze(0)  # (1, H, S, S)
        if gate_logits is None:
            if neg is None:
                return bias
            return torch.add(bias, neg, out=out) if out is not None else bias + neg
        gate_a, gate_b = torch.sigmoid(gate_logits).chunk(2, dim=-1)  # (B, H, S, 1) each
        gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
        if out is None:
            return gate * bias if neg is None else torch.addcmul(neg, gate, bias)
        torch.mul(gate, bias, out=out)
        return out if neg is None else out.add_(neg)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        workspace: Workspace | None = None,
    ) -> torch.Tensor:
        """x (B, S, C); key_padding_mask (B, S) True at padding; position_bias (H, S, S)
        or (B, H, S, S).

        ``workspace`` (outside autograd only; see `Workspace`): scratch memory shared by
        the layers. Attention runs through ``scaled_dot_product_attention`` with the mask as
        an additive float mask, except for bfloat16 on CPU with a workspace, which runs
        `attend_by_clip` (faster there; see its docstring).
        """
        batch, length, _ = x.shape
        q, k, v, gate_logits = self._projections(x)
        dropout = self.dropout if self.training else 0.0
        if (workspace is not None and q.dtype == torch.bfloat16 and q.device.type == "cpu"
                and dropout == 0.0
                and (key_padding_mask is None or not key_padding_mask.all(dim=1).any())):
            out = self.attend_by_clip(q, k, v, gate_logits, key_padding_mask, position_bias,
                                      workspace)
            return self.out_proj(out)
        mask_buffer = None
        if workspace is not None and position_bias is not None:
            # In x's dtype: under autocast that is float32 while q is bfloat16.
            mask_buffer = workspace.get("mask", (batch, self.num_heads, length, length), x)
        mask = self.attention_mask(gate_logits, key_padding_mask, position_bias,
                                   dtype=q.dtype, out=mask_buffer)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.transpose(1, 2)  # (B, S, H, d): often contiguous already (CPU kernel)
        if is_tracing():
            # The ONNX exporter replaces SDPA by its math, whose output has another layout
            # than the kernel traced; an explicit copy keeps the reshape below valid.
            out = out.clone(memory_format=torch.contiguous_format)
        out = out.reshape(batch, length, self.embed_dim)
        return self.out_proj(out)

    def attend_by_clip(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gate_logits: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        position_bias: torch.Tensor | None,
        workspace: Workspace,
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v, one clip at a time, outside autograd: (B, S, C).

        q, k, v (B, H, S, d); the other arguments as in `attention_mask`. Per clip, the
        mask is written into an (H, S, S) score buffer and the scores are added to it by one
        batched product over the heads (float32 accumulation, one rounding to the inputs'
        dtype), the softmax is computed in float32 and rounded once, and one more batched
        product gives the output. Without dropout, and never for a clip whose keys are all
        padding (its softmax would be 0 / 0; SDPA returns zeros there).

        Why: on CPU, SDPA's bfloat16 kernel runs many small block products through the BLAS
        library's bfloat16 GEMM, which on the AMD EPYC (Zen 4) we measured is no faster than
        its float32 kernel; these batched products run at the bfloat16 matrix rate. The
        price is one bfloat16 rounding of the scores, which SDPA keeps in float32: the
        features' cosine to float32 was unchanged to 1e-5 on the reference checkpoints.
        """
        batch, heads, length, d = q.shape
        scores = workspace.get("scores", (1, heads, length, length), q)
        probs = workspace.get("probs", (heads, length, length), q)
        out = q.new_empty(batch, length, heads, d)
        scale = 1.0 / math.sqrt(d)
        for b in range(batch):
            clip = slice(b, b + 1)
            bias = position_bias
            if bias is not None and bias.dim() == 4:
                bias = bias[clip]
            mask = self.attention_mask(
                None if gate_logits is None else gate_logits[clip],
                None if key_padding_mask is None else key_padding_mask[clip],
                bias, dtype=q.dtype, out=scores,
            )
            if mask is not None and mask is not scores:
                scores.copy_(mask)  # an ungated bias or padding only: not written yet
            scores[0].baddbmm_(q[b], k[b].transpose(1, 2), beta=0.0 if mask is None else 1.0,
                               alpha=scale)
            torch.softmax(scores[0], dim=-1, out=probs)
            torch.bmm(probs, v[b], out=out[b].transpose(0, 1))
        return out.view(batch, length, self.embed_dim)
