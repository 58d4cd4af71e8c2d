"""The self-supervised BEATs model: masked acoustic-token prediction (see
docs/design/training.md, Masked pre-training).

`BEATsForPretraining` holds a `BEATs` encoder (``backbone``, exported alone as an
ordinary BEATs checkpoint) and a label predictor. A step, for a batch whose masks and
labels were drawn beforehand:

1. patch embedding, LayerNorm and projection of every patch; the kept patches (those
   neither masked nor padding) are gathered in their original order;
2. the encoder runs on the kept patches only (the MAE speed-up), with relative positions
   from their true places in the clip or, as ESPnet does, from the compacted sequence
   (`SSLConfig.positions`);
3. the predictor: encoder outputs scattered back to the full length, the mask vector at
   masked patches, Linear C -> C, a `TransformerStack` with its own relative position
   bias over the full length, LayerNorm, Linear C -> K;
4. cross-entropy on masked valid patches (optional label smoothing), summed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BEATsConfig
from ..errors import InputError
from ..model import BEATs
from ..model_output import check_fbank
from ..options import OptionError, check, option
from .blocks import TransformerStack
from .masking import kept_patches

# The released architecture (docs/design/architecture.md, Checkpoint format) with
# pre-training's dropouts [ESPnet].
_BASE = dict(
    input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12,
    encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
    activation_fn="gelu", layer_wise_gradient_decay_ratio=1.0, layer_norm_first=False,
    deep_norm=True, dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
    encoder_layerdrop=0.0, dropout_input=0.0, conv_pos=128, conv_pos_groups=16,
    relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
    finetuned_model=False,
)
PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to learn visibly on a laptop CPU in minutes; same layer type.
    "tiny": dict(model=dict(_BASE, embed_dim=256, encoder_layers=4, encoder_embed_dim=128,
                            encoder_ffn_embed_dim=512, encoder_attention_heads=4,
                            dropout=0.0, attention_dropout=0.0),
                 predictor_layers=2),
    "base": dict(model=dict(_BASE)),
    # The width and depth of open large re-trainings (OpenBEATs).
    "large": dict(model=dict(_BASE, encoder_layers=24, encoder_embed_dim=1024,
                             encoder_ffn_embed_dim=4096, encoder_attention_heads=16)),
}
POSITIONS = ("true", "scattered", "compacted")
MASK_VECTORS = ("learned", "zeros")


@dataclass
class SSLConfig:
    """What `BEATsForPretraining` is: the encoder's `BEATsConfig` and the SSL settings
    (``[paper]``: the BEATs paper's choice, ``[ESPnet]``: ESPnet's re-implementation's)."""

    model: BEATsConfig = option(
        help="the encoder (exported as is; finetuned_model must be False)",
        factory=lambda: BEATsConfig.from_dict(_BASE), cli=False)
    num_labels: int = option(1024, help="K, the label source's vocabulary (a tokenizer's "
                             "quant_n)", ge=1, cli=False)
    mask_ratio: float = option(0.75, help="share of each clip's valid patches masked "
                               "[paper: 0.75]", ge=0, lt=1, cli=False)
    predictor_layers: int = option(3, help="Transformer layers of the label predictor "
                                   "[ESPnet: 3]", ge=1, cli=False)
    mask_vector: str = option(
        "learned", help="what masked patches enter the predictor as: learned (one vector, "
        "N(0, 0.02) init) [ESPnet] or zeros [paper]", choices=MASK_VECTORS, cli=False)
    label_smoothing: float = option(0.1, help="of the cross-entropy [ESPnet: 0.1; paper: "
                                    "none]", ge=0, lt=1, cli=False)
    positions: str = option(
        "true", help="what the encoder knows of where kept patches are. true: relative "
        "position buckets from their offsets in the full clip, positional convolution over "
        "the compacted sequence. scattered: true buckets, and the convolution over the full "
        "length with masked patches zero. compacted [ESPnet]: both over the compacted "
        "sequence, as if the kept patches were adjacent", choices=POSITIONS, cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = BEATsConfig.from_dict(self.model)
        self.validate()

    def validate(self) -> None:
        """Raise `beats.options.OptionError` naming the first key with an impossible
        value (as ``SSLConfig.key``)."""
        if self.model.finetuned_model:
            raise InputError("SSLConfig.model: finetuned_model must be False (no class head)")
        try:
            check(self)
        except OptionError as e:
            raise OptionError("SSLConfig." + e.template, *e.names) from None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SSLConfig:
        """A named size (``tiny``, ``base``, ``large``); ``overrides`` as in `from_dict`."""
        if name not in PRESETS:
            raise InputError(f"unknown SSL preset {name!r}: choose one of {sorted(PRESETS)}")
        return cls.from_dict({"preset": name, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SSLConfig:
        """The keys to change from a preset: ``{"preset": NAME, ...}`` (default ``base``),
        ``model`` holding the encoder's `BEATsConfig` keys to change. `to_dict`'s output
        (every key) reads back as it was written."""
        if not isinstance(data, dict):
            raise InputError(f"an SSL config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        name = data.pop("preset", "base")
        if name not in PRESETS:
            raise InputError(f"unknown SSL preset {name!r}: choose one of {sorted(PRESETS)}")
        model = data.pop("model", {})
        if not isinstance(model, dict):
            raise InputError("SSL config key 'model' must be an object of BEATsConfig keys")
        base = PRESETS[name]
        data = {**{k: v for k, v in base.items() if k != "model"}, **data}
        names = {f.name for f in dataclasses.fields(cls)} - {"model"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown SSL config keys {unknown}; known: {sorted(names)}")
        return cls(model=BEATsConfig.from_dict({**base["model"], **model}), **data)

    @classmethod
    def from_json(cls, path: str | Path) -> SSLConfig:
        """Read a JSON file holding what `from_dict` takes."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read SSL config {path}: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model"] = self.model.to_dict()
        return out


@dataclass
class SSLOutput:
    """What `BEATsForPretraining.forward` returns.

    Attributes:
        logits: (B, S, K) the predictor's scores at every position (padding included).
        loss_sum: () float32 summed cross-entropy over masked valid patches (0 without
            labels). `loss` divides it by the global count of loss terms.
        count: () int64 masked valid patches of this batch (the loss terms).
        metrics: summed tensors, to add over micro-batches and ranks before
            `summarize_metrics`: ``masked_correct``, ``masked_count``,
            ``unmasked_correct``, ``unmasked_count`` (kept valid patches) and
            ``label_counts`` (K,) how often each label occurs at valid patches.
    """

    logits: torch.Tensor
    loss_sum: torch.Tensor
    count: torch.Tensor
    metrics: dict[str, torch.Tensor]

    def loss(self, denominator: float | torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: ``loss_sum / denominator``."""
        return self.loss_sum / denominator


def summarize_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Summed metric tensors -> ``masked_accuracy``, ``unmasked_accuracy``,
    ``labels_used`` (distinct labels among the valid patches)."""
    def ratio(correct: str, count: str) -> float:
        n = float(sums[count])
        return float(sums[correct]) / n if n else float("nan")

    return {
        "masked_accuracy": ratio("masked_correct", "masked_count"),
        "unmasked_accuracy": ratio("unmasked_correct", "unmasked_count"),
        "labels_used": int((sums["label_counts"] > 0).sum()),
    }


@dataclass
class KeptEncoding:
    """The encoder's output on kept patches: x (B, S', C), index (B, S') their positions
    (S at padded rows), kept_padding (B, S'), padding (B, S) of the full sequence."""

    x: torch.Tensor
    index: torch.Tensor
    kept_padding: torch.Tensor
    padding: torch.Tensor


class BEATsForPretraining(nn.Module):
    """A BEATs encoder and a label predictor for masked acoustic-token prediction."""

    def __init__(self, cfg: SSLConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else SSLConfig()
        cfg.validate()
        self.cfg = cfg
        self.backbone = BEATs(cfg.model)
        dim = cfg.model.encoder_embed_dim
        if cfg.mask_vector == "learned":
            self.mask_embedding: nn.Parameter | None = nn.Parameter(
                torch.empty(dim).normal_(0.0, 0.02))
        else:
            self.mask_embedding = None
        self.predictor_proj = nn.Linear(dim, dim)
        self.predictor = TransformerStack(cfg.model, cfg.predictor_layers)
        self.predictor_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, cfg.num_labels)
        for linear in (self.predictor_proj, self.head):
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)
            nn.init.zeros_(linear.bias)

    def encode(
        self, features: torch.Tensor, frames: torch.Tensor, masked: torch.Tensor
    ) -> KeptEncoding:
        """Run the encoder on the kept patches only.

        Args:
            features: (B, T, 128) normalised filterbank (`beats.fbank.fbank`).
            frames: (B,) int64 valid frames per clip.
            masked: (B, S) bool, True at masked patches, S = 8 * (T // 16).
        """
        check_fbank(features, frames)
        x = self.backbone.embed_patches(features)  # (B, S, C): every patch
        if masked.shape != x.shape[:2]:
            raise InputError(f"masked has shape {tuple(masked.shape)}, the filterbank gives "
                             f"{tuple(x.shape[:2])} patches")
        index, kept_padding, padding = kept_patches(masked, frames)
        if index.shape[1] == 0 or bool((index[:, 0] == masked.shape[1]).any()):
            raise InputError("every clip needs at least one kept patch (clips of at least "
                             "0.175 s, mask ratio below 1)")
        length = x.shape[1]
        gathered = x.gather(1, index.clamp(max=length - 1).unsqueeze(-1).expand(
            -1, -1, x.shape[2]))
        positions = None if self.cfg.positions == "compacted" else index
        out, _ = self.backbone.encoder(
            gathered, kept_padding if bool(kept_padding.any()) else None,
            positions=positions,
            conv_length=length if self.cfg.positions == "scattered" else None,
        )
        return KeptEncoding(out, index, kept_padding, padding)

    def predict(self, enc: KeptEncoding) -> torch.Tensor:
        """The label predictor: kept encodings -> logits (B, S, K) over the full length."""
        x = enc.x
        batch, _, dim = x.shape
        length = enc.padding.shape[1]
        if self.mask_embedding is not None:
            full = self.mask_embedding.to(x.dtype).expand(batch, length + 1, dim)
        else:
            full = x.new_zeros(batch, length + 1, dim)
        # Padded kept rows land in the spare slot `length`, dropped right after.
        full = full.scatter(1, enc.index.unsqueeze(-1).expand(-1, -1, dim), x)[:, :length]
        padding = enc.padding if bool(enc.padding.any()) else None
        if padding is not None:
            full = full.masked_fill(padding.unsqueeze(-1), 0.0)
        y = self.predictor(self.predictor_proj(full), padding)
        return self.head(self.predictor_norm(y))

    def forward(
        self,
        features: torch.Tensor,
        frames: torch.Tensor,
        masked: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> SSLOutput:
        """One forward pass of masked label prediction.

        Args:
            features: (B, T, 128) normalised filterbank; frames (B,) valid frames.
            masked: (B, S) bool, True at masked patches (never at padding).
            labels: (B, S) int64 in [0, K), -1 at padding (`BEATsTokenizer.
                labels_from_fbank`, or read from ``beats tokenize`` outputs); None gives
                logits only (loss and metrics zero).
        """
        enc = self.encode(features, frames, masked)
        logits = self.predict(enc)
        valid = ~enc.padding
        target = masked & valid
        kept = valid & ~masked
        num_labels = self.cfg.num_labels
        zero = logits.new_zeros((), dtype=torch.float32)
        if labels is None:
            metrics = {name: target.new_zeros((), dtype=torch.long) for name in
                       ("masked_correct", "masked_count", "unmasked_correct", "unmasked_count")}
            metrics["label_counts"] = target.new_zeros(num_labels, dtype=torch.long)
            return SSLOutput(logits, zero, target.sum(), metrics)
        if labels.shape != masked.shape:
            raise InputError(f"labels have shape {tuple(labels.shape)}, expected "
                             f"{tuple(masked.shape)} (one per patch)")
        wanted = labels[valid]
        if bool(((wanted < 0) | (wanted >= num_labels)).any()):
            raise InputError(f"labels at valid patches must lie in [0, {num_labels}) "
                             "(the label source does not match num_labels, or its padding "
                             "does not match the audio)")
        loss_sum = F.cross_entropy(
            logits[target].float(), labels[target], reduction="sum",
            label_smoothing=self.cfg.label_smoothing,
        ) if bool(target.any()) else zero + 0.0 * logits.sum()
        with torch.no_grad():
            hit = (logits.argmax(dim=-1) == labels) & valid
            metrics = {
                "masked_correct": (hit & target).sum(),
                "masked_count": target.sum(),
                "unmasked_correct": (hit & kept).sum(),
                "unmasked_count": kept.sum(),
                "label_counts": torch.bincount(wanted, minlength=num_labels),
            }
        return SSLOutput(logits, loss_sum, target.sum(), metrics)

    def export(self, out_dir: str | Path) -> Path:
        """Write the encoder alone as an ordinary BEATs checkpoint (`BEATs.save_pretrained`:
        no predictor), which `BEATs.from_pretrained` loads."""
        return self.backbone.save_pretrained(out_dir)

    def num_parameters(self, *, encoder_only: bool = False) -> int:
        module = self.backbone if encoder_only else self
        return sum(p.numel() for p in module.parameters())
