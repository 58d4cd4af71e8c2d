"""Classifiers on a BEATs backbone: layer choice, pooling, heads, freezing, LR decay.

A `Head` maps a sequence of embeddings (B, S, C) with a padding mask to logits; it works
the same on encoder outputs and on embeddings cached by ``beats extract``. A
`BEATsClassifier` puts a head on a backbone and owns the training conventions:

- a frozen backbone stays in eval mode while the classifier trains, runs without
  building an autograd graph, and its parameters never reach an optimizer;
- ``unfreeze_top(k)`` makes the top k layers trainable (they then follow the
  classifier's train/eval mode; the rest stays frozen and in eval);
- ``parameter_groups(lr, decay)`` gives layer-wise learning-rate decay.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .inputs import ArrayLike
from .model import BEATs

POOLINGS = ("mean", "max", "attentive")


class AttentivePooling(nn.Module):
    """A learned query attends over positions: (B, S, C), mask (B, S) -> (B, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim))
        self.key = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        scores = self.key(x) @ self.query / math.sqrt(x.shape[-1])  # (B, S)
        weights = scores.masked_fill(padding_mask, float("-inf")).softmax(dim=-1)
        return (weights.unsqueeze(-1) * x).sum(dim=1)


def masked_mean(x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions: (B, S, C) -> (B, C)."""
    keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def masked_max(x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Max over valid positions: (B, S, C) -> (B, C)."""
    return x.masked_fill(padding_mask.unsqueeze(-1), float("-inf")).amax(dim=1)


class Head(nn.Module):
    """Pooling over positions then dropout and a linear layer: (B, S, C) -> (B, classes).

    Args:
        dim: embedding width C.
        num_classes: outputs.
        pooling: ``mean``, ``max`` or ``attentive`` (a learned query); all ignore padding.
        dropout: before the linear layer.
    """

    def __init__(self, dim: int, num_classes: int, *, pooling: str = "mean",
                 dropout: float = 0.0) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise InputError(f"pooling {pooling!r}: choose one of {POOLINGS}")
        if num_classes < 1:
            raise InputError(f"num_classes must be >= 1, got {num_classes}")
        self.pooling = pooling
        self.attention = AttentivePooling(dim) if pooling == "attentive" else None
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2:  # (B, C): one pooled embedding per clip
            x = x.unsqueeze(1)
        if padding_mask is None:
            padding_mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        if self.attention is not None:
            pooled = self.attention(x, padding_mask)
        elif self.pooling == "max":
            pooled = masked_max(x, padding_mask)
        else:
            pooled = masked_mean(x, padding_mask)
        return self.linear(self.dropout(pooled))


class LayerWeights(nn.Module):
    """Learnable softmax-weighted sum of L + 1 hidden states (SUPERB style)."""

    def __init__(self, num_states: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_states))

    def forward(self, states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        weights = self.logits.softmax(dim=0)
        return sum(w * h for w, h in zip(weights, states, strict=True))


def classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, multilabel: bool
) -> torch.Tensor:
    """Cross-entropy (targets: class indices (B,)) or BCE (targets: 0/1 (B, classes))."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets)


class BEATsClassifier(nn.Module):
    """A backbone and a head.

    Args:
        backbone: a `BEATs` model (frozen on construction unless ``freeze=False``).
        num_classes: outputs of the head.
        layer: ``"last"`` (the model's features), a hidden-state index k (0..L; layers
            above k are never run), or ``"weighted"`` (all hidden states, learned weights).
        pooling: ``mean``, ``max`` or ``attentive``.
        multilabel: sigmoid + BCE instead of softmax + cross-entropy.
        freeze: freeze the whole backbone.
    """

    def __init__(self, backbone: BEATs, num_classes: int, *, layer: str | int = "last",
                 pooling: str = "mean", multilabel: bool = False, dropout: float = 0.0,
                 freeze: bool = True) -> None:
        super().__init__()
        num_layers = backbone.cfg.encoder_layers
        if isinstance(layer, int) and not 0 <= layer <= num_layers:
            raise InputError(f"layer {layer} does not exist: use 0..{num_layers}")
        if isinstance(layer, str) and layer not in ("last", "weighted"):
            raise InputError(f"layer {layer!r}: use 'last', 'weighted' or a layer number")
        self.backbone = backbone
        self.layer = layer
        self.multilabel = multilabel
        self.layer_weights = LayerWeights(num_layers + 1) if layer == "weighted" else None
        self.head = Head(backbone.cfg.encoder_embed_dim, num_classes, pooling=pooling,
                         dropout=dropout)
        if freeze:
            backbone.requires_grad_(False)
        self.train(self.training)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> BEATsClassifier:
        """Head in ``mode``; encoder layers with trainable weights too (their dropout
        acts); everything frozen stays in eval."""
        super().train(mode)
        self.backbone.eval()
        if mode:
            for layer in self.backbone.encoder.layers:
                if any(p.requires_grad for p in layer.parameters()):
                    layer.train()
        return self

    @property
    def backbone_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    def unfreeze_top(self, k: int) -> BEATsClassifier:
        """Make the top ``k`` encoder layers trainable (and the final LayerNorm of pre-norm
        models); everything below stays frozen."""
        layers = self.backbone.encoder.layers
        if not 0 <= k <= len(layers):
            raise InputError(f"k={k}: the backbone has {len(layers)} layers")
        self.backbone.requires_grad_(False)
        for layer in list(layers)[len(layers) - k:]:
            layer.requires_grad_(True)  # layer 0 also holds the shared position table
        if k > 0 and self.backbone.cfg.layer_norm_first:
            self.backbone.encoder.layer_norm.requires_grad_(True)
        return self.train(self.training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, lr: float, decay: float = 1.0,
                         weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups with layer-wise learning-rate decay.

        The head (and layer weights) get ``lr``, encoder layer L-1-i gets ``lr * decay**(i+1)``,
        the patch embedding and positional convolution ``lr * decay**(L+1)``. Frozen
        parameters are left out, so an optimizer never holds state for them.
        """
        layers = list(self.backbone.encoder.layers)
        depth = len(layers)
        groups: dict[int, list[nn.Parameter]] = {}
        layer_of = {}
        for i, layer in enumerate(layers):
            for p in layer.parameters():
                layer_of.setdefault(id(p), i)
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if not name.startswith("backbone."):
                level = 0
            elif id(p) in layer_of:
                level = depth - layer_of[id(p)]
            elif name.startswith("backbone.encoder.layer_norm"):
                level = 1 if self.backbone.cfg.layer_norm_first else depth + 1
            else:
                level = depth + 1
            groups.setdefault(level, []).append(p)
        return [{"params": ps, "lr": lr * decay**level, "weight_decay": weight_decay}
                for level, ps in sorted(groups.items())]

    # ------------------------------------------------------------------ computation
    def embed(self, wav: ArrayLike, padding_mask: ArrayLike | None = None, *,
              lengths: ArrayLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone embeddings for the head: (B, S, C) and the padding mask (B, S)."""
        grad = torch.is_grad_enabled() and not self.backbone_frozen
        with torch.set_grad_enabled(grad):
            if self.layer == "last":
                out = self.backbone.extract_features(wav, padding_mask, lengths=lengths)
                x = out.features
            elif self.layer == "weighted":
                out = self.backbone.extract_features(wav, padding_mask, lengths=lengths,
                                                     output_hidden_states=True)
                states = out.hidden_states
            else:
                out = self.backbone.extract_features(wav, padding_mask, lengths=lengths,
                                                     output_layer=int(self.layer))
                x = out.features
        if self.layer == "weighted":
            x = self.layer_weights(states)
        return x, out.padding_mask

    def forward(self, wav: ArrayLike, padding_mask: ArrayLike | None = None, *,
                lengths: ArrayLike | None = None) -> torch.Tensor:
        """Logits (B, classes) for 16 kHz audio (any form `BEATs.extract_features` takes)."""
        x, mask = self.embed(wav, padding_mask, lengths=lengths)
        return self.head(x, mask)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return classification_loss(logits, targets, self.multilabel)

    @torch.inference_mode()
    def predict_proba(self, wav: ArrayLike, padding_mask: ArrayLike | None = None, *,
                      lengths: ArrayLike | None = None) -> torch.Tensor:
        """Class probabilities (B, classes): softmax, or sigmoid for multi-label."""
        logits = self.forward(wav, padding_mask, lengths=lengths)
        return torch.sigmoid(logits) if self.multilabel else logits.softmax(dim=-1)
