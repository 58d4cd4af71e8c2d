"""Tokenizer distillation (training spec section 4): train an acoustic tokenizer from a teacher.

The trained model (`TokenizerDistiller`) is a student `BEATsTokenizer` (encoder over the
full, unmasked patch sequence, ``quantize_layer``, EMA codebook) and an estimator (Linear
quant_dim -> teacher width, 3 Transformer layers, LayerNorm) that predicts the teacher's
target at every valid patch from the quantised codes (straight-through gradients). Loss per
valid patch: ``(1 - cosine(prediction, target)) + beta * mean((code - l2norm(e))^2)``,
summed and divided by the step's global patch count. Only the student is exported: a
tokenizer checkpoint that `BEATsTokenizer.from_pretrained` loads.

Design notes:

- **Teacher target.** An SSL teacher: its last-layer output at each patch (the paper). A
  fine-tuned teacher: its class head applied at every patch *before* pooling, i.e. the
  per-position logits (B, S, classes). Per patch rather than per clip because the tokenizer
  labels patches: a clip target gives one signal per clip and no reason for neighbouring
  patches to get different codes, while the per-position logits carry all the clip's
  information too (BEATs' clip logits are exactly their mean over valid positions, the head
  being linear) plus where in the clip each class is. The loss is the same 1 - cosine, so
  both teachers share one code path and one ``cosine`` metric; with logits the estimator
  works at the teacher's encoder width and ends with a Linear to the class count.
- **EMA timing.** The codebook moves once per optimiser step, in `after_step` (the loop
  calls it after ``optimizer.step()``): the forwards of all micro-batches only record
  per-code counts and sums, and `after_step` sums them over the micro-batches and ranks and
  applies one EMA step. So every micro-batch of a step sees the same codebook, and a step
  of n micro-batches on r ranks updates the codebook exactly as one forward of the whole
  step's batch would (the original updates in every forward, which makes the result depend
  on how the batch is split). A skipped step (fp16 overflow) should call
  `TokenizerDistiller.discard_step`.
- **k-means initialisation** runs once, in the first training forward (a codebook needs
  codes before its first lookup), on the vectors of the first micro-batch of every rank,
  gathered; rank 0 runs it and broadcasts (see `beats.quantizer`).
- **Codebook health.** `after_step` reports codes hit in the step (``codebook_usage``),
  codes hit in the last ``usage_window`` steps (``codebook_usage_recent``) and the
  perplexity of the step's code distribution, all over every rank. With ``restart_after``
  > 0 a code unused for that many steps is restarted from the step's last encoder outputs,
  identically on every rank (off by default, as in the original).

Until the model offers a shared filterbank hook (issue 13: ``forward_fbank``), the task
computes the filterbank once with `beats.fbank.fbank` and runs teacher and student from it
through ``embed_patches`` and ``encoder`` (`_encode`, `DistillTask.forward_loss`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import BEATsConfig
from ..fbank import fbank as compute_fbank
from ..fbank import num_frames
from ..model import PATCHES_PER_STEP, BEATs, patch_padding_mask
from ..quantizer import VectorQuantizer, code_perplexity, l2norm
from ..tokenizer import BEATsTokenizer
from .blocks import TransformerStack

TARGETS = ("auto", "features", "logits")

# The released models' layout (deep norm, GRU-gated relative positions, E != C) with the
# training settings of the spec; presets only change sizes. Codebook: 1024 codes of 256.
_LAYOUT: dict[str, Any] = dict(
    deep_norm=True, relative_position_embedding=True, gru_rel_pos=True, num_buckets=320,
    max_distance=800, layer_wise_gradient_decay_ratio=1.0, dropout=0.1,
    attention_dropout=0.1, encoder_layerdrop=0.0, quant_n=1024, quant_dim=256,
)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=64, encoder_layers=2, encoder_embed_dim=64,
                 encoder_ffn_embed_dim=256, encoder_attention_heads=4, conv_pos=32,
                 conv_pos_groups=4),
    "base": dict(embed_dim=512, encoder_layers=12, encoder_embed_dim=768,
                 encoder_ffn_embed_dim=3072, encoder_attention_heads=12, conv_pos=128,
                 conv_pos_groups=16),
}


def student_config(preset: str = "base", **overrides: Any) -> BEATsConfig:
    """The student tokenizer's config of a size preset (``tiny``, ``base``), with overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown student preset {preset!r}: use one of {sorted(PRESETS)}")
    return BEATsConfig(**{**_LAYOUT, **PRESETS[preset], **overrides})


@dataclass
class DistillConfig:
    """Settings of the distillation model (the loop's settings live in its own config).

    Attributes:
        beta: commitment weight (1.0 in the original; ESPnet uses 10).
        decay: codebook EMA decay.
        kmeans_iters: k-means iterations of the first-batch initialisation.
        estimator_layers: Transformer layers of the estimator.
        target: ``features`` (the teacher's last-layer output), ``logits`` (a fine-tuned
            teacher's per-position class logits) or ``auto`` (logits when the teacher has
            a class head).
        restart_after: restart codes unused for this many steps (0: never, the original).
        usage_window: steps counted by ``codebook_usage_recent``.
        seed: seeds the k-means initialisation and code restarts.
    """

    beta: float = 1.0
    decay: float = 0.99
    kmeans_iters: int = 10
    estimator_layers: int = 3
    target: str = "auto"
    restart_after: int = 0
    usage_window: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"DistillConfig.target={self.target!r}: use one of {TARGETS}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"DistillConfig.decay={self.decay}: must lie in (0, 1)")
        if self.beta < 0:
            raise ValueError(f"DistillConfig.beta={self.beta}: must be >= 0")
        for key in ("kmeans_iters", "estimator_layers", "usage_window"):
            if getattr(self, key) < 1:
                raise ValueError(f"DistillConfig.{key}={getattr(self, key)}: must be >= 1")
        if self.restart_after < 0:
            raise ValueError(f"DistillConfig.restart_after={self.restart_after}: must be >= 0 "
                             "(0 turns restarts off)")


def target_kind(teacher: BEATs, target: str = "auto") -> str:
    """``features`` or ``logits``: what the teacher gives as the target (see `DistillConfig`)."""
    if target == "auto":
        return "features" if teacher.predictor is None else "logits"
    if target == "logits" and teacher.predictor is None:
        raise ValueError("target 'logits' needs a fine-tuned teacher (one with a class head); "
                         "this teacher has none: use target 'features'")
    return target


def _encode(model: BEATs, fbank: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Encoder output (B, S, C) of a normalised filterbank (B, T, 128), keys masked."""
    x, _ = model.encoder(model.embed_patches(fbank), padding_mask)
    return x


@torch.no_grad()
def teacher_targets(teacher: BEATs, fbank: torch.Tensor, padding_mask: torch.Tensor,
                    kind: str) -> torch.Tensor:
    """The teacher's target at every patch, (B, S, C) features or (B, S, classes) logits.

    Runs the teacher as it is (keep it in eval mode); values at padded positions are
    meaningless. Logits are the class head at each position, before BEATs' pooling.
    """
    x = _encode(teacher, fbank, padding_mask)
    if kind == "logits":
        assert teacher.predictor is not None
        x = teacher.predictor(x)
    return x


def estimator_config(teacher_cfg: BEATsConfig, student_cfg: BEATsConfig) -> BEATsConfig:
    """The estimator's layers: the teacher's width and layer type, the student's dropouts."""
    return dataclasses.replace(
        teacher_cfg, finetuned_model=False, dropout=student_cfg.dropout,
        attention_dropout=student_cfg.attention_dropout,
        activation_dropout=student_cfg.activation_dropout, quant_noise=0.0,
    )


class Estimator(nn.Module):
    """Codes (B, S, code_dim) -> predicted teacher targets (B, S, out_dim).

    Linear code_dim -> width, ``num_layers`` Transformer layers (`TransformerStack`),
    LayerNorm, and a Linear width -> out_dim when the target is not ``width`` wide.
    """

    def __init__(self, code_dim: int, cfg: BEATsConfig, num_layers: int,
                 out_dim: int | None = None) -> None:
        super().__init__()
        width = cfg.encoder_embed_dim
        self.proj = nn.Linear(code_dim, width)
        self.layers = TransformerStack(cfg, num_layers)
        self.layer_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim) if out_dim not in (None, width) else None
        for linear in (self.proj, self.head):
            if linear is not None:
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)

    def forward(self, codes: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(self.layers(self.proj(codes), padding_mask))
        return x if self.head is None else self.head(x)


class TokenizerDistiller(nn.Module):
    """Student tokenizer + estimator: the model that tokenizer distillation trains.

    Args:
        student_cfg: the student's `BEATsConfig` (`student_config`); ``quant_n`` and
            ``quant_dim`` size the codebook.
        teacher_cfg: the teacher's config (its width and layer type shape the estimator).
        target_dim: width of the teacher target (teacher width, or its class count).
        cfg: `DistillConfig`.
    """

    def __init__(self, student_cfg: BEATsConfig, teacher_cfg: BEATsConfig, target_dim: int,
                 cfg: DistillConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else DistillConfig()
        self.cfg = cfg
        self.student = BEATsTokenizer(student_cfg)
        self.student.quantize = VectorQuantizer(
            student_cfg.quant_n, student_cfg.quant_dim, decay=cfg.decay, beta=cfg.beta,
            kmeans_iters=cfg.kmeans_iters, update_in_forward=False, seed=cfg.seed,
        )
        self.estimator = Estimator(student_cfg.quant_dim,
                                   estimator_config(teacher_cfg, student_cfg),
                                   cfg.estimator_layers, target_dim)
        num_codes = student_cfg.quant_n
        # Training state (saved with the training checkpoint, not with the tokenizer):
        # codebook updates done, the update at which each code was last hit (0 = never),
        # and updates since each code was last hit or restarted.
        self.register_buffer("codebook_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("code_last_hit", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("code_idle_steps", torch.zeros(num_codes, dtype=torch.long))

    @property
    def quantizer(self) -> VectorQuantizer:
        return self.student.quantize

    def distill(self, fbank: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per valid patch (M = valid patches, in batch-major order): ``(distillation loss
        1 - cosine (M,), commitment term (M,), code ids (M,))``, both terms float32."""
        student = self.student
        x = student.embed_patches(fbank)
        mask = patch_padding_mask(lengths, x.shape[1])
        valid = ~mask
        x, _ = student.encoder(x, mask)
        e = student.quantize_layer(x[valid])  # (M, quant_dim)
        z_q, _, ids = student.quantize(e)
        commitment = self.cfg.beta * (z_q.detach().float() - l2norm(e.float())).pow(2).mean(-1)
        codes = z_q.new_zeros(*mask.shape, z_q.shape[-1])
        codes[valid] = z_q
        prediction = self.estimator(codes, mask)[valid]
        cosine = F.cosine_similarity(prediction.float(), target[valid].float(), dim=-1)
        return 1.0 - cosine, commitment, ids

    def forward(self, fbank: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor,
                denominator: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch: ``(loss, metrics)``.

        Args:
            fbank: (B, T, 128) normalised filterbank; lengths: (B,) valid samples per clip.
            target: (B, S, target_dim) teacher targets (`teacher_targets`).
            denominator: valid patches of the whole optimiser step (all micro-batches and
                ranks); the loss is the sum over this micro-batch's patches divided by it.

        Returns:
            loss (scalar, for backward), and metrics as detached sums over this
            micro-batch's valid patches: ``loss``, ``cosine``, ``commitment``, with their
            count ``count`` (report each as sum / count over the step).
        """
        distill, commitment, _ = self.distill(fbank, lengths, target)
        total = distill.sum() + commitment.sum()
        metrics = {
            "loss": total.detach(),
            "cosine": (1.0 - distill).sum().detach(),
            "commitment": commitment.sum().detach(),
            "count": torch.tensor(float(distill.shape[0]), device=distill.device),
        }
        return total / denominator, metrics

    @torch.no_grad()
    def after_step(self) -> dict[str, float]:
        """Apply the step's codebook update (call once per optimiser step, on every rank).

        Returns codebook health over all ranks: ``codebook_usage`` (codes hit in the step),
        ``codebook_usage_recent`` (hit in the last ``usage_window`` steps), ``perplexity``,
        and ``codes_restarted`` when restarts are on.
        """
        quantizer = self.quantizer
        counts = quantizer.update()
        hit = (counts > 0).to(self.code_last_hit.device)
        self.codebook_steps += 1
        step = int(self.codebook_steps)
        self.code_last_hit[hit] = step
        self.code_idle_steps += 1
        self.code_idle_steps[hit] = 0
        out = {"codebook_usage": float(hit.sum()), "perplexity": code_perplexity(counts)}
        if self.cfg.restart_after > 0:
            dead = self.code_idle_steps >= self.cfg.restart_after
            restarted = quantizer.restart_codes(dead, seed=self.cfg.seed * 1_000_003 + step)
            if restarted:
                self.code_idle_steps[dead] = 0
            out["codes_restarted"] = float(restarted)
        since = max(step - self.cfg.usage_window, 0)
        out["codebook_usage_recent"] = float((self.code_last_hit > since).sum())
        return out

    def discard_step(self) -> None:
        """Forget the statistics of a step that was skipped (no codebook update)."""
        self.quantizer.discard_pending()

    def export(self, directory: str | Path) -> Path:
        """Write the student as a tokenizer checkpoint (`save_pretrained` format).

        The estimator and the training state are dropped; `BEATsTokenizer.from_pretrained`
        loads the folder. Returns it.
        """
        return self.student.save_pretrained(directory)


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


class DistillTask:
    """Tokenizer distillation as a task of the training loop.

    ``model`` (the `TokenizerDistiller`) is everything trained and saved; the teacher is
    kept apart (frozen, eval mode, never saved) and follows the batch's device. A batch
    is a mapping with ``wav`` (B, N) float32 16 kHz samples zero past each clip's length
    and ``lengths`` (B,) int64; its loss terms are its valid patches (`valid_patches`).
    The loop may replace ``model`` by its DDP wrapper: the task keeps the bare module.
    """

    def __init__(self, teacher: BEATs, student_cfg: BEATsConfig,
                 cfg: DistillConfig | None = None) -> None:
        cfg = cfg if cfg is not None else DistillConfig()
        self.cfg = cfg
        self.teacher = teacher.freeze()
        self.kind = target_kind(teacher, cfg.target)
        target_dim = (teacher.cfg.predictor_class if self.kind == "logits"
                      else teacher.cfg.encoder_embed_dim)
        self.distiller = TokenizerDistiller(student_cfg, teacher.cfg, target_dim, cfg)
        self.model: nn.Module = self.distiller

    def parameter_groups(self, cfg: Any) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices, none on biases and norms; the codebook
        (not trained by gradients) and nothing of the teacher are in them."""
        decay, no_decay = [], []
        for param in self.distiller.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        weight_decay = float(getattr(cfg, "weight_decay", 0.01))
        return [{"params": decay, "lr_scale": 1.0, "weight_decay": weight_decay},
                {"params": no_decay, "lr_scale": 1.0, "weight_decay": 0.0}]

    def _inputs(self, batch: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fbank, lengths, teacher target) of a batch; one filterbank for both models."""
        wav, lengths = batch["wav"], batch["lengths"]
        if self.teacher.device != wav.device:
            self.teacher.to(wav.device)
        fbank, _ = compute_fbank(wav, lengths)  # TODO(issue 13): the shared forward_fbank hook
        mask = patch_padding_mask(lengths, PATCHES_PER_STEP * (fbank.shape[1] // 16))
        return fbank, lengths, teacher_targets(self.teacher, fbank, mask, self.kind)

    def forward_loss(self, batch: Mapping[str, torch.Tensor], denominator: float
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss / denominator, metrics)`` of one micro-batch (`TokenizerDistiller.forward`)."""
        fbank, lengths, target = self._inputs(batch)
        return self.model(fbank, lengths, target, denominator)

    def after_step(self) -> dict[str, float]:
        """After every optimiser step: the codebook update and its health metrics."""
        return self.distiller.after_step()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Mean loss, cosine and commitment over valid patches, codes used and perplexity,
        over every rank (each rank passes its own batches). Leaves the mode as it was."""
        model = self.distiller
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        counts = torch.zeros(model.quantizer.num_tokens, dtype=torch.float64)
        try:
            for batch in batches:
                distill, commitment, ids = model.distill(*self._inputs(batch))
                sums += torch.tensor([float((distill + commitment).sum()),
                                      float((1 - distill).sum()), float(commitment.sum()),
                                      float(distill.shape[0])], dtype=torch.float64)
                counts += torch.bincount(ids.cpu(), minlength=counts.numel())
        finally:
            model.train(was_training)
        device = model.quantizer.embedding.weight.device
        both = _all_reduce(torch.cat([sums, counts]).to(device)).cpu()
        sums, counts = both[:4], both[4:]
        n = max(float(sums[3]), 1.0)
        return {"loss": float(sums[0]) / n, "cosine": float(sums[1]) / n,
                "commitment": float(sums[2]) / n, "codebook_usage": float((counts > 0).sum()),
                "perplexity": code_perplexity(counts)}

    def export(self, out_dir: Path, tag: str) -> None:
        """Write the tokenizer: ``OUT/tokenizer/`` for ``last``, ``OUT/tokenizer-TAG/`` else."""
        name = "tokenizer" if tag == "last" else f"tokenizer-{tag}"
        self.distiller.export(Path(out_dir) / name)


def valid_patches(lengths: torch.Tensor) -> torch.Tensor:
    """Valid patches per clip (B,) of clips of ``lengths`` samples: a batch's loss terms."""
    positions = PATCHES_PER_STEP * (int(num_frames(int(lengths.max()))) // 16)
    return (~patch_padding_mask(lengths, positions)).sum(dim=1)
