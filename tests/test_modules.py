"""Building blocks, each against an independent computation written out in the test."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from beats import GradMultiply, quant_noise
from beats.attention import MultiheadAttention, Workspace, relative_position_buckets
from beats.modules import GLULinear, SamePad, WeightNormConv1d, get_activation_fn


def test_grad_multiply_is_identity_forward_and_scales_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y = GradMultiply.apply(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.arange(12.0).view(3, 4)).sum().backward()
    assert torch.allclose(x.grad, 0.25 * torch.arange(12.0).view(3, 4))


def test_activations():
    x = torch.linspace(-4, 4, 101)
    erf_gelu = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    assert torch.allclose(get_activation_fn("gelu")(x), erf_gelu, atol=1e-6)
    tanh_gelu = 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * x**3)))
    assert torch.allclose(get_activation_fn("gelu_accurate")(x), tanh_gelu, atol=1e-6)
    assert torch.equal(get_activation_fn("gelu_fast")(x), get_activation_fn("gelu_accurate")(x))
    assert torch.equal(get_activation_fn("relu")(x), x.clamp(min=0))
    assert torch.equal(get_activation_fn("tanh")(x), torch.tanh(x))
    assert torch.equal(get_activation_fn("linear")(x), x)
    half = get_activation_fn("gelu")(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="swish"):
        get_activation_fn("swish")


def test_glu_is_first_half_times_swish_of_second():
    glu = GLULinear(6, 5)
    x = torch.randn(2, 3, 6)
    z = x @ glu.linear.weight.T + glu.linear.bias
    a, b = z[..., :5], z[..., 5:]
    assert torch.allclose(glu(x), a * b / (1 + torch.exp(-b)), atol=1e-6)


@pytest.mark.parametrize("k, removed", [(4, 1), (5, 0)])
def test_same_pad(k, removed):
    x = torch.randn(2, 3, 10)
    assert SamePad(k)(x).shape[-1] == 10 - removed


@pytest.mark.parametrize("kernel", [16, 15])
def test_weight_norm_conv_matches_torch_weight_norm(kernel):
    ours = WeightNormConv1d(12, kernel, groups=3)
    with torch.no_grad():
        ours.weight_g.mul_(torch.rand_like(ours.weight_g) + 0.5)
    plain = nn.Conv1d(12, 12, kernel, padding=kernel // 2, groups=3)
    plain = nn.utils.parametrizations.weight_norm(plain, name="weight", dim=2)
    with torch.no_grad():
        plain.parametrizations.weight.original0.copy_(ours.weight_g)
        plain.parametrizations.weight.original1.copy_(ours.weight_v)
        plain.bias.copy_(ours.bias)
    x = torch.randn(2, 12, 30)
    assert torch.allclose(ours(x), plain(x), atol=1e-6)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("channels, groups, kernel", [
    (48, 4, 16),  # the reference checkpoints' layout: 12 channels per group, 16 taps
    (16, 2, 32),  # 8 per group, 32 taps
    (64, 4, 16),  # 16 per group
])
def test_reduced_precision_positional_convolution_is_the_float64_one_rounded(
        channels, groups, kernel, autocast):
    """bfloat16 positional convolution (cast model, or float32 model under autocast) on
    CPU: the float64 convolution of the same bfloat16 inputs, to bfloat16 rounding. On CPUs
    with AMX, oneDNN's bfloat16 kernel got groups of under 16 channels wrong (cosine ~0.4)."""
    torch.manual_seed(0)
    conv = WeightNormConv1d(channels, kernel, groups)
    with torch.no_grad():
        conv.weight_g.mul_(torch.rand_like(conv.weight_g) + 0.5)
        conv.bias.normal_()
    x = torch.randn(2, 96, channels).to(torch.bfloat16).transpose(1, 2)  # (B, C, T), as used
    wide = copy.deepcopy(conv).to(torch.bfloat16).double()  # the same rounded weights
    expected = wide(x.double())
    with torch.no_grad():
        if autocast:
            conv.load_state_dict(wide.state_dict())  # float32 copies of the bf16 weights
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = conv(x.float())
        else:
            got = conv.to(torch.bfloat16)(x)
    assert got.shape == expected.shape == (2, channels, 96 + 1 - kernel % 2)
    cosine = F.cosine_similarity(got.double(), expected, dim=1)  # per position
    assert cosine.min() > 0.9999, float(cosine.min())
    assert (got.double() - expected).abs().max() <= 0.01 * expected.abs().max()


def _bucket(r: int, num_buckets: int, max_distance: int) -> int:
    """Spec section 6, one offset at a time, in plain Python floats."""
    nb = num_buckets // 2
    base = nb if r > 0 else 0
    a, e = abs(r), nb // 2
    if a < e:
        return base + a
    scaled = math.log(a / e) / math.log(max_distance / e) * (nb - e)
    return base + min(nb - 1, e + int(scaled))


@pytest.mark.parametrize("num_buckets, max_distance", [(320, 800), (32, 64)])
def test_relative_position_buckets(num_buckets, max_distance):
    n = 600
    buckets = relative_position_buckets(n, num_buckets, max_distance)
    for i in (0, 1, 77, 599):
        for j in range(n):
            assert int(buckets[i, j]) == _bucket(j - i, num_buckets, max_distance), (i, j)
    # Hand-checked values for the released configuration.
    b = relative_position_buckets(1000, 320, 800)
    assert b[0, 0] == 0 and b[1, 0] == 1 and b[0, 1] == 161
    assert b[0, 79] == 239 and b[0, 80] == 240 and b[0, 999] == 319 and b[999, 0] == 159


def _hand_position_bias(attn: MultiheadAttention, length: int, table):
    """The ungated bias (H, S, S) from the bucket table, buckets computed one by one by hand."""
    offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    buckets = torch.tensor([[_bucket(int(r), attn.num_buckets, attn.max_distance) for r in row]
                            for row in offsets])
    return table[buckets].permute(2, 0, 1)


def _original_attention(attn: MultiheadAttention, x, key_padding_mask, position_bias):
    """The original's computation: scaled q, max subtraction and x32 rescaling, explicit
    softmax; ``position_bias`` (H, S, S) or (B, H, S, S), gated when ``attn`` has the GRU
    gate; ``key_padding_mask`` (B, S) or None."""
    batch, length, dim = x.shape
    heads, d = attn.num_heads, attn.head_dim
    alpha, scaling = 32.0, d**-0.5
    q = (x @ attn.q_proj.weight.T + attn.q_proj.bias) * scaling / alpha
    k = x @ attn.k_proj.weight.T + attn.k_proj.bias
    v = x @ attn.v_proj.weight.T + attn.v_proj.bias
    q, k, v = (t.view(batch, length, heads, d).transpose(1, 2) for t in (q, k, v))
    w = q @ k.transpose(-1, -2)
    w = (w - w.max(dim=-1, keepdim=True).values) * alpha
    if key_padding_mask is not None:
        w = w.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    bias = position_bias
    if attn.gru_rel_pos:
        u = q * alpha / scaling
        g = torch.sigmoid((u @ attn.grep_linear.weight.T + attn.grep_linear.bias)
                          .view(batch, heads, length, 2, 4).sum(-1))
        bias = (g[..., :1] * (g[..., 1:] * attn.grep_a - 1.0) + 2.0) * bias
    out = torch.softmax(w + bias, dim=-1) @ v
    out = out.transpose(1, 2).reshape(batch, length, dim)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def _perturbed_attention(gru: bool = True, dim: int = 16, lengths: tuple[int, ...] = (40, 27)):
    """A relative-position attention (GRU gate or not) with every weight perturbed, a
    (len(lengths), 40, dim) input and its key padding mask (clip i has lengths[i] valid
    positions)."""
    torch.manual_seed(0)
    attn = MultiheadAttention(dim, 4, has_relative_attention_bias=True, num_buckets=32,
                              max_distance=64, gru_rel_pos=gru).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(len(lengths), 40, dim)
    mask = torch.arange(40)[None, :] >= torch.tensor(lengths)[:, None]
    return attn, x, mask


def test_attention_matches_the_original_computation():
    attn, x, mask = _perturbed_attention()
    with torch.no_grad():
        ours = attn(x, mask, attn.position_bias(40, x.device))
        theirs = _original_attention(
            attn, x, mask, _hand_position_bias(attn, 40, attn.relative_attention_bias.weight))
    assert (ours - theirs).abs().max() < 1e-5


def test_quant_noise_drops_whole_blocks_and_never_changes_weights():
    torch.manual_seed(0)
    plain = nn.Linear(16, 6)
    stored = plain.weight.detach().clone()
    noisy = quant_noise(plain, p=0.5, block_size=4)
    assert noisy.weight is plain.weight  # shares the parameters
    x = torch.randn(3, 16)
    noisy.eval()
    assert torch.equal(noisy(x), plain(x))
    noisy.train()
    outs = []
    for _ in range(4):
        noisy.zero_grad()
        out = noisy(x)
        outs.append(out.detach())
        out.pow(2).sum().backward()
        blocks = noisy.weight.grad.view(6, 4, 4)  # (out, block, in-block)
        zero = (blocks == 0).all(dim=-1)
        assert ((blocks != 0).all(dim=-1) | zero).all()  # whole blocks are dropped
        assert 0 < int(zero.sum()) < zero.numel()
        assert torch.equal(noisy.weight, stored)
    assert not torch.equal(outs[0], outs[1])
    assert quant_noise(plain, p=0.0, block_size=4) is plain
    with pytest.raises(ValueError, match="block_size"):
        quant_noise(nn.Linear(10, 3), p=0.1, block_size=4)
    with pytest.raises(TypeError):
        quant_noise(nn.LSTM(4, 4), p=0.1, block_size=4)


def test_quant_noise_kept_weights_scaled():
    torch.manual_seed(1)
    lin = quant_noise(nn.Linear(8, 2, bias=False), p=0.5, block_size=8).train()
    eye = torch.eye(8)
    effective = lin(eye).T  # (2, 8): each row is the noised weight row
    w = lin.weight.detach()
    for row in range(2):
        kept = effective[row] != 0
        if kept.any():
            assert torch.allclose(effective[row][kept], 2.0 * w[row][kept])


def test_quant_noise_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, kernel_size=1)
    noisy = quant_noise(conv, p=0.5, block_size=4)
    x = torch.randn(1, 8, 5, 5)
    assert torch.equal(noisy.eval()(x), conv(x))
    assert not torch.equal(noisy.train()(x), conv(x))


@pytest.mark.parametrize("gru", [True, False])
@pytest.mark.parametrize("padded", [True, False])
def test_attention_mask_buffer_and_grad_paths_agree(gru, padded):
    """The encoder's no-grad path writes masks into a shared buffer; same values as autograd's."""
    attn, x, mask = _perturbed_attention(gru)
    mask = mask if padded else None
    bias = attn.position_bias(40, x.device)
    with torch.enable_grad():
        with_grad = attn(x, mask, bias)
    workspace = Workspace()
    buffer = workspace.get("mask", (2, 4, 40, 40), x).fill_(float("nan"))
    with torch.no_grad():
        plain = attn(x, mask, bias)
        buffered = attn(x, mask, bias, workspace)
    assert torch.equal(plain, buffered)
    # Autograd may pick another SDPA kernel: equal to float noise (outputs are ~3).
    assert (with_grad - buffered).abs().max() < 1e-5
    if gru or padded:
        assert not buffer.isnan().any()  # the mask went into the buffer


def test_fused_projection_gradients_equal_the_original_computation():
    """q/k/v and the gate logits come from one stacked product; gradients must not notice."""
    attn, x, mask = _perturbed_attention()
    grads = []
    for run in ("ours", "original"):
        attn.zero_grad()
        if run == "ours":
            out = attn(x, mask, attn.position_bias(40, x.device))
        else:
            out = _original_attention(
                attn, x, mask, _hand_position_bias(attn, 40, attn.relative_attention_bias.weight))
        out.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in attn.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-4, rtol=1e-4), name


def test_bfloat16_gelu_is_the_float32_gelu_rounded_once():
    """Every normal bfloat16 number: the bfloat16 GELU equals float32 GELU rounded once."""
    bits = torch.arange(2**16, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16)
    wide = x.float()
    x, wide = x[wide.isfinite()], wide[wide.isfinite()]
    gelu = get_activation_fn("gelu")
    expected = F.gelu(wide).to(torch.bfloat16)
    got = gelu(x)
    assert got.dtype == torch.bfloat16
    # Inputs below 2.4e-38 give results below the smallest normal float: flushed to zero.
    keep = (wide == 0) | (wide.abs() >= 2.4e-38)
    assert keep.sum() > 64000  # of 65280 finite values
    assert torch.equal(got[keep].view(torch.int16), expected[keep].view(torch.int16))


@pytest.mark.parametrize("gru", [True, False])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("per_clip_bias", [True, False])
def test_bfloat16_attention_outside_autograd_matches_the_formula(gru, padded, per_clip_bias):
    """bfloat16 on CPU with a workspace (the clip-by-clip path): the original's attention
    (in float64) to bfloat16 rounding, as close as SDPA's bfloat16 kernel gets."""
    attn, x, mask = _perturbed_attention(gru, dim=32, lengths=(40, 27, 9))
    mask = mask if padded else None
    if per_clip_bias:  # kept patches at scattered true positions (pre-training)
        positions = torch.stack([torch.randperm(100)[:40].sort().values for _ in range(3)])
        bias = attn.position_bias_at(positions)
    else:
        bias = attn.position_bias(40, x.device)
    with torch.no_grad():
        expected = _original_attention(copy.deepcopy(attn).double(), x.double(), mask,
                                       bias.double())
        half = attn.to(torch.bfloat16)
        xb, bias_b = x.to(torch.bfloat16), bias.to(torch.bfloat16)
        workspace = Workspace()
        by_clip = half(xb, mask, bias_b, workspace)
        assert "scores" in workspace._tensors  # the clip-by-clip path ran
        sdpa = half(xb, mask, bias_b)
    assert by_clip.dtype == torch.bfloat16 and by_clip.shape == x.shape
    err = (by_clip.double() - expected).abs().max().item()
    sdpa_err = (sdpa.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err < 0.02 * scale
    assert err < 5.0 * sdpa_err + 1e-3 * scale
    cosine = F.cosine_similarity(by_clip.double(), expected, dim=-1).min().item()
    sdpa_cosine = F.cosine_similarity(sdpa.double(), expected, dim=-1).min().item()
    # One more bfloat16 rounding (of the scores, which SDPA keeps in float32): within a
    # few times SDPA's own distance on these deliberately sharp weights.
    assert 1 - cosine < 5.0 * (1 - sdpa_cosine) + 1e-4


def test_bfloat16_attention_with_an_all_padding_clip_falls_back_to_sdpa():
    """A clip whose keys are all padding has no softmax (0/0): the batch runs through SDPA."""
    torch.manual_seed(0)
    attn = MultiheadAttention(32, 4, has_relative_attention_bias=True, num_buckets=32,
                              max_distance=64, gru_rel_pos=True).eval().to(torch.bfloat16)
    x = torch.randn(2, 20, 32, dtype=torch.bfloat16)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1] = True
    bias = attn.position_bias(20, x.device)
    with torch.no_grad():
        workspace = Workspace()
        out = attn(x, mask, bias, workspace)
        assert "scores" not in workspace._tensors
        assert torch.equal(out, attn(x, mask, bias))
    assert out[0].isfinite().all()
