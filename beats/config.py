"""`BEATsConfig`: every key of the Microsoft ``cfg`` dict, typed, with validation."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

PREDICTOR_ACTIVATIONS = ("sigmoid", "softmax")
ACTIVATIONS = ("relu", "gelu", "gelu_fast", "gelu_accurate", "tanh", "linear", "glu")
_INT_KEYS = (
    "input_patch_size", "embed_dim", "encoder_layers", "encoder_embed_dim",
    "encoder_ffn_embed_dim", "encoder_attention_heads", "conv_pos", "conv_pos_groups",
    "num_buckets", "max_distance", "predictor_class", "quant_n", "quant_dim",
    "quant_noise_block_size",
)
_FLOAT_KEYS = (
    "layer_wise_gradient_decay_ratio", "dropout", "attention_dropout", "activation_dropout",
    "encoder_layerdrop", "dropout_input", "predictor_dropout", "quant_noise",
)
_BOOL_KEYS = (
    "conv_bias", "layer_norm_first", "deep_norm", "relative_position_embedding",
    "gru_rel_pos", "finetuned_model",
)


@dataclass
class BEATsConfig:
    """Architecture and training hyper-parameters of a BEATs model.

    Field names and defaults follow the Microsoft ``BEATsConfig`` so that a checkpoint's
    ``cfg`` dict maps onto it one to one. One default differs: ``input_patch_size`` is 16
    (Microsoft's placeholder -1 is not a usable value; every released model uses 16).
    ``quant_n`` and ``quant_dim`` are the acoustic tokenizer's codebook size and width;
    encoder checkpoints leave them at their defaults.
    """

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False
    predictor_dropout: float = 0.1
    predictor_class: int = 527
    # How `probs` and `predict_labels` turn logits into probabilities. Not a Microsoft key:
    # its released fine-tuned models are multi-label ("sigmoid"); a single-label fine-tune
    # trained with cross-entropy says "softmax". The logits are the same either way.
    predictor_activation: str = "sigmoid"
    quant_n: int = 1024
    quant_dim: int = 256
    # Quantisation noise (Fan et al. 2020) on the attention projections, training only.
    # Not a Microsoft key (the released models were trained without it); kept at 0 there.
    quant_noise: float = 0.0
    quant_noise_block_size: int = 8
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, warn_unknown: bool = True) -> BEATsConfig:
        """Build a config from a checkpoint's ``cfg`` dict.

        Unknown keys (re-trainings add their own) are kept in ``extra`` and named in one
        warning; they never change the computation.
        """
        if not isinstance(cfg, dict):
            raise TypeError(f"cfg must be a dict, got {type(cfg).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in cfg.items() if k in names}
        unknown = {k: v for k, v in cfg.items() if k not in names}
        if unknown and warn_unknown:
            warnings.warn(
                f"BEATsConfig: ignoring unknown cfg keys {sorted(unknown)}",
                UserWarning,
                stacklevel=2,
            )
        return cls(**known, extra=unknown)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (unknown keys from ``from_dict`` included)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first key with an impossible value."""
        for key in _INT_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"BEATsConfig.{key} must be an int, got {value!r}")
        for key in _FLOAT_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"BEATsConfig.{key} must be a float, got {value!r}")
            setattr(self, key, float(value))
        for key in _BOOL_KEYS:
            value = getattr(self, key)
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise ValueError(f"BEATsConfig.{key} must be a bool, got {value!r}")
            setattr(self, key, bool(value))  # old configs store flags as 0/1

        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ValueError(f"BEATsConfig.{key}={getattr(self, key)!r}: {what}")

        need(self.input_patch_size == 16, "input_patch_size",
             "only 16 is supported (the filterbank has 128 mel bins = 8 patches of 16)")
        for key in ("embed_dim", "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
                    "encoder_attention_heads", "conv_pos", "conv_pos_groups", "predictor_class",
                    "quant_n", "quant_dim", "quant_noise_block_size"):
            need(getattr(self, key) > 0, key, "must be positive")
        need(self.encoder_embed_dim % self.encoder_attention_heads == 0, "encoder_embed_dim",
             f"must be divisible by encoder_attention_heads={self.encoder_attention_heads}")
        need(self.encoder_embed_dim % self.conv_pos_groups == 0, "encoder_embed_dim",
             f"must be divisible by conv_pos_groups={self.conv_pos_groups}")
        need(self.activation_fn in ACTIVATIONS, "activation_fn", f"must be one of {ACTIVATIONS}")
        need(self.predictor_activation in PREDICTOR_ACTIVATIONS, "predictor_activation",
             f"must be one of {PREDICTOR_ACTIVATIONS}")
        for key in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
                    "dropout_input", "predictor_dropout"):
            need(0.0 <= getattr(self, key) <= 1.0, key, "must lie in [0, 1]")
        need(0.0 <= self.quant_noise < 1.0, "quant_noise", "must lie in [0, 1)")
        need(self.layer_wise_gradient_decay_ratio > 0, "layer_wise_gradient_decay_ratio",
             "must be positive")
        need(not (self.deep_norm and self.layer_norm_first), "deep_norm",
             "deep norm is defined for post-norm layers only (layer_norm_first=False)")
        if self.relative_position_embedding:
            need(self.num_buckets >= 4, "num_buckets", "must be at least 4")
            need(self.max_distance > self.num_buckets // 4, "max_distance",
                 f"must exceed num_buckets // 4 = {self.num_buckets // 4}")
        if self.gru_rel_pos:
            need(self.relative_position_embedding, "gru_rel_pos",
                 "the GRU gate needs relative_position_embedding=True")
        if self.quant_noise > 0:
            need(self.encoder_embed_dim % self.quant_noise_block_size == 0,
                 "quant_noise_block_size", "must divide encoder_embed_dim")

    @property
    def head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_attention_heads
