"""The BEATs Transformer encoder: positional convolution and layers.

See docs/design/architecture.md: Encoder input, Layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (
    MultiheadAttention,
    Workspace,
    check_implementation,
    choose_implementation,
    outside_autograd,
)
from .config import BEATsConfig
from .modules import (
    GLULinear,
    GradMultiply,
    SamePad,
    WeightNormConv1d,
    get_activation_fn,
)


class EncoderLayer(nn.Module):
    """One Transformer layer, post-norm (optionally deep norm) or pre-norm. (B, S, C)."""

    def __init__(self, cfg: BEATsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        dim, ffn = cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.alpha = math.pow(2.0 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0
        self.self_attn = MultiheadAttention(
            dim,
            cfg.encoder_attention_heads,
            dropout=cfg.attention_dropout,
            has_relative_attention_bias=has_relative_attention_bias,
            num_buckets=cfg.num_buckets,
            max_distance=cfg.max_distance,
            gru_rel_pos=cfg.gru_rel_pos,
            quant_noise=cfg.quant_noise,
            quant_noise_block_size=cfg.quant_noise_block_size,
        )
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.activation_dropout)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        glu = cfg.activation_fn == "glu"
        self.fc1: nn.Module = GLULinear(dim, ffn) if glu else nn.Linear(dim, ffn)
        self.activation = get_activation_fn(cfg.activation_fn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.fc2(self.dropout2(self.activation(self.fc1(x)))))

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        workspace: Workspace | None = None,
    ) -> torch.Tensor:
        """x (B, S, C); key_padding_mask (B, S) True at padding; position_bias (H, S, S)
        shared or (B, H, S, S) per clip; workspace: see `Workspace` (outside autograd)."""
        if self.layer_norm_first:
            x = x + self.dropout1(self.self_attn(
                self.self_attn_layer_norm(x), key_padding_mask, position_bias, workspace
            ))
            return x + self._feed_forward(self.final_layer_norm(x))
        attn = self.self_attn(x, key_padding_mask, position_bias, workspace)
        # torch.add(y, x, alpha=a) is y + a * x in one pass.
        x = self.self_attn_layer_norm(torch.add(self.dropout1(attn), x, alpha=self.alpha))
        return self.final_layer_norm(torch.add(self._feed_forward(x), x, alpha=self.alpha))


class TransformerEncoder(nn.Module):
    """Positional convolution, L layers and (pre-norm only) a final LayerNorm. (B, S, C)."""

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.dropout = cfg.dropout
        self.layer_norm_first = cfg.layer_norm_first
        self.layerdrop = cfg.encoder_layerdrop
        self.grad_decay = cfg.layer_wise_gradient_decay_ratio
        self.relative_position_embedding = relative = cfg.relative_position_embedding
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups),
            SamePad(cfg.conv_pos),
            nn.GELU(),
        )
        self.layers = nn.ModuleList(
            EncoderLayer(cfg, has_relative_attention_bias=relative and i == 0)
            for i in range(cfg.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(dim)
        init_weights(self, cfg)

    @property
    def attn_implementation(self) -> str:
        """The attention implementation of the latest forward pass, or the next one's.

        Every layer runs the same one. Before the first forward pass, after a new setting
        and after a change of device or dtype, it is the one an inference call in eval
        mode (``embed``, ``torch.no_grad``) would run now. Set it to ``"auto"`` (the
        default), ``"eager"``, ``"sdpa"`` or ``"by_clip"`` (see `beats.attention`).
        """
        if not self.layers:
            return "none"
        attn = self.layers[0].self_attn
        weight = attn.q_proj.weight
        ran = attn.last_implementation
        if ran is not None and attn.last_ran_on == (weight.device, weight.dtype):
            return ran
        with torch.no_grad():
            return choose_implementation(attn.implementation, weight.device, weight.dtype, 0.0)

    @attn_implementation.setter
    def attn_implementation(self, name: str) -> None:
        check_implementation(name)
        for layer in self.layers:
            layer.self_attn.implementation = name
            layer.self_attn.last_implementation = None

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_layer: int | None = None,
        positions: torch.Tensor | None = None,
        conv_length: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Run the encoder on patch embeddings.

        Args:
            x: (B, S, C) encoder input (after patch embedding and projection).
            padding_mask: (B, S) bool, True at padded positions; None (faster) when no
                position is padded.
            output_hidden_states: also return the L + 1 hidden states (or k + 1 with
                ``output_layer=k``): state 0 after the positional convolution, state j the
                output of layer j, all before the final pre-norm LayerNorm.
            output_layer: stop after layer k (0..L) and return its output; layers above k
                are not run, and the final pre-norm LayerNorm is not applied.
            positions: (B, S) int64, for a subset of a longer sequence (pre-training runs
                the kept patches only): each entry's index in the full sequence. Relative
                position buckets then use the true offsets. None: entry i is at i.
            conv_length: with ``positions``, run the positional convolution over the full
                sequence of this length (entries scattered to their positions, every other
                position zero) and gather the result back; None runs it over x as given
                (compacted). Entries at padded rows may hold any position in
                [0, conv_length]: they are zero, so they add nothing.

        Returns:
            ``(x, hidden_states)``: x (B, S, C); hidden_states a tuple, empty unless asked.
        """
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self._pos_conv(x, positions, conv_length)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, p=self.dropout, training=self.training)

        stop = len(self.layers) if output_layer is None else output_layer
        hidden: list[torch.Tensor] = [x] if output_hidden_states else []
        position_bias = None
        if self.relative_position_embedding and stop > 0:
            attn = self.layers[0].self_attn
            if positions is None:
                position_bias = attn.position_bias(x.shape[1], x.device)
            else:
                position_bias = attn.position_bias_at(positions)
        # Scratch memory (attention masks and scores) shared by the layers, in eager
        # inference only: autograd needs its tensors kept, a captured graph plans its own.
        workspace = Workspace() if outside_autograd() else None
        for layer in self.layers[:stop]:
            if self.grad_decay != 1.0 and torch.is_grad_enabled():
                x = GradMultiply.apply(x, self.grad_decay)
            skip = self.training and self.layerdrop > 0 and torch.rand(()).item() < self.layerdrop
            if not skip:
                x = layer(x, padding_mask, position_bias, workspace)
            if output_hidden_states:
                hidden.append(x)
        if self.layer_norm_first and output_layer is None:
            x = self.layer_norm(x)
        return x, tuple(hidden)

    def _pos_conv(
        self, x: torch.Tensor, positions: torch.Tensor | None, conv_length: int | None
    ) -> torch.Tensor:
        """The positional convolution's output (B, S, C), compacted or scattered."""
        if conv_length is None:
            return self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if positions is None:
            raise ValueError("conv_length needs positions")
        batch, _, dim = x.shape
        index = positions.unsqueeze(-1).expand(-1, -1, dim)
        # One spare position at the end takes padded rows placed there; adding (not
        # writing) makes rows that share a position harmless, since padded rows are zero.
        full = x.new_zeros(batch, conv_length + 1, dim).scatter_add(1, index, x)
        out = self.pos_conv(full.transpose(1, 2)).transpose(1, 2)
        return out.gather(1, index)


def init_weights(encoder: nn.Module, cfg: BEATsConfig) -> None:
    """The original's initialisation: BERT-style normal(0.02), then deep-norm gains."""
    for module in encoder.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if cfg.deep_norm and cfg.encoder_layers > 0:
        beta = math.pow(8.0 * cfg.encoder_layers, -0.25)
        for layer in encoder.layers:
            attn = layer.self_attn
            for lin, gain in ((layer.fc1, beta), (layer.fc2, beta), (attn.v_proj, beta),
                              (attn.out_proj, beta), (attn.q_proj, 1.0), (attn.k_proj, 1.0)):
                weight = lin.linear.weight if isinstance(lin, GLULinear) else lin.weight
                nn.init.xavier_normal_(weight, gain=gain)
