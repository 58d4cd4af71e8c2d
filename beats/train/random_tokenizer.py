"""The iteration-1 label source: a frozen random-projection tokenizer (see
docs/design/training.md, Random-projection tokenizer).

A patch's label is the code nearest to a random projection of the patch. It is built as
an ordinary `BEATsTokenizer` (so it saves, loads and runs ``beats tokenize`` like any
tokenizer, and fits Microsoft's own tokenizer layout) whose parts compute exactly that:

- ``patch_embedding``: a frozen Xavier-normal Conv2d 1 -> 512 (16 x 16, no bias): each
  flattened patch x times a random (512, 256) matrix;
- ``layer_norm`` with weight 1 and bias 0 (affine-free), then ``post_extract_proj``: a
  Xavier-normal Linear 512 -> 256 with zero bias (ESPnet's widths, BEST-RQ style);
- the positional convolution with ``weight_g = 0`` adds exactly 0; then
  ``encoder.layer_norm`` affine-free; no Transformer layer (``encoder_layers = 0``);
- ``quantize_layer`` = Linear(s I), tanh, Linear(I / s) with s = 2^-20: every value is
  scaled by a power of two, tanh returns its (tiny) argument unchanged in float32, and
  scaling back is exact, so this is the identity bit for bit;
- the codebook: K rows drawn from N(0, 1), then l2-normalised. The lookup compares
  l2-normalised vectors, so a label is the code of highest cosine with the projection.
  (The paper's argmin ||v_i - W x||^2 leaves normalisation open; ESPnet keeps raw N(0, 1)
  codes. With unit vectors on both sides nearest and most similar are the same code and
  every label is reachable whatever the projection's scale.)

Everything is drawn from one ``torch.Generator`` seeded by ``seed``, never from the global
RNG (which is left untouched), so a seed gives the same tokenizer in any process.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import BEATsConfig
from ..errors import InputError
from ..quantizer import l2norm
from ..tokenizer import BEATsTokenizer

TANH_SCALE = 2.0**-20  # quantize_layer's input scale: tanh is exactly linear below it


def random_tokenizer_config(num_labels: int = 1024, embed_dim: int = 512,
                            dim: int = 256) -> BEATsConfig:
    """The tokenizer's config: front end and widths of ESPnet's iteration-1 tokenizer, no
    Transformer layer, no dropout; unused sizes kept small."""
    return BEATsConfig(
        embed_dim=embed_dim, conv_bias=False, encoder_layers=0, encoder_embed_dim=dim,
        encoder_ffn_embed_dim=4 * dim, encoder_attention_heads=1,
        layer_norm_first=False, deep_norm=False, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.0,
        conv_pos=2, conv_pos_groups=dim, relative_position_embedding=False,
        gru_rel_pos=False, quant_n=num_labels, quant_dim=dim,
    )


@torch.no_grad()
def random_tokenizer(seed: int, *, num_labels: int = 1024, embed_dim: int = 512,
                     dim: int = 256) -> BEATsTokenizer:
    """The frozen random-projection tokenizer of ``seed``, in eval mode, not trainable.

    Args:
        seed: the only source of its randomness (same seed, same tokenizer everywhere).
        num_labels: K, codebook size [paper: 1024].
        embed_dim, dim: width of the random patch projection and of the codes [ESPnet:
            512 and 256].
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}")
    cfg = random_tokenizer_config(num_labels, embed_dim, dim)
    with torch.random.fork_rng(devices=[]):  # building draws init weights: keep them private
        tokenizer = BEATsTokenizer(cfg)
    generator = torch.Generator().manual_seed(seed)

    nn.init.xavier_normal_(tokenizer.patch_embedding.weight, generator=generator)
    assert tokenizer.post_extract_proj is not None
    nn.init.xavier_normal_(tokenizer.post_extract_proj.weight, generator=generator)
    nn.init.zeros_(tokenizer.post_extract_proj.bias)
    codes = l2norm(torch.randn(num_labels, dim, generator=generator))

    for norm in (tokenizer.layer_norm, tokenizer.encoder.layer_norm):
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)
    conv = tokenizer.encoder.pos_conv[0]
    nn.init.ones_(conv.weight_v)  # any nonzero v: the weight g * v / ||v|| is 0 anyway
    nn.init.zeros_(conv.weight_g)
    nn.init.zeros_(conv.bias)

    scale_in, _, scale_out = tokenizer.quantize_layer
    scale_in.weight.copy_(torch.eye(dim) * TANH_SCALE)
    scale_out.weight.copy_(torch.eye(dim) / TANH_SCALE)
    nn.init.zeros_(scale_in.bias)
    nn.init.zeros_(scale_out.bias)

    book = tokenizer.quantize.embedding
    book.weight.copy_(codes)
    book.embed_avg.copy_(codes)
    book.cluster_size.zero_()
    book.initted.fill_(1.0)  # the codebook is set: training it would not re-initialise it
    tokenizer.quantize.cluster_size.zero_()
    return tokenizer.requires_grad_(False).eval()
