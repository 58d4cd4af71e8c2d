"""Tokenizer distillation on the training loop: ``beats distill`` (see
docs/design/training.md, Tokenizer distillation).

``distill(teacher, audio, DistillConfig(...), out_dir)`` trains a student tokenizer on
unlabelled audio with `beats.train.loop.fit` and writes ``OUT/tokenizer/``: a tokenizer
checkpoint that `BEATsTokenizer.from_pretrained` and ``beats tokenize -m`` load (the
estimator is dropped), plus the loop's ``metrics.jsonl`` (``loss``, ``cosine``,
``commitment``, ``codebook_usage``, ``codebook_usage_recent``, ``perplexity``, ...),
``config.json`` and ``state/``. The model, the teacher targets and the codebook's
timing are described in `beats.train.distiller`.

How `DistillTask` uses the loop:

- The teacher is frozen, in eval mode and outside ``task.model`` (the `TokenizerDistiller`):
  never trained, saved in checkpoints, handed to the optimiser nor synchronised. The
  target is the last-layer output of an SSL teacher or the per-position class logits of
  a fine-tuned one (``target="auto"`` picks by whether it has a class head).
- Each batch's filterbank is computed once (`beats.train.data.filterbank`, float32) and fed
  to both models' ``forward_fbank`` (the student takes the teacher's normalisation).
- A batch's loss terms (``count``) are its valid patches, known from the clip lengths.
- ``before_step``: the codebook's k-means initialisation, before the first step's forwards,
  with every process taking part even when its share is empty (a collective inside a
  forward pass could hang); and each step starts by forgetting the last step's vectors.
- ``after_step``: the step's one EMA update (statistics of all micro-batches and
  processes) and the codebook health numbers the loop logs; ``discard_step``: a step that
  float16 loss scaling skipped does not move the codebook.
- ``evaluate`` (with held-out audio): ``val_cosine`` (the score), ``val_loss``,
  ``val_commitment``, ``val_codebook_usage``, ``val_perplexity`` on fixed crops; the best
  step's tokenizer goes to ``OUT/tokenizer-best/``.
- FSDP is refused: the codebook is updated outside the forward pass.
"""


from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import serialization
from ..config import BEATsConfig
from ..errors import InputError, NotFoundError
from ..hub import ModelKindError
from ..model import BEATs
from ..options import option, override
from ..quantizer import code_perplexity
from ..tokenizer import BEATsTokenizer
from . import distributed, loop, state
from .data import Clip, collate_clips, filterbank
from .distiller import (
    PRESETS,
    TARGETS,
    Estimator,
    TokenizerDistiller,
    current_dist,
    estimator_config,
    resolve_student,
    student_config,
    student_state,
    target_kind,
    teacher_targets,
    valid_patches,
)
from .unlabelled import (
    UnlabelledConfig,
    audio_dataset,
    check_audio,
    files_digest,
    find_audio,
    heldout_batches,
    heldout_dataset,
)

__all__ = [
    "PRESETS", "DistillConfig", "DistillResult", "DistillTask", "Estimator",
    "TokenizerDistiller", "distill", "estimator_config", "load_teacher", "resolve_student",
    "student_config", "target_kind", "teacher_targets", "valid_patches",
]

TOKENIZER_DIR = "tokenizer"
RECIPE = "codebook and estimator"  # a --help section


@dataclass
class DistillConfig(UnlabelledConfig):
    """`UnlabelledConfig` (the loop's settings, ``crop_seconds``, ``eval_batch``) plus the
    distillation recipe. Defaults: the paper's optimiser (peak lr 5e-5 with an SSL
    teacher, AdamW (0.9, 0.98), weight decay 0.01, linear decay after 8 % warm-up
    (ESPnet's 32k of 400k), clip 1.0); size the batch with ``batch_seconds`` (the paper:
    1400 s per step). ``seed`` also seeds the student's initialisation, k-means and code
    restarts."""

    epochs: int = override(UnlabelledConfig, "epochs", help="passes over the audio files")
    lr: float = override(UnlabelledConfig, "lr", 5e-5)
    schedule: str = override(UnlabelledConfig, "schedule", "linear")
    warmup_ratio: float = override(UnlabelledConfig, "warmup_ratio", 0.08)
    eval_every: int = override(UnlabelledConfig, "eval_every",
                               help="steps between held-out evaluations (0: each epoch; "
                               "needs --heldout)")
    student: str = option(
        "base", help="the student tokenizer's size: tiny, base (the released tokenizers' "
        '12 x 768), or a JSON file {"preset": "tiny", BEATsConfig keys to change, e.g. '
        '"quant_n": 256}', flags=("--config",))
    target: str = option(
        "auto", help="what the student learns to predict: auto (logits for a teacher with a "
        "class head, else features), features (the teacher's last-layer output at every "
        "patch) or logits (a fine-tuned teacher's class logits at every patch, before "
        "pooling)", choices=TARGETS)
    beta: float = option(1.0, help="commitment loss weight (the original 1.0; ESPnet 10)",
                         ge=0, group=RECIPE)
    decay: float = option(0.99, help="codebook EMA decay per optimiser step", gt=0, lt=1,
                          group=RECIPE)
    kmeans_iters: int = option(10, help="k-means iterations of the codebook initialisation "
                               "(on the first step's clips)", ge=1, group=RECIPE)
    estimator_layers: int = option(3, help="Transformer layers of the estimator (dropped "
                                   "after training)", ge=1, group=RECIPE)
    restart_after: int = option(0, help="restart codes unused for this many steps from the "
                                "step's encoder outputs (0: never, as the original)", ge=0,
                                group=RECIPE)
    usage_window: int = option(100, help="steps counted by codebook_usage_recent in "
                               "metrics.jsonl", ge=1, group=RECIPE)


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
        heldout: clips scored every ``eval_every`` steps (fixed crops): ``val_cosine``
            (the score), ``val_loss``, ``val_commitment``, ``val_codebook_usage``,
            ``val_perplexity``.
        info: extra entries for ``OUT/config.json`` (teacher name, inputs, ...).
    """

    name = "distill"

    def __init__(self, teacher: BEATs, student_cfg: BEATsConfig | None = None,
                 cfg: DistillConfig | None = None, clips: Sequence[Clip] = (),
                 heldout: Sequence[Clip] = (), info: dict[str, Any] | None = None) -> None:
        cfg = cfg if cfg is not None else DistillConfig()
        self.cfg = cfg
        if getattr(teacher, "is_tokenizer", False):
            raise InputError("the teacher is an acoustic tokenizer: distil from an encoder "
                             "(an SSL or a fine-tuned BEATs checkpoint)")
        self.teacher = teacher.freeze()
        self.kind = target_kind(teacher, cfg.target)
        student_cfg = student_cfg if student_cfg is not None else resolve_student(
            cfg.student, teacher.cfg)
        if student_cfg.input_patch_size != teacher.cfg.input_patch_size:
            raise InputError(f"the student's patches ({student_cfg.input_patch_size}) must "
                             f"match the teacher's ({teacher.cfg.input_patch_size}): one "
                             "target per student patch")
        self.student_cfg = student_cfg
        self.target_dim = (teacher.cfg.predictor_class if self.kind == "logits"
                           else teacher.cfg.encoder_embed_dim)
        self.distiller = TokenizerDistiller(
            student_cfg, teacher.cfg, self.target_dim, beta=cfg.beta, decay=cfg.decay,
            kmeans_iters=cfg.kmeans_iters, estimator_layers=cfg.estimator_layers,
            restart_after=cfg.restart_after, usage_window=cfg.usage_window, seed=cfg.seed)
        self.model: nn.Module = self.distiller
        self.train_set = audio_dataset(clips, cfg)
        self.heldout = heldout_dataset(heldout, cfg) if len(heldout) else None
        self.clips, self.heldout_clips = clips, heldout
        self.clip_seconds = cfg.crop_seconds
        self.info = info or {}

    def run_info(self) -> dict[str, Any]:
        return {"target": self.kind, "target_dim": self.target_dim,
                "student_config": self.student_cfg.to_dict(), **self.info}

    def identity(self) -> dict[str, Any]:
        teacher = {**self.teacher.cfg.to_dict(), "weights": state.weights_digest(self.teacher)}
        return {"teacher": teacher, "student": self.student_cfg.to_dict(),
                "audio": files_digest(self.clips), "heldout": files_digest(self.heldout_clips)}

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

    def evaluate(self) -> dict[str, float] | None:
        """Held-out numbers (`measure`), each process scoring its share of the batches."""
        if self.heldout is None:
            return None
        d = current_dist()
        keys = heldout_batches(len(self.heldout), self.cfg.eval_batch)[d.rank :: d.world]
        batches = (b for b in map(self.collate, ([self.heldout[k] for k in ks] for ks in keys))
                   if b["count"] > 0)
        out = self.measure(batches)
        return {"score": out["cosine"], **out}

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
        both = distributed.all_sum(torch.cat([sums, counts]), current_dist()).cpu()
        sums, counts = both[:4], both[4:]
        n = max(float(sums[3]), 1.0)
        return {"loss": float(sums[0]) / n, "cosine": float(sums[1]) / n,
                "commitment": float(sums[2]) / n, "codebook_usage": float((counts > 0).sum()),
                "perplexity": code_perplexity(counts)}

    def export(self, out_dir: Path, tag: str, state_dict: dict[str, torch.Tensor] | None = None
               ) -> None:
        """Write the tokenizer: ``OUT/tokenizer/`` for ``last`` (the last step),
        ``OUT/tokenizer-best/`` for ``best`` (the best held-out cosine); from
        ``state_dict`` (the loop's full state dict) or the live model."""
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
        saved = {k: tuple(v.shape) for k, v in state.load(path)["model"].items()}
        mine = {k: tuple(v.shape) for k, v in self.distiller.state_dict().items()}
        for key in sorted(saved.keys() | mine.keys()):
            if saved.get(key) != mine.get(key):
                raise InputError(
                    f"cannot resume in {out_dir}: its model does not fit this teacher and "
                    f"student ({key}: saved {saved.get(key, 'none')}, now "
                    f"{mine.get(key, 'none')}; this teacher's target has {self.target_dim} "
                    "values per patch); resume with the same --teacher and --config, or use "
                    "a new output folder")


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
            raise InputError("the teacher is an acoustic tokenizer: distil from an encoder "
                             "(an SSL or a fine-tuned BEATs checkpoint)")
        return teacher
    try:
        return BEATs.from_pretrained(teacher)
    except ModelKindError:
        raise InputError(f"teacher {teacher} is an acoustic tokenizer: distil from an encoder "
                         "(an SSL or a fine-tuned BEATs checkpoint)") from None
    except FileNotFoundError as e:
        raise NotFoundError(f"teacher: {e}") from None


def distill(teacher: BEATs | str | Path, audio: Sequence[Any],
            config: DistillConfig | None = None, out_dir: str | Path = "distilled", *,
            heldout: Sequence[Any] = (), student: BEATsConfig | None = None,
            teacher_name: str | None = None) -> DistillResult:
    """Distil a tokenizer from ``teacher`` on ``audio`` into ``out_dir``.

    ``audio`` (and ``heldout``): audio files, folders, ``.txt``/``.lst`` lists (as
    ``beats extract`` takes them), `Clip` objects or 1-D 16 kHz arrays. ``student``
    overrides ``config.student``. Before any training: the folder is checked (another run
    there needs ``config.resume``), the teacher is loaded (a tokenizer or a missing model
    is an error), the inputs are found (none is an error), and a resumed run must fit the
    saved model and the earlier run's settings, teacher, student and audio. Files that
    cannot be read are left out when drawn and recorded in ``OUT/failed.jsonl``; when none
    can be read, `beats.train.loop.RunError` is raised before training. Raises
    `beats.train.loop.TrainingError` when the loss stops being finite. Resuming a finished
    run returns it as it was written (``result.fit.finished_before``).
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
    clips, sources = _clips(audio, "AUDIO")
    held, held_sources = _clips(heldout, "--heldout") if len(heldout) else ([], [])
    info = {"teacher": teacher_name, "audio": sources, "heldout": held_sources,
            "output": str(out_dir), "clips": len(clips), "heldout_clips": len(held)}
    torch.manual_seed(cfg.seed)  # the student's and estimator's initial weights
    task = DistillTask(teacher, student, cfg, clips, held, info)
    task.check_resumable(out_dir)
    per_step, _ = loop.steps_for(cfg, len(clips), cfg.crop_seconds)
    task.failed, task.readable = check_audio(clips, cfg, per_step)
    fit = loop.fit(task, cfg, out_dir)
    loop.finish(out_dir, fit)
    return DistillResult(BEATsTokenizer.from_pretrained(out_dir / TOKENIZER_DIR), fit)


def _clips(inputs: Sequence[Any], what: str) -> tuple[list[Clip], list[str]]:
    """Clips of paths (`find_audio`), `Clip` objects and arrays; the inputs as text."""
    clips: list[Clip] = []
    paths = [x for x in inputs if isinstance(x, (str, Path))]
    for x in inputs:
        if isinstance(x, Clip):
            clips.append(x)
        elif not isinstance(x, (str, Path)):
            clips.append(Clip(x))
    if paths or not clips:
        clips.extend(find_audio(paths, what))
    return clips, [str(x) if isinstance(x, (str, Path)) else "<array>" for x in inputs]
