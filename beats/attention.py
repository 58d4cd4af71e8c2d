"""Multi-head self-attention with the GRU-gated relative position bias.

For head h, query i and key j, with d the head width:

    s[h, i, j] = q_i . k_j / sqrt(d) + G[h, i] * P[h, i, j]      (-inf at padded keys)
    out_i      = sum_j softmax_j(s[h, i, :]) v_j                 (heads concatenated)

``P`` is the relative position bias: a learned value per head for the bucket of the
offset j - i (`relative_position_buckets`), from one table that every layer shares.
``G`` is the GRU gate, computed per head and query from the query itself (`gru_gate`).
`eager_attention` is this computation as written. The faster implementations in
`beats.fast_attention` compute the same numbers; `choose_implementation` picks one, in
one place, from ``MultiheadAttention.implementation`` (``"auto"`` by default). See
docs/design/architecture.md: Attention, Relative position bias, Gated relative positions.

Attention implementations (``attn_implementation``):

- ``"eager"``: `eager_attention`, the formula above in plain tensor operations. The
  reference the others are tested against; never chosen automatically.
- ``"sdpa"``: `beats.fast_attention.sdpa_attention`, torch's fused kernel. Works
  everywhere: autograd, dropout, GPU, ``torch.compile``, ``torch.export``, ONNX.
- ``"by_clip"``: `beats.fast_attention.by_clip_attention`, clip by clip with batched
  products into reused buffers. Outside autograd only (``embed``, ``torch.no_grad``),
  without attention dropout, not in a traced graph.
- ``"auto"``: ``"by_clip"`` for bfloat16 on a CPU without AMX outside autograd (where
  it is faster), ``"sdpa"`` everywhere else (`choose_implementation`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .fast_attention import Workspace, by_clip_attention, sdpa_attention
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


def gru_gate(gate_logits: torch.Tensor, grep_a: torch.Tensor) -> torch.Tensor:
    """The GRU gate G (B, H, S, 1) from its two logits (B, H, S, 2) per head and query.

    ``G = g_a * (g_b * A - 1) + 2`` with ``g = sigmoid(logits)`` and ``A`` = ``grep_a``
    (1, H, 1, 1). The logits are ``grep_linear`` of the unscaled query, its 8 outputs
    summed in two groups of 4 (`MultiheadAttention.projections` computes them).
    """
    gate_a, gate_b = torch.sigmoid(gate_logits).chunk(2, dim=-1)
    return gate_a * (gate_b * grep_a - 1.0) + 2.0


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    gate: torch.Tensor | None,
    position_bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float = 0.0,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """The attention of the architecture, computed as written: (B, S, H * d).

    Args:
        q, k, v: (B, H, S, d) queries, keys and values per head (projections with bias).
        gate: (B, H, S, 1) the GRU gate G, or None (G = 1).
        position_bias: (H, S, S) the ungated bias P shared by all clips, (B, H, S, S) one
            per clip, or None (no relative positions).
        key_padding_mask: (B, S) True at padded positions (keys never attended to), or
            None when nothing is padded.
        dropout_p: attention dropout on the softmax weights (training).
        workspace: unused (the fast implementations take the same arguments).

    The softmax is computed in float32 at least (as the original does) and its weights
    rounded to v's dtype. A clip with no valid key gives NaN (0 / 0), as in the original.
    """
    batch, heads, length, d = q.shape
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, H, S, S)
    if position_bias is not None:
        scores = scores + (position_bias if gate is None else gate * position_bias)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    wide = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.softmax(scores, dim=-1, dtype=wide).to(v.dtype)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0.0)
    out = weights @ v  # (B, H, S, d)
    return out.transpose(1, 2).reshape(batch, length, heads * d)


AttentionFunction = Callable[..., torch.Tensor]

ATTENTION_IMPLEMENTATIONS: dict[str, AttentionFunction] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "by_clip": by_clip_attention,
}
"""Every attention implementation by name; ``"auto"`` chooses among them."""


def check_implementation(name: str) -> str:
    """``name`` if it names an implementation or is ``"auto"``; else an `InputError`."""
    if name != "auto" and name not in ATTENTION_IMPLEMENTATIONS:
        choices = ", ".join(repr(n) for n in ["auto", *ATTENTION_IMPLEMENTATIONS])
        raise InputError(f"unknown attention implementation {name!r}; choose one of {choices}")
    return name


def outside_autograd() -> bool:
    """True when no gradient is recorded and no graph is being captured (eager inference)."""
    return not torch.is_grad_enabled() and not is_tracing()


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX matrix units (torch's own CPU feature check)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


def choose_implementation(
    requested: str, device: torch.device, dtype: torch.dtype, dropout_p: float
) -> str:
    """The implementation a forward pass runs: ``requested`` or, for ``"auto"``, the choice.

    Args:
        requested: ``"auto"`` or a key of `ATTENTION_IMPLEMENTATIONS`.
        device, dtype: where and in what the attention computes (the queries').
        dropout_p: the attention dropout of this pass (0 in eval mode).

    ``"auto"`` runs ``"by_clip"`` for bfloat16 on a CPU without AMX, outside autograd
    and without dropout, and ``"sdpa"`` otherwise. Measured on the base model (one
    thread, 10 s clips): on an AMD EPYC (Zen 4, no AMX) ``"by_clip"`` is the faster;
    on an Intel Xeon with AMX, SDPA's bfloat16 kernel is 2-6 % faster than it.

    A requested ``"by_clip"`` that cannot run here (autograd, dropout, a traced graph)
    is an `InputError`.
    """
    by_clip_runs = outside_autograd() and dropout_p == 0.0
    if requested == "auto":
        fast = (device.type == "cpu" and dtype == torch.bfloat16 and by_clip_runs
                and not cpu_has_amx())
        return "by_clip" if fast else "sdpa"
    if requested == "by_clip" and not by_clip_runs:
        raise InputError(
            "attn_implementation='by_clip' runs only outside autograd (torch.inference_mode "
            "or torch.no_grad, as in BEATs.embed), without attention dropout and not in a "
            "traced graph; use 'auto' or 'sdpa' here"
        )
    return check_implementation(requested)


class MultiheadAttention(nn.Module):
    """Self-attention over (B, S, C) with an optional relative position bias and GRU gate.

    Scores for head h, query i, key j: ``q_i . k_j / sqrt(d) + G[h, i] * P[h, i, j]``,
    with -inf at padded keys. ``P`` comes from the table ``relative_attention_bias``, which
    only layer 0 stores and every layer shares (`position_bias` builds it). ``G`` is the
    per-query GRU gate (``grep_linear``, ``grep_a``; see `gru_gate`) or 1.

    ``implementation`` (``"auto"``, ``"eager"``, ``"sdpa"`` or ``"by_clip"``; see the
    module docstring) selects how the scores are computed; ``last_implementation`` is the
    one the latest forward pass ran (None before the first).
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
        self.implementation = "auto"
        self.last_implementation: str | None = None
        self.last_ran_on: tuple[torch.device, torch.dtype] | None = None

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

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        workspace: Workspace | None = None,
    ) -> torch.Tensor:
        """x (B, S, C) -> (B, S, C).

        Args:
            x: the layer input.
            key_padding_mask: (B, S) True at padding, or None.
            position_bias: the ungated bias P, (H, S, S) or (B, H, S, S), or None.
            workspace: scratch memory the layers of one forward pass share (outside
                autograd only; see `Workspace`).
        """
        q, k, v, gate_logits = self.projections(x)
        gate = None
        if gate_logits is not None and position_bias is not None:  # G only scales P
            gate = gru_gate(gate_logits, self.grep_a)
        dropout = self.dropout if self.training else 0.0
        name = choose_implementation(self.implementation, q.device, q.dtype, dropout)
        if not is_tracing():
            self.last_implementation = name
            self.last_ran_on = (self.q_proj.weight.device, self.q_proj.weight.dtype)
        out = ATTENTION_IMPLEMENTATIONS[name](
            q, k, v, gate=gate, position_bias=position_bias,
            key_padding_mask=key_padding_mask, dropout_p=dropout, workspace=workspace,
        )
        return self.out_proj(out)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v (B, H, S, d) and the gate logits (B, H, S, 2) or None, in one product.

        q, k, v are ``q_proj``, ``k_proj``, ``v_proj`` of x split into heads. The gate's
        logits for head h are ``grep_linear`` of the unscaled query q_h with its 8 outputs
        summed in two groups of 4: for group a, ``u_a . q_h + c_a`` with ``u_a`` the sum
        of its 4 weight rows and ``c_a`` of its 4 biases.

        All of it is one matrix product: the three projections are stacked into one
        weight, and since ``q_h = Wq_h x + bq_h``, each gate logit is one more linear
        function of x (2 H more rows). Same values as the original's order of operations,
        to float rounding. The stacked weight is built on every call (a copy of 3 C^2
        numbers, cheap next to the product), so it follows training, ``load_state_dict``
        and quantisation noise without any cache; the state-dict keys are unchanged.
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
