"""Small building blocks of the BEATs encoder.

See docs/design/architecture.md: Encoder input, Layers, Quantisation noise and gradient
scaling.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

_HALF = (torch.float16, torch.bfloat16)


def is_tracing() -> bool:
    """True while torch.compile, torch.export or the ONNX exporter capture a graph.

    Eager-only shortcuts (caches kept on modules, buffers reused in place) step aside
    then: a captured graph plans its own memory and must not depend on Python state.
    """
    compiler = getattr(torch, "compiler", None)
    for name in ("is_compiling", "is_exporting"):
        check = getattr(compiler, name, None)
        if check is not None and check():
            return True
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class GradMultiply(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU computed in float32 and cast back to the input's dtype.

    On CPU, torch's bfloat16 kernel already does exactly that (float32 inside, one
    rounding), so bfloat16 runs it directly: the same bits without the two casts, which
    cost more than the GELU itself. The one exception is a result below the smallest
    normal number (|x| < 2.4e-38), which that kernel flushes to zero.
    """
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return F.gelu(x)
    return F.gelu(x.float()).type_as(x)


def gelu_accurate(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU (``gelu_accurate``, alias ``gelu_fast``)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def get_activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called ``name`` in a BEATs config. ``glu`` acts inside `GLULinear`."""
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": F.relu,
        "gelu": gelu,
        "gelu_fast": gelu_accurate,
        "gelu_accurate": gelu_accurate,
        "tanh": torch.tanh,
        "linear": _identity,
        "glu": _identity,
    }
    if name not in table:
        raise InputError(f"unknown activation {name!r}; expected one of {sorted(table)}")
    return table[name]


class GLULinear(nn.Module):
    """Linear(C, 2F) then ``first half * swish(second half)``: (..., C) -> (..., F)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.linear(x).chunk(2, dim=-1)
        return a * (b * torch.sigmoid(b))


class SamePad(nn.Module):
    """Drops the last step of a 'same'-padded convolution with an even kernel: (B, C, T)."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.remove] if self.remove else x


class WeightNormConv1d(nn.Module):
    """Conv1d whose weight is ``g * v / ||v||``, the norm taken per kernel tap (dim 2).

    Parameters are named ``weight_g`` (1, 1, K) and ``weight_v`` (C_out, C_in / groups, K),
    the keys of Microsoft checkpoints. (B, C, T) -> (B, C, T + 1 - K % 2).
    """

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.groups = groups
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        std = math.sqrt(4.0 / (kernel_size * channels))
        nn.init.normal_(self.weight_v, mean=0.0, std=std)
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))

    def weight(self) -> torch.Tensor:
        """``g * v / ||v||`` (C_out, C_in / groups, K), computed in float32 at least."""
        v = self.weight_v.float() if self.weight_v.dtype in _HALF else self.weight_v
        return v * (self.weight_g.to(v.dtype) / v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T + 1 - K % 2), in x's dtype.

        On CPU, a convolution with fewer than 16 input channels per group runs in float32
        when it would otherwise run in bfloat16 or float16 (x's dtype or autocast's): for
        such groups, oneDNN's AMX bfloat16 convolution (``brg_conv_fwd`` on CPUs with AMX,
        oneDNN 3.12) returns wrong values for most even kernel widths, and hangs on some
        one-channel groups. The released models have 48 channels per group (not affected,
        kept in bfloat16); the small layouts this concerns cost next to nothing in float32.
        """
        if x.device.type == "cpu" and self.weight_v.shape[1] < 16 and _runs_in_half(x):
            with torch.autocast("cpu", enabled=False):
                return self._conv(x.float()).to(x.dtype)
        return self._conv(x)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        # Run as a 2-D convolution over (B, C, 1, T) in channels-last layout: oneDNN's
        # grouped kernel for that layout is about twice as fast on CPU as conv1d's, and the
        # encoder's (B, T, C) activations, transposed, already are channels-last (no copy).
        w = self.weight().to(x.dtype).unsqueeze(2).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x.unsqueeze(2), w, self.bias.to(x.dtype),
                     padding=(0, self.kernel_size // 2), groups=self.groups)
        return y.squeeze(2)


def _runs_in_half(x: torch.Tensor) -> bool:
    """Whether an operation on x computes in float16/bfloat16 (x's dtype, or autocast's)."""
    if x.dtype in _HALF:
        return True
    device = x.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in _HALF


def _drop_blocks(weight: torch.Tensor, p: float, block_size: int) -> torch.Tensor:
    """A copy of ``weight`` with random input blocks zeroed and the rest scaled by 1/(1-p)."""
    if weight.dim() == 2:  # Linear: blocks along the input axis of each output row
        out_features, in_features = weight.shape
        keep = torch.rand(out_features, in_features // block_size, device=weight.device) >= p
        keep = keep.repeat_interleave(block_size, dim=1)
    elif weight.shape[2:].numel() == 1:  # 1x1 conv: blocks of input channels
        out_ch, in_ch = weight.shape[:2]
        keep = torch.rand(out_ch, in_ch // block_size, device=weight.device) >= p
        keep = keep.repeat_interleave(block_size, dim=1).view(out_ch, in_ch, *weight.shape[2:])
    else:  # k x k conv: whole kernels of (output, input) channel pairs
        out_ch, in_ch = weight.shape[:2]
        keep = torch.rand(out_ch, in_ch, device=weight.device) >= p
        keep = keep.view(out_ch, in_ch, *([1] * (weight.dim() - 2)))
    return weight * keep.to(weight.dtype) / (1.0 - p)


class QuantNoiseLinear(nn.Linear):
    """`nn.Linear` with quantisation noise on its weight in training (Fan et al. 2020).

    The noise acts on the forward pass only: the stored weight never changes, unlike the
    original, which wrote the noised weight back into the parameter. In eval mode, or with
    ``p == 0``, it is exactly `nn.Linear`. State-dict keys are those of `nn.Linear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 p: float = 0.0, block_size: int = 8, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        _check_quant_noise(self.weight, p, block_size)
        self.p = p
        self.block_size = block_size

    def noisy_weight(self) -> torch.Tensor:
        """The weight this forward pass uses: noised in training when ``p > 0``."""
        if self.training and self.p > 0:
            return _drop_blocks(self.weight, self.p, self.block_size)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.noisy_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, block_size={self.block_size}"


class QuantNoiseConv2d(nn.Conv2d):
    """`nn.Conv2d` with quantisation noise on its weight in training; see `QuantNoiseLinear`."""

    p: float = 0.0
    block_size: int = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.training and self.p > 0:
            weight = _drop_blocks(weight, self.p, self.block_size)
        return self._conv_forward(x, weight, self.bias)


def _check_quant_noise(weight: torch.Tensor, p: float, block_size: int) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"quant_noise: p={p} must lie in [0, 1)")
    if block_size < 1:
        raise ValueError(f"quant_noise: block_size={block_size} must be positive")
    in_features = weight.shape[1]
    blocked = weight.dim() == 2 or weight.shape[2:].numel() == 1
    if p > 0 and blocked and in_features % block_size:
        raise ValueError(
            f"quant_noise: block_size={block_size} must divide the input size {in_features}"
        )


def quant_noise(module: nn.Module, p: float, block_size: int) -> nn.Module:
    """Quantisation noise for a Linear or Conv2d (docs/design/architecture.md).

    Returns a module of the same kind whose training forward drops random blocks of
    ``block_size`` input weights with probability ``p`` and scales the rest by 1/(1-p).
    The returned module shares ``module``'s parameters; stored weights never change, and
    in eval it computes exactly what ``module`` does. ``p == 0`` returns ``module`` itself.
    """
    if p <= 0:
        return module
    if isinstance(module, nn.Linear):
        _check_quant_noise(module.weight, p, block_size)
        noisy: nn.Module = QuantNoiseLinear(
            module.in_features, module.out_features, module.bias is not None,
            p=p, block_size=block_size, device="meta",
        )
    elif isinstance(module, nn.Conv2d):
        _check_quant_noise(module.weight, p, block_size)
        noisy = QuantNoiseConv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, module.groups, module.bias is not None,
            module.padding_mode, device="meta",
        )
        noisy.p, noisy.block_size = p, block_size
    else:
        raise TypeError(f"quant_noise supports nn.Linear and nn.Conv2d, not {type(module)}")
    noisy.weight = module.weight
    noisy.bias = module.bias
    noisy.train(module.training)
    return noisy
