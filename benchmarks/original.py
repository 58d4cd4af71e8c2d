"""The baseline: a re-implementation of the ORIGINAL BEATs computation, for benchmarking.

Written from the spec (``beats-architecture.md``) and the published description of the
original code, not copied from it. It keeps what makes the original slow on purpose:

- the filterbank runs clip by clip in a Python loop, rebuilding the window and the mel
  matrix on every call, with a float32 FFT (as ``torchaudio.compliance.kaldi.fbank``);
- the encoder runs in fairseq's (S, B, C) layout;
- attention is explicit: ``bmm`` of q (pre-scaled by 1/sqrt(d) and 1/32) and k, the row
  maximum subtracted, times 32, the gated position bias (B * H, S, S) added, a float32
  softmax, then ``bmm`` with v;
- the position bias is bucketed and gathered in layer 0 on every call, repeated over the
  batch, and handed from layer to layer as in the original; each layer gates it anew;
- the weight-normalised positional convolution recomputes its weight on every call.

It reads the state dict of a `beats.BEATs` (the same weights), runs in eval mode only (no
dropout), and takes equal-length clips (no padding: the original's padding mask is
misaligned). `trainable` + `forward` give the forward/backward baseline of training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from beats import BEATs, BEATsConfig


def _kaldi_fbank(wav: torch.Tensor) -> torch.Tensor:
    """One clip (N,) in [-1, 1] -> raw log-mel energies (T, 128), torchaudio-style."""
    x = wav * 32768.0
    frames = x.unfold(0, 400, 160)  # (T, 400)
    frames = frames - frames.mean(dim=1, keepdim=True)
    shifted = F.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)[:, :-1]
    frames = frames - 0.97 * shifted
    window = torch.hann_window(400, periodic=False, dtype=frames.dtype, device=frames.device)
    frames = F.pad(frames * window.pow(0.85), (0, 112))
    power = torch.fft.rfft(frames).abs().pow(2.0)  # (T, 257), float32
    banks = _mel_banks(frames.dtype, frames.device)
    return torch.mm(power, banks.t()).clamp(min=1.1920929e-07).log()


def _mel_banks(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(128, 257) triangular mel filters, recomputed per call as torchaudio does."""
    def mel(f):
        return 1127.0 * torch.log(1.0 + f / 700.0)

    low, high = 1127.0 * math.log(1.0 + 20.0 / 700.0), 1127.0 * math.log(1.0 + 8000.0 / 700.0)
    delta = (high - low) / 129
    b = torch.arange(128, dtype=dtype, device=device).unsqueeze(1)
    left, centre, right = low + b * delta, low + (b + 1.0) * delta, low + (b + 2.0) * delta
    m = mel(16000 / 512 * torch.arange(256, dtype=dtype, device=device)).unsqueeze(0)
    up, down = (m - left) / (centre - left), (right - m) / (right - centre)
    banks = torch.clamp(torch.min(up, down), min=0.0)
    return F.pad(banks, (0, 1))


def _buckets(length: int, num_buckets: int, max_distance: int,
             device: torch.device) -> torch.Tensor:
    """Relative position bucket (S, S) of key j - query i (spec section 6)."""
    pos = torch.arange(length, dtype=torch.long, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    out = (rel > 0).to(torch.long) * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (
        torch.log(rel.float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, half - 1))
    return out + torch.where(rel < exact, rel, large)


class OriginalBEATs:
    """The original's forward pass over the weights of a `beats.BEATs` (eval, no padding)."""

    def __init__(self, model: BEATs) -> None:
        self.cfg: BEATsConfig = model.cfg
        self.p = {k: v.detach() for k, v in model.state_dict().items()}

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.p[f"{name}.weight"], self.p.get(f"{name}.bias"))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.p[f"{name}.weight"], self.p[f"{name}.bias"])

    def _activation(self, x: torch.Tensor, name: str) -> torch.Tensor:
        kind = self.cfg.activation_fn
        if kind == "glu":
            h = self._linear(x, f"{name}.fc1.linear")
            half = h.shape[-1] // 2
            return h[..., :half] * (h[..., half:] * torch.sigmoid(h[..., half:]))
        h = self._linear(x, f"{name}.fc1")
        if kind == "gelu":
            return F.gelu(h.float()).type_as(h)
        if kind in ("gelu_fast", "gelu_accurate"):
            return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        return {"relu": F.relu, "tanh": torch.tanh, "linear": lambda t: t}[kind](h)

    def _attention(self, x: torch.Tensor, name: str, bias: torch.Tensor | None):
        """x (S, B, C) -> ((S, B, C), the (B * H, S, S) position bias for the next layer)."""
        cfg = self.cfg
        length, batch, dim = x.shape
        heads = cfg.encoder_attention_heads
        d = dim // heads
        scaling, alpha = d**-0.5, 32.0
        if cfg.relative_position_embedding and bias is None:
            table = self.p["encoder.layers.0.self_attn.relative_attention_bias.weight"]
            buckets = _buckets(length, cfg.num_buckets, cfg.max_distance, x.device)
            values = F.embedding(buckets, table)
            bias = values.permute(2, 0, 1).unsqueeze(0).repeat(batch, 1, 1, 1)
            bias = bias.view(batch * heads, length, length)
        q = self._linear(x, f"{name}.q_proj") * scaling / alpha
        k = self._linear(x, f"{name}.k_proj")
        v = self._linear(x, f"{name}.v_proj")
        q = q.contiguous().view(length, batch * heads, d).transpose(0, 1)
        k = k.contiguous().view(length, batch * heads, d).transpose(0, 1)
        v = v.contiguous().view(length, batch * heads, d).transpose(0, 1)
        scores = torch.bmm(q, k.transpose(1, 2))
        scores = (scores - scores.max(dim=-1, keepdim=True)[0]) * alpha
        if bias is not None:
            rel = bias
            if cfg.gru_rel_pos:
                query = q.view(batch, heads, length, d) * alpha / scaling
                z = F.linear(query, self.p[f"{name}.grep_linear.weight"],
                             self.p[f"{name}.grep_linear.bias"])
                gate_a, gate_b = torch.sigmoid(z.view(batch, heads, length, 2, 4).sum(-1)).chunk(
                    2, dim=-1)
                gate = gate_a * (gate_b * self.p[f"{name}.grep_a"] - 1.0) + 2.0
                rel = gate.view(batch * heads, length, 1) * bias
            scores = scores + rel.view(scores.shape)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
        out = torch.bmm(probs, v).transpose(0, 1).contiguous().view(length, batch, dim)
        return self._linear(out, f"{name}.out_proj"), bias

    def _layer(self, x: torch.Tensor, i: int, bias: torch.Tensor | None):
        cfg = self.cfg
        name = f"encoder.layers.{i}"
        if cfg.layer_norm_first:
            attn, bias = self._attention(self._norm(x, f"{name}.self_attn_layer_norm"),
                                         f"{name}.self_attn", bias)
            x = x + attn
            h = self._activation(self._norm(x, f"{name}.final_layer_norm"), name)
            return x + self._linear(h, f"{name}.fc2"), bias
        a = math.pow(2.0 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0
        attn, bias = self._attention(x, f"{name}.self_attn", bias)
        x = self._norm(x * a + attn, f"{name}.self_attn_layer_norm")
        h = self._linear(self._activation(x, name), f"{name}.fc2")
        return self._norm(x * a + h, f"{name}.final_layer_norm"), bias

    def trainable(self) -> list[torch.Tensor]:
        """Make the weights leaf tensors that require grad (for the training baseline);
        returns them, for an optimiser. `forward` then builds the autograd graph."""
        self.p = {k: v.detach().clone().requires_grad_(v.is_floating_point())
                  for k, v in self.p.items()}
        return [v for v in self.p.values() if v.requires_grad]

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """wav (B, N) equal-length clips -> (features (B, S, C), L + 1 hidden states)."""
        return self.forward(wav)

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`__call__` under the caller's grad mode (training baseline)."""
        cfg, p = self.cfg, self.p
        fbanks = [_kaldi_fbank(clip) for clip in wav]
        fb = (torch.stack(fbanks, dim=0) - 15.41663) / (2 * 6.55582)
        x = F.conv2d(fb.unsqueeze(1), p["patch_embedding.weight"],
                     p.get("patch_embedding.bias"), stride=16)
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
        x = self._norm(x, "layer_norm")
        if "post_extract_proj.weight" in p:
            x = self._linear(x, "post_extract_proj")

        g, v = p["encoder.pos_conv.0.weight_g"], p["encoder.pos_conv.0.weight_v"]
        weight = g * v / v.norm(dim=(0, 1), keepdim=True)
        kernel = weight.shape[-1]
        conv = F.conv1d(x.transpose(1, 2), weight, p["encoder.pos_conv.0.bias"],
                        padding=kernel // 2, groups=cfg.conv_pos_groups)
        if kernel % 2 == 0:
            conv = conv[:, :, :-1]
        x = x + F.gelu(conv).transpose(1, 2)
        if not cfg.layer_norm_first:
            x = self._norm(x, "encoder.layer_norm")

        x = x.transpose(0, 1)  # (S, B, C)
        hidden = [x.transpose(0, 1)]
        bias = None
        for i in range(cfg.encoder_layers):
            x, bias = self._layer(x, i, bias)
            hidden.append(x.transpose(0, 1))
        x = x.transpose(0, 1)
        if cfg.layer_norm_first:
            x = self._norm(x, "encoder.layer_norm")
        return x, hidden
