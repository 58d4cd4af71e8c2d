"""Fast attention implementations: `beats.attention.eager_attention`'s computation.

Each takes the per-head queries, keys and values with the gate and position bias of the
architecture and returns the heads concatenated, like the plain computation, with the
same numbers to float rounding; they differ only in how the scores are stored and
multiplied. `beats.attention.choose_implementation`
picks one per forward pass.

- `sdpa_attention`: torch's ``scaled_dot_product_attention`` with ``G * P`` (and -inf at
  padded keys) as an additive float mask. Autograd, dropout, ``torch.compile``,
  ``torch.export`` and ONNX.
- `by_clip_attention`: one clip at a time into score buffers reused by every layer, with
  batched matrix products; outside autograd only. The faster in bfloat16 on CPUs
  without AMX.

`Workspace` holds the buffers that the layers of one forward pass share.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .modules import is_tracing


class Workspace:
    """Scratch tensors that every layer reuses within one forward pass outside autograd.

    A fresh (B, H, S, S) allocation per layer costs more than writing it (page faults on
    CPU), so the encoder hands one workspace to all its layers. It is only made when no
    gradient is recorded and no graph is being captured, and it lives for one forward.
    """

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialised tensor ``name`` of ``shape`` on ``like``'s device, in ``dtype``
        (default ``like``'s)."""
        dtype = like.dtype if dtype is None else dtype
        tensor = self._tensors.get(name)
        if (tensor is None or tensor.shape != shape or tensor.dtype != dtype
                or tensor.device != like.device):
            tensor = self._tensors[name] = like.new_empty(shape, dtype=dtype)
        return tensor


def additive_mask(
    gate: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    position_bias: torch.Tensor | None,
    *,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """What the scores get added: ``G * P``, and -inf at padded keys; or None for nothing.

    Args:
        gate: (B, H, S, 1) the GRU gate G, or None (G = 1).
        key_padding_mask: (B, S) True at padding, or None when nothing is padded.
        position_bias: (H, S, S) ungated bias P, (B, H, S, S) one per clip, or None.
        dtype: the dtype P is cast to (the queries').
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
    if gate is None:
        if neg is None:
            return bias
        return torch.add(bias, neg, out=out) if out is not None else bias + neg
    if out is None:
        return gate * bias if neg is None else torch.addcmul(neg, gate, bias)
    torch.mul(gate, bias, out=out)
    return out if neg is None else out.add_(neg)


def _mask_dtype(q: torch.Tensor, gate: torch.Tensor | None) -> torch.dtype:
    # The gate is float32 under autocast (its parameter is) while q is bfloat16: the mask
    # keeps the gate's precision.
    return q.dtype if gate is None else torch.promote_types(q.dtype, gate.dtype)


def sdpa_attention(
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
    """Attention through ``F.scaled_dot_product_attention``: (B, S, H * d).

    Arguments as in `beats.attention.eager_attention`. The mask from `additive_mask` goes
    in as a float mask; with a ``workspace`` it is written into a buffer that all layers
    share. A clip whose keys are all padding gets zeros.
    """
    batch, heads, length, d = q.shape
    buffer = None
    if workspace is not None and position_bias is not None:
        buffer = workspace.get("mask", (batch, heads, length, length), q,
                               dtype=_mask_dtype(q, gate))
    mask = additive_mask(gate, key_padding_mask, position_bias, dtype=q.dtype, out=buffer)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    out = out.transpose(1, 2)  # (B, S, H, d): often contiguous already (CPU kernel)
    if is_tracing():
        # The ONNX exporter replaces SDPA by its math, whose output has another layout
        # than the kernel traced; an explicit copy keeps the reshape below valid.
        out = out.clone(memory_format=torch.contiguous_format)
    return out.reshape(batch, length, heads * d)


def by_clip_attention(
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
    """Attention one clip at a time, outside autograd and without dropout: (B, S, H * d).

    Arguments as in `beats.attention.eager_attention`; ``workspace`` holds the score
    buffers (a fresh one is made without it). Per clip, the mask (`additive_mask`) is
    written into an (H, S, S) score buffer and the scores are added to it by one batched
    product over the heads (accumulated in float32, rounded once to the inputs' dtype);
    the softmax is computed in float32 and rounded once; one more batched product gives
    the output. A clip whose keys are all padding gets zeros, as with SDPA.

    Why: on an AMD EPYC (Zen 4), SDPA's bfloat16 kernel, which runs many small block
    products, was measured no faster than its float32 one, while these batched products
    run at the bfloat16 matrix rate. On an Intel Xeon with AMX, SDPA is the faster
    (`beats.attention.choose_implementation`). The price is one bfloat16 rounding of the
    scores, which SDPA keeps in float32: the features' cosine to float32 stays above
    0.9999 on the reference checkpoints.
    """
    if dropout_p > 0.0:
        raise ValueError("by_clip_attention has no dropout")
    workspace = Workspace() if workspace is None else workspace
    batch, heads, length, d = q.shape
    scores = workspace.get("scores", (1, heads, length, length), q)
    probs = workspace.get("probs", (heads, length, length), q)
    out = q.new_empty(batch, length, heads, d)
    empty = [False] * batch
    if key_padding_mask is not None:
        empty = key_padding_mask.all(dim=1).tolist()
    scale = 1.0 / math.sqrt(d)
    for b in range(batch):
        if empty[b]:  # no key to attend to: 0 / 0 in the softmax
            out[b].zero_()
            continue
        clip = slice(b, b + 1)
        bias = position_bias
        if bias is not None and bias.dim() == 4:
            bias = bias[clip]
        mask = additive_mask(
            None if gate is None else gate[clip],
            None if key_padding_mask is None else key_padding_mask[clip],
            bias, dtype=q.dtype, out=scores,
        )
        if mask is not None and mask is not scores:
            scores.copy_(mask)  # an ungated bias or padding only: not written yet
        scores[0].baddbmm_(q[b], k[b].transpose(1, 2), beta=0.0 if mask is None else 1.0,
                           alpha=scale)
        torch.softmax(scores[0], dim=-1, out=probs)
        torch.bmm(probs, v[b], out=out[b].transpose(0, 1))
    return out.view(batch, length, heads * d)
