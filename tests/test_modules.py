"""Building blocks, each against an independent computation written out in the test."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from beats import GradMultiply, quant_noise
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
