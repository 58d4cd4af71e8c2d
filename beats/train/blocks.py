"""Small Transformer stacks that training heads put on top of a BEATs encoder.

The pre-training label predictor and the tokenizer-distillation estimator are a few
layers of the encoder's own layer type (post-/pre-norm, deep norm, GRU-gated relative
positions as configured) with a relative position table of their own, over the full
patch sequence, and no positional convolution (the encoder below already has one).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import BEATsConfig
from ..encoder import EncoderLayer, init_weights


class TransformerStack(nn.Module):
    """``num_layers`` BEATs encoder layers over (B, S, C), sharing one position table.

    Args:
        cfg: the encoder's config; the stack copies its layer type, width, heads, FFN
            width, dropouts and relative-position settings. Deep norm's constants use
            the stack's own depth.
        num_layers: layers in the stack (>= 1).
    """

    def __init__(self, cfg: BEATsConfig, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        cfg = dataclasses.replace(cfg, encoder_layers=num_layers, encoder_layerdrop=0.0,
                                  layer_wise_gradient_decay_ratio=1.0)
        self.cfg = cfg
        relative = cfg.relative_position_embedding
        self.layers = nn.ModuleList(
            EncoderLayer(cfg, has_relative_attention_bias=relative and i == 0)
            for i in range(num_layers)
        )
        init_weights(self, cfg)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, C); padding_mask (B, S) True at padding (or None) -> (B, S, C)."""
        position_bias = None
        if self.cfg.relative_position_embedding:
            position_bias = self.layers[0].self_attn.position_bias(x.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, padding_mask, position_bias)
        return x
