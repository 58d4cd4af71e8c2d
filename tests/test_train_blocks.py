"""TransformerStack: the encoder's layer type, its own position table, padding respected."""

from __future__ import annotations

import math

import torch

from beats.train.blocks import TransformerStack

from .conftest import tiny_config


def test_stack_layers_share_one_table_and_respect_padding():
    torch.manual_seed(0)
    cfg = tiny_config(dropout=0.0, attention_dropout=0.0, encoder_layerdrop=0.0)
    stack = TransformerStack(cfg, 3).eval()
    assert len(stack.layers) == 3
    tables = [n for n, _ in stack.named_parameters() if "relative_attention_bias" in n]
    assert tables == ["layers.0.self_attn.relative_attention_bias.weight"]
    assert stack.layers[0].alpha == math.pow(2.0 * 3, 0.25)  # deep norm of its own depth

    x = torch.randn(2, 24, cfg.encoder_embed_dim)
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[1, 16:] = True
    with torch.no_grad():
        both = stack(x, mask)
        alone = stack(x[1:, :16])
    assert torch.allclose(both[1, :16], alone[0], atol=1e-5)

    stack.train()
    stack(x, mask).pow(2).mean().backward()
    for name, p in stack.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
