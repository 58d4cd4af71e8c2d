"""The tokenizer-distillation model: student, estimator, targets (see
docs/design/training.md, Tokenizer distillation).

`TokenizerDistiller` is a student `BEATsTokenizer` (encoder over the full, unmasked patch
sequence, ``quantize_layer``, EMA codebook) and an `Estimator` (Linear quant_dim ->
teacher width, 3 Transformer layers, LayerNorm) that predicts the teacher's target at
every valid patch from the quantised codes (straight-through gradients). Loss per valid
patch: ``(1 - cosine(prediction, target)) + beta * mean((code - l2norm(e))^2)``.

- **Teacher target** (`teacher_targets`). An SSL teacher: its last-layer output at each
  patch (the paper). A fine-tuned teacher: its class head applied at every patch *before*
  pooling, i.e. the per-position logits (B, S, classes). Per patch rather than per clip
  because the tokenizer labels patches: a clip target gives one signal per clip and no
  reason for neighbouring patches to get different codes, while the per-position logits
  carry all the clip's information too (BEATs' clip logits are exactly their mean over
  valid positions, the head being linear) plus where in the clip each class is. Both use
  1 - cosine; with logits the estimator works at the teacher's encoder width and ends
  with a Linear to the class count.
- **EMA timing.** In training mode the forwards only record per-code counts and sums;
  `TokenizerDistiller.after_step` (once per optimiser step, on every process) sums them
  over the micro-batches and processes and applies one EMA step, so n micro-batches on r
  processes move the codebook exactly as one forward of the whole step would (the
  original updates in every forward, which makes the result depend on the split).
- **k-means initialisation** (`TokenizerDistiller.init_codebook`): on the student's
  outputs (eval mode) for the first step's clips of every process, gathered in rank
  order; rank 0 clusters and broadcasts (see `beats.quantizer`).
- **Codebook health.** After each step: codes hit in the step, codes hit in the last
  ``usage_window`` steps and the perplexity of the step's code distribution, all over
  every process; with ``restart_after`` > 0 a code unused for that many steps is
  restarted from the step's encoder outputs, identically on every process (off by
  default, as in the original).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import BEATsConfig
from ..errors import InputError
from ..fbank import num_frames
from ..model import BEATs
from ..model_output import PATCHES_PER_STEP, patch_padding_mask
from ..quantizer import VectorQuantizer, code_perplexity, l2norm
from ..tokenizer import BEATsTokenizer
from . import distributed
from .blocks import TransformerStack

TARGETS = ("auto", "features", "logits")

# The released models' layout (deep norm, GRU-gated relative positions, E != C) with the
# training settings of the original recipe; presets only change sizes. Codebook: 1024 codes of 256.
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
        raise InputError(f"unknown student preset {preset!r}: use one of {sorted(PRESETS)}")
    return BEATsConfig(**{**_LAYOUT, **PRESETS[preset], **overrides})


def resolve_student(spec: str | BEATsConfig, teacher_cfg: BEATsConfig | None = None
                    ) -> BEATsConfig:
    """The student's config from ``spec``: a preset name, a `BEATsConfig`, or the path of
    a JSON file ``{"preset": NAME, KEY: VALUE, ...}`` (preset default ``base``; the other
    keys are `BEATsConfig` keys to change). Without explicit ``fbank_mean``/``fbank_std``
    the student takes the teacher's, so both read one filterbank."""
    if isinstance(spec, BEATsConfig):
        return spec
    overrides: dict[str, Any] = {}
    if spec in PRESETS:
        preset = spec
    else:
        try:
            data = json.loads(Path(spec).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"student config {spec!r} is neither a preset ({sorted(PRESETS)}) "
                             f"nor a readable JSON file: {e}") from None
        if not isinstance(data, dict):
            raise InputError(f"student config {spec}: must hold a JSON object")
        preset = data.pop("preset", "base")
        known = {f.name for f in dataclasses.fields(BEATsConfig)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"student config {spec}: unknown keys {unknown} (give 'preset' "
                             "and BEATsConfig keys)")
        overrides = data
    if teacher_cfg is not None:
        for key in ("fbank_mean", "fbank_std"):
            overrides.setdefault(key, getattr(teacher_cfg, key))
    try:
        cfg = student_config(preset, **overrides)
    except TypeError as e:
        raise InputError(f"student config {spec}: {e}") from None
    if cfg.finetuned_model:
        raise InputError(f"student config {spec}: a tokenizer has no class head "
                         "(finetuned_model must be false)")
    return cfg


def target_kind(teacher: BEATs, target: str = "auto") -> str:
    """``features`` or ``logits``: what the teacher gives as the target (see `DistillConfig`)."""
    if target == "auto":
        return "features" if teacher.predictor is None else "logits"
    if target == "logits" and teacher.predictor is None:
        raise InputError("target 'logits' needs a fine-tuned teacher (one with a class head); "
                         "this teacher has none: use target 'features'")
    return target


@torch.no_grad()
def teacher_targets(teacher: BEATs, features: torch.Tensor, frames: torch.Tensor,
                    kind: str) -> torch.Tensor:
    """The teacher's target at every patch, (B, S, C) features or (B, S, classes) logits,
    of a filterbank (B, T, 128) with ``frames`` (B,) valid frames.

    Runs the teacher as it is (keep it in eval mode); values at padded positions are
    meaningless. Logits are the class head at each position, before BEATs' pooling.
    """
    x = teacher.forward_fbank(features, frames).features
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
        student_cfg: the student's `BEATsConfig`; ``quant_n`` and ``quant_dim`` size the
            codebook.
        teacher_cfg: the teacher's config (its width and layer type shape the estimator).
        target_dim: width of the teacher target (teacher width, or its class count).
        beta: commitment weight (1.0 in the original; ESPnet uses 10).
        decay: codebook EMA decay.
        kmeans_iters: k-means iterations of the initialisation.
        estimator_layers: Transformer layers of the estimator.
        restart_after: restart codes unused for this many steps (0: never).
        usage_window: steps counted by ``codebook_usage_recent``.
        seed: seeds k-means and code restarts (not the weights: the global torch RNG).
    """

    def __init__(self, student_cfg: BEATsConfig, teacher_cfg: BEATsConfig, target_dim: int,
                 *, beta: float = 1.0, decay: float = 0.99, kmeans_iters: int = 10,
                 estimator_layers: int = 3, restart_after: int = 0, usage_window: int = 100,
                 seed: int = 0) -> None:
        super().__init__()
        self.beta, self.restart_after, self.usage_window = beta, restart_after, usage_window
        self.seed = seed
        self.student = BEATsTokenizer(student_cfg)
        self.student.quantize = VectorQuantizer(
            student_cfg.quant_n, student_cfg.quant_dim, decay=decay, beta=beta,
            kmeans_iters=kmeans_iters, update_in_forward=False, seed=seed,
        )
        self.estimator = Estimator(student_cfg.quant_dim,
                                   estimator_config(teacher_cfg, student_cfg),
                                   estimator_layers, target_dim)
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

    def encode(self, features: torch.Tensor, frames: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e (M, quant_dim), padding mask (B, S))``: the student's ``quantize_layer``
        output at the M valid patches (batch-major order), before normalisation."""
        out = self.student.forward_fbank(features, frames)
        return self.student.quantize_layer(out.features[~out.padding_mask]), out.padding_mask

    def distill(self, features: torch.Tensor, frames: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per valid patch: ``(1 - cosine (M,), commitment term (M,), code ids (M,))``,
        both terms float32; ``target`` (B, S, target_dim) from `teacher_targets`."""
        e, mask = self.encode(features, frames)
        valid = ~mask
        z_q, _, ids = self.quantizer(e)
        commitment = self.beta * (z_q.detach().float() - l2norm(e.float())).pow(2).mean(-1)
        codes = z_q.new_zeros(*mask.shape, z_q.shape[-1])
        codes[valid] = z_q
        prediction = self.estimator(codes, mask)[valid]
        cosine = F.cosine_similarity(prediction.float(), target[valid].float(), dim=-1)
        return 1.0 - cosine, commitment, ids

    def forward(self, features: torch.Tensor, frames: torch.Tensor, target: torch.Tensor,
                denominator: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch: ``(loss, metrics)``.

        ``denominator``: valid patches of the whole optimiser step (every micro-batch and
        process); the loss is the sum over this micro-batch's patches divided by it.
        ``metrics``: ``cosine`` and ``commitment`` as ``tensor([sum, patches])``.
        """
        distill, commitment, _ = self.distill(features, frames, target)
        n = torch.tensor(float(distill.shape[0]), device=distill.device)
        metrics = {"cosine": torch.stack([(1.0 - distill).sum().detach(), n]),
                   "commitment": torch.stack([commitment.sum().detach(), n])}
        return (distill.sum() + commitment.sum()) / denominator, metrics

    @torch.no_grad()
    def init_codebook(self, inputs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """k-means on the student's outputs (eval mode) for ``inputs`` [(features, frames)],
        gathered over processes; every process must call it together. Returns False (and
        leaves the codebook as it is) when no process has a valid patch."""
        was_training = self.training
        self.eval()
        try:
            parts = [l2norm(self.encode(f, n)[0].float()) for f, n in inputs]
        finally:
            self.train(was_training)
        dim = self.quantizer.dim
        device = self.quantizer.embedding.weight.device
        vectors = torch.cat(parts) if parts else torch.zeros(0, dim, device=device)
        total = distributed.all_sum(torch.tensor([float(vectors.shape[0])], device=device),
                                    current_dist())
        if float(total[0]) == 0:
            return False
        self.quantizer.init_from_data(vectors)
        return True

    @torch.no_grad()
    def after_step(self) -> dict[str, float]:
        """Apply the step's codebook update (once per optimiser step, on every process).

        Returns codebook health over all processes: ``codebook_usage`` (codes hit in the
        step), ``codebook_usage_recent`` (hit in the last ``usage_window`` steps),
        ``perplexity``, and ``codes_restarted`` when restarts are on.
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
        if self.restart_after > 0:
            dead = self.code_idle_steps >= self.restart_after
            restarted = quantizer.restart_codes(dead, seed=self.seed * 1_000_003 + step)
            if restarted:
                self.code_idle_steps[dead] = 0
            out["codes_restarted"] = float(restarted)
        since = max(step - self.usage_window, 0)
        out["codebook_usage_recent"] = float((self.code_last_hit > since).sum())
        return out

    def discard_step(self) -> None:
        """Forget the statistics of a step that was skipped (no codebook update)."""
        self.quantizer.discard_pending()

    def export(self, directory: str | Path) -> Path:
        """Write the student as a tokenizer checkpoint (`save_pretrained` format; the
        estimator and the training state dropped). Returns the folder."""
        return self.student.save_pretrained(directory)


def current_dist() -> distributed.Dist:
    """This process's rank and the world size of the default process group (CPU device:
    only rank and world are used here)."""
    if dist.is_available() and dist.is_initialized():
        return distributed.Dist(dist.get_rank(), dist.get_world_size())
    return distributed.Dist()


def student_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tokenizer's tensors (``student.*``, prefix removed) of a distiller state dict."""
    return {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}


def valid_patches(lengths: torch.Tensor) -> torch.Tensor:
    """Valid patches per clip (B,) of clips of ``lengths`` samples: a batch's loss terms."""
    if lengths.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    positions = PATCHES_PER_STEP * (int(num_frames(int(lengths.max()))) // 16)
    return (~patch_padding_mask(lengths, positions)).sum(dim=1)


