"""`BEATsTokenizer`: BEATs' acoustic tokenizer, audio -> discrete tokens.

See docs/design/architecture.md, Acoustic tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .config import BEATsConfig
from .errors import InputError
from .inputs import ArrayLike
from .model import BEATs
from .model_output import check_fbank
from .quantizer import VectorQuantizer

PAD_TOKEN = -1  # token id at padded positions


@dataclass
class TokenizerOutput:
    """What `BEATsTokenizer.extract_labels` returns; unpacks as ``(labels, padding_mask)``.

    Attributes:
        labels: (B, S) int64 token ids in [0, quant_n), `PAD_TOKEN` (-1) at padding.
        padding_mask: (B, S) bool, True at padded positions.
    """

    labels: torch.Tensor
    padding_mask: torch.Tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.labels, self.padding_mask))


class BEATsTokenizer(BEATs):
    """The acoustic tokenizer: the BEATs front end and encoder, then a quantiser.

    Shares every part of `BEATs` up to the encoder output; then ``quantize_layer``
    (Linear(C, C), tanh, Linear(C, quant_dim)), L2 normalisation and the nearest code of
    ``quantize`` (``quant_n`` codes). Loads Microsoft tokenizer ``.pt`` files.
    """

    is_tokenizer: ClassVar[bool] = True

    def __init__(self, cfg: BEATsConfig | None = None) -> None:
        cfg = cfg if cfg is not None else BEATsConfig()
        if cfg.finetuned_model:
            raise InputError("BEATsConfig.finetuned_model=True: a tokenizer has no class head")
        super().__init__(cfg)
        dim = cfg.encoder_embed_dim
        self.quantize_layer = nn.Sequential(
            nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, cfg.quant_dim)
        )
        self.quantize = VectorQuantizer(cfg.quant_n, cfg.quant_dim)

    def tokens_from_features(
        self, features: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encoder output (B, S, C) -> token ids (B, S), `PAD_TOKEN` where padding_mask."""
        ids = self.quantize.lookup(self.quantize_layer(features))
        if padding_mask is not None:
            ids = ids.masked_fill(padding_mask, PAD_TOKEN)
        return ids

    def extract_labels(
        self,
        wav: ArrayLike,
        padding_mask: ArrayLike | None = None,
        *,
        lengths: ArrayLike | None = None,
    ) -> TokenizerOutput:
        """Token ids of 16 kHz audio, one per patch (8 per 160 ms step, time-major).

        Takes audio like `BEATs.extract_features`; each clip's tokens are the same alone or
        in a padded batch. Runs under ``torch.inference_mode``.
        """
        with torch.inference_mode():
            out = self.extract_features(wav, padding_mask, lengths=lengths)
            labels = self.tokens_from_features(out.features, out.padding_mask)
        return TokenizerOutput(labels=labels, padding_mask=out.padding_mask)

    def labels_from_fbank(self, features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Token ids (B, S) int64 of a filterbank, `PAD_TOKEN` (-1) at padding.

        The label source of pre-training: it reads the same filterbank as the model being
        trained (``features`` (B, T, 128) and ``frames`` (B,) from `beats.fbank.fbank`).
        Always computed as in eval mode, without gradients and outside autocast (in the
        tokenizer's own dtype), whatever the caller's mode: labels do not change with the
        training precision. The module's mode is left as it was.
        """
        check_fbank(features, frames)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
                out = self.forward_fbank(features, frames)
                return self.tokens_from_features(out.features, out.padding_mask)
        finally:
            self.train(was_training)
