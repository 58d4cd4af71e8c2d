"""Tokenizer distillation (training spec section 4): train an acoustic tokenizer from a teacher.

``distill(teacher, audio, DistillConfig(...), out_dir)`` trains a student tokenizer on
unlabelled audio with the shared training loop (`beats.train.loop.fit`) and writes
``OUT/tokenizer/``: a tokenizer checkpoint that `BEATsTokenizer.from_pretrained` and
``beats tokenize -m`` load (the estimator is dropped), plus the loop's ``metrics.jsonl``,
``config.json`` and ``state/``.

The trained model (`TokenizerDistiller`) is a student `BEATsTokenizer` (encoder over the
full, unmasked patch sequence, ``quantize_layer``, EMA codebook) and an estimator (Linear
quant_dim -> teacher width, 3 Transformer layers, LayerNorm) that predicts the teacher's
target at every valid patch from the quantised codes (straight-through gradients). Loss per
valid patch: ``(1 - cosine(prediction, target)) + beta * mean((code - l2norm(e))^2)``,
summed and divided by the step's global patch count.

Design notes:

- **Teacher target.** An SSL teacher: its last-layer output at each patch (the paper). A
  fine-tuned teacher: its class head applied at every patch *before* pooling, i.e. the
  per-position logits (B, S, classes). Per patch rather than per clip because the tokenizer
  labels patches: a clip target gives one signal per clip and no reason for neighbouring
  patches to get different codes, while the per-position logits carry all the clip's
  information too (BEATs' clip logits are exactly their mean over valid positions, the head
  being linear) plus where in the clip each class is. The loss is the same 1 - cosine, so
  both teachers share one code path and one ``cosine`` metric; with logits the estimator
  works at the teacher's encoder width and ends with a Linear to the class count. The
  teacher is frozen, in eval mode and outside the task's ``model``: never trained, saved,
  nor synchronised.
- **One filterbank.** Each batch's filterbank is computed once (`beats.train.data.
  filterbank`, float32) and fed to both models' ``forward_fbank``; the student takes the
  teacher's normalisation statistics.
- **EMA timing.** The codebook moves once per optimiser step, in `DistillTask.after_step`:
  the forwards of all micro-batches only record per-code counts and sums, and the update
  sums them over the micro-batches and processes and applies one EMA step. So every
  micro-batch of a step sees the same codebook, and n micro-batches on r processes update
  it exactly as one forward of the whole step's batch would (the original updates in every
  forward, which makes the result depend on how the batch is split). A step that float16
  loss scaling skips forgets its statistics (`DistillTask.discard_step`).
- **k-means initialisation** runs once, before the first step's forwards
  (`DistillTask.before_step`, which every process calls even when its share is empty), on
  the student's outputs for the first step's clips (eval mode) of every process, gathered
  in rank order; rank 0 clusters and broadcasts (see `beats.quantizer`).
- **Codebook health.** After each step: codes hit in the step (``codebook_usage``), codes
  hit in the last ``usage_window`` steps (``codebook_usage_recent``) and the perplexity of
  the step's code distribution, all over every process. With ``restart_after`` > 0 a code
  unused for that many steps is restarted from the step's encoder outputs, identically on
  every process (off by default, as in the original).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import serialization
from ..config import BEATsConfig
from ..fbank import num_frames
from ..hub import ModelKindError
from ..model import PATCHES_PER_STEP, BEATs, patch_padding_mask
from ..quantizer import VectorQuantizer, code_perplexity, l2norm
from ..tokenizer import BEATsTokenizer
from . import distributed, loop
from .blocks import TransformerStack
from .config import TrainConfig
from .data import Clip, ClipDataset, collate_clips, filterbank
from .unlabelled import unlabelled_clips

TARGETS = ("auto", "features", "logits")
TOKENIZER_DIR = "tokenizer"

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
            raise ValueError(f"student config {spec!r} is neither a preset ({sorted(PRESETS)}) "
                             f"nor a readable JSON file: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"student config {spec}: must hold a JSON object")
        preset = data.pop("preset", "base")
        known = {f.name for f in dataclasses.fields(BEATsConfig)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"student config {spec}: unknown keys {unknown} (give 'preset' "
                             "and BEATsConfig keys)")
        overrides = data
    if teacher_cfg is not None:
        for key in ("fbank_mean", "fbank_std"):
            overrides.setdefault(key, getattr(teacher_cfg, key))
    try:
        cfg = student_config(preset, **overrides)
    except TypeError as e:
        raise ValueError(f"student config {spec}: {e}") from None
    if cfg.finetuned_model:
        raise ValueError(f"student config {spec}: a tokenizer has no class head "
                         "(finetuned_model must be false)")
    return cfg


@dataclass
class DistillConfig(TrainConfig):
    """`TrainConfig` plus the distillation recipe. Defaults: the paper's optimiser (peak
    lr 5e-5 with an SSL teacher, AdamW (0.9, 0.98), weight decay 0.01, linear decay after
    8 % warm-up (ESPnet's 32k of 400k), clip 1.0); size the batch with ``batch_seconds``
    (the paper: 1400 s per step).

    Attributes:
        crop_seconds: training reads random crops of this length from longer clips.
        student: the student's size: ``tiny``, ``base`` or a JSON file (`resolve_student`).
        target: ``features`` (the teacher's last-layer output), ``logits`` (a fine-tuned
            teacher's per-position class logits) or ``auto`` (logits when the teacher has
            a class head).
        beta: commitment weight (1.0 in the original; ESPnet uses 10).
        decay: codebook EMA decay.
        kmeans_iters: k-means iterations of the first-batch initialisation.
        estimator_layers: Transformer layers of the estimator.
        restart_after: restart codes unused for this many steps (0: never, the original).
        usage_window: steps counted by ``codebook_usage_recent``.
        seed: also seeds the student's initialisation, k-means and code restarts.
    """

    lr: float = 5e-5
    schedule: str = "linear"
    warmup_ratio: float = 0.08
    crop_seconds: float = 10.0
    student: str = "base"
    target: str = "auto"
    beta: float = 1.0
    decay: float = 0.99
    kmeans_iters: int = 10
    estimator_layers: int = 3
    restart_after: int = 0
    usage_window: int = 100

    def validate(self) -> None:
        super().validate()

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)!r}: {what}")

        need(self.target in TARGETS, "target", f"choose one of {TARGETS}")
        need(0.0 < self.decay < 1.0, "decay", "must lie in (0, 1)")
        need(self.beta >= 0, "beta", "must be >= 0")
        need(self.crop_seconds > 0, "crop_seconds", "must be positive")
        for name in ("kmeans_iters", "estimator_layers", "usage_window"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, name, "must be a positive integer")
        need(isinstance(self.restart_after, int) and self.restart_after >= 0, "restart_after",
             "must be an integer >= 0 (0 turns restarts off)")


def target_kind(teacher: BEATs, target: str = "auto") -> str:
    """``features`` or ``logits``: what the teacher gives as the target (see `DistillConfig`)."""
    if target == "auto":
        return "features" if teacher.predictor is None else "logits"
    if target == "logits" and teacher.predictor is None:
        raise ValueError("target 'logits' needs a fine-tuned teacher (one with a class head); "
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
        cfg: `DistillConfig` (``beta``, ``decay``, ``kmeans_iters``, ``estimator_layers``,
            ``restart_after``, ``usage_window``, ``seed``).
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
        commitment = self.cfg.beta * (z_q.detach().float() - l2norm(e.float())).pow(2).mean(-1)
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
                                    _dist())
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
        """Write the student as a tokenizer checkpoint (`save_pretrained` format; the
        estimator and the training state dropped). Returns the folder."""
        return self.student.save_pretrained(directory)


def _dist() -> distributed.Dist:
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


class DistillTask(loop.Task):
    """Tokenizer distillation as a `beats.train.loop.Task`.

    ``model`` (the `TokenizerDistiller`) is everything trained and saved; the teacher is
    kept apart (frozen, eval mode, never saved) and follows the batch's device. A batch
    (`collate`) holds ``wav`` (B, N), ``lengths`` (B,) and ``count``, its valid patches.

    Args:
        teacher: the teacher (an SSL or fine-tuned `BEATs`).
        student_cfg: the student's config (default: `resolve_student` of ``cfg.student``).
        cfg: `DistillConfig`.
        clips: the training clips (unlabelled).
        info: extra entries for ``OUT/config.json`` (teacher name, inputs, ...).
    """

    name = "distill"

    def __init__(self, teacher: BEATs, student_cfg: BEATsConfig | None = None,
                 cfg: DistillConfig | None = None, clips: Sequence[Clip] = (),
                 info: dict[str, Any] | None = None) -> None:
        cfg = cfg if cfg is not None else DistillConfig()
        self.cfg = cfg
        if getattr(teacher, "is_tokenizer", False):
            raise ValueError("the teacher is an acoustic tokenizer: distil from an encoder "
                             "(an SSL or a fine-tuned BEATs checkpoint)")
        self.teacher = teacher.freeze()
        self.kind = target_kind(teacher, cfg.target)
        student_cfg = student_cfg if student_cfg is not None else resolve_student(
            cfg.student, teacher.cfg)
        if student_cfg.input_patch_size != teacher.cfg.input_patch_size:
            raise ValueError(f"the student's patches ({student_cfg.input_patch_size}) must "
                             f"match the teacher's ({teacher.cfg.input_patch_size}): one "
                             "target per student patch")
        self.student_cfg = student_cfg
        self.target_dim = (teacher.cfg.predictor_class if self.kind == "logits"
                           else teacher.cfg.encoder_embed_dim)
        self.distiller = TokenizerDistiller(student_cfg, teacher.cfg, self.target_dim, cfg)
        self.model: nn.Module = self.distiller
        self.train_set = ClipDataset(list(clips), crop_seconds=cfg.crop_seconds, seed=cfg.seed)
        self.clip_seconds = cfg.crop_seconds
        self.info = info or {}

    def run_info(self) -> dict[str, Any]:
        return {"target": self.kind, "target_dim": self.target_dim,
                "student_config": self.student_cfg.to_dict(), **self.info}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_clips(items)
        batch["count"] = int(valid_patches(batch["lengths"]).sum())
        return batch

    def parameter_groups(self, cfg: Any) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices, none on biases and norms; the codebook
        (not trained by gradients) and nothing of the teacher are in them."""
        decay, no_decay = [], []
        for param in self.distiller.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        weight_decay = float(getattr(cfg, "weight_decay", self.cfg.weight_decay))
        return [{"params": decay, "lr_scale": 1.0, "weight_decay": weight_decay},
                {"params": no_decay, "lr_scale": 1.0, "weight_decay": 0.0}]

    def _inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's (filterbank (B, T, 128), frames (B,)) of a batch, on its device."""
        device = self.distiller.quantizer.embedding.weight.device
        return filterbank(batch["wav"].to(device), batch["lengths"].to(device),
                          self.student_cfg)

    def _targets(self, batch: Mapping[str, Any], features: torch.Tensor,
                 frames: torch.Tensor) -> torch.Tensor:
        teacher, cfg = self.teacher, self.teacher.cfg
        if teacher.device != features.device:
            teacher.to(features.device)
        if (cfg.fbank_mean, cfg.fbank_std) != (self.student_cfg.fbank_mean,
                                               self.student_cfg.fbank_std):
            features, frames = filterbank(batch["wav"].to(features.device),
                                          batch["lengths"].to(features.device), cfg)
        return teacher_targets(teacher, features, frames, self.kind)

    def forward_loss(self, batch: Mapping[str, Any], denominator: float
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss / denominator, metrics)`` of one micro-batch (`TokenizerDistiller.forward`)."""
        features, frames = self._inputs(batch)
        target = self._targets(batch, features, frames)
        return self.model(features, frames, target, denominator)

    def before_step(self, step: int, micro: list[dict[str, Any]]) -> None:
        """Forget the last step's vectors; k-means on this step's clips if not yet done."""
        quantizer = self.distiller.quantizer
        quantizer.discard_pending()
        if not bool(quantizer.embedding.initted.item()):
            self.distiller.init_codebook([self._inputs(b) for b in micro if b["count"] > 0])

    def after_step(self, step: int) -> dict[str, float]:
        """The codebook update and its health numbers (see `TokenizerDistiller.after_step`)."""
        return self.distiller.after_step()

    def discard_step(self, step: int) -> None:
        self.distiller.discard_step()

    @torch.no_grad()
    def measure(self, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        """Mean loss, cosine and commitment over valid patches, codes used and perplexity,
        over every process (each passes its own batches of ``wav`` and ``lengths``). The
        codebook does not move; the mode is left as it was."""
        model = self.distiller
        was_training = model.training
        model.eval()
        device = model.quantizer.embedding.weight.device
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        counts = torch.zeros(model.quantizer.num_tokens, dtype=torch.float64, device=device)
        try:
            for batch in batches:
                features, frames = self._inputs(batch)
                target = self._targets(batch, features, frames)
                distill, commitment, ids = model.distill(features, frames, target)
                sums += torch.stack([(distill + commitment).sum(), (1 - distill).sum(),
                                     commitment.sum(), distill.new_tensor(distill.shape[0])]
                                    ).double()
                counts += torch.bincount(ids, minlength=counts.numel()).double()
        finally:
            model.train(was_training)
        both = distributed.all_sum(torch.cat([sums, counts]), _dist()).cpu()
        sums, counts = both[:4], both[4:]
        n = max(float(sums[3]), 1.0)
        return {"loss": float(sums[0]) / n, "cosine": float(sums[1]) / n,
                "commitment": float(sums[2]) / n, "codebook_usage": float((counts > 0).sum()),
                "perplexity": code_perplexity(counts)}

    def export(self, out_dir: Path, tag: str, state_dict: dict[str, torch.Tensor] | None = None
               ) -> None:
        """Write the tokenizer: ``OUT/tokenizer/`` for ``last``, ``OUT/tokenizer-TAG/`` else;
        from ``state_dict`` (the loop's full state dict) or the live model."""
        name = TOKENIZER_DIR if tag == "last" else f"{TOKENIZER_DIR}-{tag}"
        if state_dict is None:
            self.distiller.export(Path(out_dir) / name)
            return
        serialization.write_pretrained(Path(out_dir) / name, self.student_cfg.to_dict(),
                                       student_state(state_dict), None,
                                       architecture=BEATsTokenizer.__name__)

    def check_resumable(self, out_dir: Path) -> None:
        """Refuse, before any work, a resumed run whose saved model does not fit this one
        (another teacher width or class count, another student): one clear line."""
        from . import state

        path = Path(out_dir) / state.STATE_DIR / state.LAST
        if not (self.cfg.resume and path.exists()):
            return
        saved = state.load(path)["model"]
        mine = self.distiller.state_dict()
        for key, value in mine.items():
            if key not in saved or saved[key].shape != value.shape:
                was = "missing" if key not in saved else tuple(saved[key].shape)
                raise ValueError(
                    f"cannot resume in {out_dir}: its model does not fit this teacher and "
                    f"student ({key}: saved {was}, now {tuple(value.shape)}; the teacher's "
                    f"target has {self.target_dim} values per patch); resume with the same "
                    "--teacher and --config, or use a new output folder")


# --------------------------------------------------------------------------- the API
@dataclass
class DistillResult:
    """What `distill` returns: the trained tokenizer (``OUT/tokenizer``) and the loop's
    `beats.train.loop.FitResult`."""

    tokenizer: BEATsTokenizer
    fit: loop.FitResult


def load_teacher(teacher: BEATs | str | Path) -> BEATs:
    """The teacher model: a `BEATs`, or anything `BEATs.from_pretrained` loads. A tokenizer
    or a missing model is one clear error."""
    if isinstance(teacher, BEATs):
        if getattr(teacher, "is_tokenizer", False):
            raise ValueError("the teacher is an acoustic tokenizer: distil from an encoder "
                             "(an SSL or a fine-tuned BEATs checkpoint)")
        return teacher
    try:
        return BEATs.from_pretrained(teacher)
    except ModelKindError:
        raise ValueError(f"teacher {teacher} is an acoustic tokenizer: distil from an encoder "
                         "(an SSL or a fine-tuned BEATs checkpoint)") from None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"teacher: {e}") from None


def distill(teacher: BEATs | str | Path, audio: Sequence[Any],
            config: DistillConfig | None = None, out_dir: str | Path = "distilled", *,
            student: BEATsConfig | None = None, teacher_name: str | None = None
            ) -> DistillResult:
    """Distil a tokenizer from ``teacher`` on ``audio`` into ``out_dir``.

    ``audio``: audio files, folders, ``.txt``/``.lst`` lists (as ``beats extract`` takes
    them), `Clip` objects or 1-D 16 kHz arrays. ``student`` overrides ``config.student``.
    Before any training: the folder is checked (another run there needs
    ``config.resume``), the teacher is loaded (a tokenizer or a missing model is an
    error), the inputs are found and their headers read (none readable is an error;
    unreadable files are recorded in ``OUT/failed.jsonl`` and skipped), and a resumed run
    must fit the saved model. Raises `beats.train.loop.TrainingError` when the loss stops
    being finite.
    """
    cfg = config or DistillConfig()
    out_dir = Path(out_dir)
    if cfg.fsdp:
        raise loop.RunError("--fsdp is not supported by distillation (the EMA codebook is "
                            "updated outside the forward pass): train data-parallel without it")
    loop.check_output_folder(out_dir, cfg.resume)
    if teacher_name is None and not isinstance(teacher, BEATs):
        teacher_name = str(teacher)
    teacher = load_teacher(teacher)
    clips, failed, sources = unlabelled_clips(audio)
    info = {"teacher": teacher_name, "inputs": sources, "output": str(out_dir),
            "clips": len(clips), "failed_files": len(failed)}
    torch.manual_seed(cfg.seed)  # the student's and estimator's initial weights
    task = DistillTask(teacher, student, cfg, clips, info)
    task.check_resumable(out_dir)
    task.failed = failed
    fit = loop.fit(task, cfg, out_dir)
    return DistillResult(BEATsTokenizer.from_pretrained(out_dir / TOKENIZER_DIR), fit)
