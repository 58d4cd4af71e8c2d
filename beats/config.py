"""`BEATsConfig`: every key of the Microsoft ``cfg`` dict, typed, with validation.

Sizes are checked against generous bounds (`MAX_SIZES`) and, before any tensor is
allocated, the parameter memory of a model is compared with the memory available
(`check_memory`): an absurd config fails at once with the key to change, never after
minutes of allocation or with an allocator traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

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
    "encoder_layerdrop", "dropout_input", "predictor_dropout", "quant_noise", "fbank_mean",
    "fbank_std",
)
# Upper bounds of the sizes: far above every published BEATs (base 12 x 768, large and
# OpenBEATs 24 x 1024 with FFN 4096) to leave room for research models, yet low enough
# that a typo (a width of 10**9) fails at once. Memory is checked separately.
MAX_SIZES = {
    "embed_dim": 65536, "encoder_layers": 1024, "encoder_embed_dim": 65536,
    "encoder_ffn_embed_dim": 262144, "encoder_attention_heads": 1024, "conv_pos": 4096,
    "conv_pos_groups": 65536, "num_buckets": 65536, "max_distance": 10**7,
    "predictor_class": 10**6, "quant_n": 2**20, "quant_dim": 65536,
    "quant_noise_block_size": 65536,
}
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
    encoder checkpoints leave them at their defaults. See docs/design/architecture.md.

    Attributes:
        input_patch_size: filterbank patch side, frames and mel bins (16).
        embed_dim: E, the patch embedding's width.
        conv_bias: whether the patch convolution has a bias.
        encoder_layers: L, Transformer layers.
        encoder_embed_dim: C, the encoder's width.
        encoder_ffn_embed_dim: the feed-forward layers' inner width.
        encoder_attention_heads: H, attention heads (C must divide by H).
        activation_fn: the feed-forward activation: ``gelu``, ``gelu_accurate``, ``relu``,
            ``tanh``, ``linear`` or ``glu``.
        layer_wise_gradient_decay_ratio: gradient scale between layers in training (1: off).
        layer_norm_first: pre-norm layers (True) or post-norm layers (False).
        deep_norm: post-norm residuals scaled by (2 L) ** 0.25.
        dropout, attention_dropout, activation_dropout, dropout_input: dropout
            probabilities in training (residual branches, attention weights, inside the
            feed-forward layer, after the patch embedding).
        encoder_layerdrop: probability of skipping a layer in training.
        conv_pos, conv_pos_groups: kernel size and groups of the positional convolution.
        relative_position_embedding: add the relative position bias to attention scores.
        num_buckets, max_distance: relative position buckets, and the offset beyond which
            all share the last bucket.
        gru_rel_pos: scale the position bias by the query-dependent gate.
        finetuned_model: the model has a class head (``predictor``).
        predictor_dropout: dropout before the class head in training.
        predictor_class: classes of the class head.
        predictor_activation: how ``probs`` come from the logits: ``sigmoid`` (multi-label,
            the released models) or ``softmax`` (single-label fine-tunes).
        quant_n, quant_dim: a tokenizer's codebook size and code width.
        quant_noise, quant_noise_block_size: quantisation noise on the attention
            projections in training, and its block size (0: off).
        fbank_mean, fbank_std: the filterbank normalisation (x - mean) / (2 std).
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
    # Filterbank normalisation (x - fbank_mean) / (2 * fbank_std). Not Microsoft keys (the
    # defaults are its constants); OpenBEATs/ESPnet re-trainings may store their own.
    fbank_mean: float = 15.41663
    fbank_std: float = 6.55582
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
                raise InputError(f"BEATsConfig.{key} must be an int, got {value!r}")
        for key in _FLOAT_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"BEATsConfig.{key} must be a float, got {value!r}")
            setattr(self, key, float(value))
        for key in _BOOL_KEYS:
            value = getattr(self, key)
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise InputError(f"BEATsConfig.{key} must be a bool, got {value!r}")
            setattr(self, key, bool(value))  # old configs store flags as 0/1

        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise InputError(f"BEATsConfig.{key}={getattr(self, key)!r}: {what}")

        need(self.input_patch_size == 16, "input_patch_size",
             "only 16 is supported (the filterbank has 128 mel bins = 8 patches of 16)")
        # 0 layers is a real model: the front end and positional convolution only (the
        # random-projection tokenizer of pre-training iteration 1 is one).
        need(self.encoder_layers >= 0, "encoder_layers", "must be 0 or more")
        for key in ("embed_dim", "encoder_embed_dim", "encoder_ffn_embed_dim",
                    "encoder_attention_heads", "conv_pos", "conv_pos_groups", "predictor_class",
                    "quant_n", "quant_dim", "quant_noise_block_size"):
            need(getattr(self, key) > 0, key, "must be positive")
        for key, bound in MAX_SIZES.items():
            need(getattr(self, key) <= bound, key,
                 f"is beyond the supported maximum {bound} (larger than any BEATs model by "
                 "far): check the config")
        need(math.isfinite(self.fbank_mean), "fbank_mean", "must be a finite number")
        need(math.isfinite(self.fbank_std) and self.fbank_std > 0, "fbank_std",
             "must be a positive finite number")
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

    def parameter_counts(self, *, tokenizer: bool = False) -> dict[str, int]:
        """Elements of the model's state dict (parameters and buffers), by part.

        Parts: ``front`` (patch embedding, LayerNorm, projection), ``pos_conv``,
        ``layers`` (all of them, the shared position table included), ``final_norm``,
        ``predictor`` (fine-tuned models) and ``quantizer`` (``tokenizer=True``).
        """
        emb, dim, ffn = self.embed_dim, self.encoder_embed_dim, self.encoder_ffn_embed_dim
        front = emb * 256 + (emb if self.conv_bias else 0) + 2 * emb
        if emb != dim:
            front += emb * dim + dim
        k = self.conv_pos
        pos_conv = dim * (dim // self.conv_pos_groups) * k + k + dim
        per_layer = 4 * (dim * dim + dim) + 4 * dim + ffn * dim + dim
        per_layer += dim * 2 * ffn + 2 * ffn if self.activation_fn == "glu" else dim * ffn + ffn
        if self.gru_rel_pos:
            per_layer += self.head_dim * 8 + 8 + self.encoder_attention_heads
        layers = self.encoder_layers * per_layer
        if self.relative_position_embedding and self.encoder_layers > 0:
            layers += self.num_buckets * self.encoder_attention_heads
        counts = {"front": front, "pos_conv": pos_conv, "layers": layers, "final_norm": 2 * dim}
        if self.finetuned_model:
            counts["predictor"] = dim * self.predictor_class + self.predictor_class
        if tokenizer:
            n, q = self.quant_n, self.quant_dim
            counts["quantizer"] = dim * dim + dim + dim * q + q + 2 * n * q + 2 * n + 1
        return counts


def available_memory() -> int | None:
    """Bytes of memory this process can still get: ``MemAvailable`` of /proc/meminfo, or
    the free physical pages where that file does not exist, lowered to the room left under
    a cgroup v2 memory limit when there is one. None when nothing can be read."""
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        text = Path("/proc/meminfo").read_text(encoding="ascii")
        found += [int(line.split()[1]) * 1024 for line in text.splitlines()
                  if line.startswith("MemAvailable:")]
    if not found:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii").strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text(encoding="ascii"))
        if limit != "max":
            found.append(max(0, int(limit) - used))
    return min(found) if found else None


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if num_bytes < 1000 or unit == "PB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1000
    raise AssertionError


def _count(n: float) -> str:
    for unit in ("", " k", " M", " G", " T"):
        if n < 1000 or unit == " T":
            return f"{n:.3g}{unit}"
        n /= 1000
    raise AssertionError


def check_memory(
    cfg: BEATsConfig, *, tokenizer: bool = False, bytes_per_element: int = 4,
    available: int | None = None,
) -> None:
    """Refuse, before allocating, a model whose tensors alone exceed the available memory.

    The rule: the state dict's elements (`BEATsConfig.parameter_counts`) times
    ``bytes_per_element`` (4 for float32) must not exceed `available_memory` (or
    ``available``). Activations and a checkpoint being loaded need more on top, so passing
    this check does not promise the model runs; failing it means it never could. The
    message names the part that dominates and its config keys.
    """
    available = available_memory() if available is None else available
    if available is None:
        return
    counts = cfg.parameter_counts(tokenizer=tokenizer)
    total = sum(counts.values())
    need = total * bytes_per_element
    if need <= available:
        return
    part = max(counts, key=lambda name: counts[name])
    keys = {
        "front": f"embed_dim={cfg.embed_dim}, encoder_embed_dim={cfg.encoder_embed_dim}",
        "pos_conv": f"conv_pos={cfg.conv_pos}, encoder_embed_dim={cfg.encoder_embed_dim}, "
                    f"conv_pos_groups={cfg.conv_pos_groups}",
        "layers": f"encoder_layers={cfg.encoder_layers} layers of "
                  f"{_count(counts['layers'] / max(cfg.encoder_layers, 1))} parameters: "
                  f"encoder_embed_dim={cfg.encoder_embed_dim}, "
                  f"encoder_ffn_embed_dim={cfg.encoder_ffn_embed_dim}",
        "final_norm": f"encoder_embed_dim={cfg.encoder_embed_dim}",
        "predictor": f"predictor_class={cfg.predictor_class}, "
                     f"encoder_embed_dim={cfg.encoder_embed_dim}",
        "quantizer": f"quant_n={cfg.quant_n}, quant_dim={cfg.quant_dim}",
    }[part]
    raise InputError(
        f"BEATsConfig describes a model of {_count(total)} parameters, {_size(need)} at "
        f"{bytes_per_element} bytes each, and only {_size(available)} of memory is available; "
        f"most of it comes from {keys}. Check these values"
    )
