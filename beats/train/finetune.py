"""Fine-tuning (see docs/design/training.md, Fine-tuning): the whole BEATs with a
per-position linear head.

``finetune(model, data, FinetuneConfig(...), out_dir)`` trains, keeps the best
validation checkpoint and writes:

- ``OUT/model/``: a standard fine-tuned checkpoint in the `save_pretrained` layout
  (``finetuned_model``, ``predictor_class``, ``predictor.*``; dropout then Linear C ->
  classes at every position, logits averaged over valid positions) whose ``labels.json``
  maps class index -> class name, so ``BEATs.from_pretrained("OUT/model")`` gives
  ``logits``, ``probs`` and ``labels``, and ``beats tag -m OUT/model`` prints the names.
  Single-label models say ``predictor_activation: "softmax"`` (they were trained with
  cross-entropy); multi-label ones keep the released models' sigmoid.
  ``OUT/model-last/`` is the model after the last step.
- ``OUT/report.json``: per split (train, val, test) accuracy, macro F1 and the confusion
  matrix (single-label) or mAP (multi-label), per-class AP; best step; training time.
  Data with event times (a strong-label TSV) adds segment-based and event-based F1 and
  PSDS per split (`beats.train.strong.detection_report`), whether the training used the
  times (``strong``, frame-level: `beats.train.strong`) or only the clips' labels.
- ``OUT/metrics.jsonl``, ``OUT/config.json``, ``OUT/state/`` (see `beats.train.loop`).

The labelled set is read and split by `beats.labelled`: each file is in exactly one of
train, validation and test. Training reads random crops; evaluation reads whole clips,
those longer than `EVAL_WINDOW` seconds in windows (as ``beats extract`` does), so memory
stays that of a batch of windows whatever a file's length.

Layer-wise decay comes in two forms: ``layer_lr_decay`` (learning rate of layer L-1-i
multiplied by decay^(i+1), the effective one under Adam) and ``grad_decay`` (the released
configs' ``layer_wise_gradient_decay_ratio``, GradMultiply between layers; Adam's
per-parameter normalisation cancels a constant gradient scale almost entirely, so it acts
only through epsilon and the global-norm clip).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import serialization
from ..audio import SAMPLE_RATE, AudioError, audio_info, load_audio
from ..errors import InputError
from ..failures import expected
from ..files import atomic_write
from ..labelled import LabelledSet, read_labelled_set, read_strong_tsv, split_by_file
from ..metrics import classification_report, score
from ..model import BEATs
from ..model_output import PATCHES_PER_STEP
from ..options import option, override
from ..windows import STEP_SAMPLES, STEP_SPAN, plan_windows
from . import distributed, loop, state
from .augment import ItemAugmenter, apply_masks, mixup
from .config import EVALUATION, OPTIMISER, TrainConfig
from .data import Clip, ClipDataset, balanced_weights, collate_clips, filterbank, scan

REPORT_FILE = "report.json"
EVAL_WINDOW, EVAL_HOP = 10.0, 8.0  # seconds: longer clips are evaluated in windows
MODEL, AUGMENTATION = "the model in training", "augmentation"  # --help sections
# The labelled set of fine-tuning: `beats.labelled.LabelledSet` (this name is kept).
LabelledClips = LabelledSet


@dataclass
class FinetuneConfig(TrainConfig):
    """`TrainConfig` plus the fine-tuning recipe (defaults: a small dataset on a CPU)."""

    lr: float = override(TrainConfig, "lr", 5e-4)
    epochs: int = override(TrainConfig, "epochs", 30, help="passes over the training clips")
    patience: int = override(TrainConfig, "patience", 10)
    crop_seconds: float = option(
        10.0, help="training reads random crops of this length from longer clips "
        "(evaluation: whole clips)", gt=0, flags=("--crop", "--crop-seconds"),
        metavar="SECONDS")
    layer_lr_decay: float = option(
        0.75, help="layer-wise learning-rate decay: encoder layer L-1-i gets lr * "
        "decay^(i+1), the patch embedding and positional convolution decay^(L+1) (1: off); "
        "the effective form under Adam", gt=0, group=OPTIMISER)
    grad_decay: float = option(
        1.0, help="layer-wise gradient decay (GradMultiply, the released configs' 0.6; 1: "
        "off). Adam nearly cancels a constant gradient scale: prefer --layer-lr-decay",
        gt=0, group=OPTIMISER)
    layerdrop: float = option(0.0, help="probability of skipping each encoder layer", ge=0,
                              lt=1, group=MODEL)
    dropout: float = option(0.0, help="encoder dropout", ge=0, lt=1, group=MODEL)
    attention_dropout: float = option(0.0, help="attention dropout", ge=0, lt=1,
                                      group=MODEL)
    head_dropout: float = option(0.1, help="dropout before the class head", ge=0, lt=1,
                                 group=MODEL)
    freeze_layers: int = option(0, help="keep the patch embedding and the bottom k layers "
                                "frozen", ge=0, group=MODEL)
    mixup: float = option(0.0, help="probability that a clip is mixed with another (0: "
                          "off); makes the loss BCE (soft targets), as in the paper", ge=0,
                          lt=1, group=AUGMENTATION)
    mixup_alpha: float = option(0.8, help="mixup weight ~ Beta(alpha, alpha)", gt=0,
                                group=AUGMENTATION)
    time_mask: float = option(0.06, help="SpecAugment: 2 time masks, each up to this share "
                              "of the frames (0: off)", ge=0, lt=1, group=AUGMENTATION)
    freq_mask: int = option(16, help="SpecAugment: 2 frequency masks, each up to this many "
                            "of 128 mel bins (0: off)", ge=0, group=AUGMENTATION)
    roll: bool = option(False, help="random circular roll of the waveform",
                        group=AUGMENTATION)
    balanced: bool = option(False, help="balanced sampling for multi-label data (AST's "
                            "weights: sum of 1000 / (label count + 0.01) over a clip's "
                            "labels)", group=AUGMENTATION)
    val_fraction: float = option(0.15, help="share of each class's files for validation",
                                 ge=0, lt=1)
    test_fraction: float = option(0.2, help="share of each class's files held out for "
                                  "scoring", ge=0, lt=1)
    val_fold: str | None = option(None, help="CSV fold used for validation (best "
                                  "checkpoint)", unset="none, --val-fraction splits")
    test_fold: str | None = option(None, help="CSV fold held out for scoring",
                                   unset="none, --test-fraction splits")
    eval_batch: int = option(8, help="clips per forward pass in evaluation", ge=1,
                             group=EVALUATION)
    strong: bool = option(False, help="train on the events' times (DATA: a strong-label "
                          "TSV): frame-level BCE at every 0.16 s step, events moving with "
                          "crops and rolls; the report adds segment and event F1 and PSDS "
                          "(`beats.train.strong`)")
    weak: str | None = option(None, help="with --strong, also train on these clips' "
                              "clip-level labels (a class folder or CSV; training only)",
                              unset="none", metavar="DATA")


# --------------------------------------------------------------------------- data
def clips_of(data: LabelledSet, rows: Sequence[int]) -> list[Clip]:
    """`Clip` objects of the entries ``rows``: targets are class indices (a tuple of them
    for multi-label data)."""
    index = {c: i for i, c in enumerate(data.classes)}
    out = []
    for r in rows:
        target = tuple(index[c] for c in data.labels[r])
        out.append(Clip(data.sources[r], target if data.multilabel else target[0]))
    return out


def check_classes(data: LabelledSet, rows: Sequence[int]) -> None:
    """Clear errors for one class only and for a class with no clip."""
    if len(data.classes) < 2:
        raise InputError(f"only one class ({data.classes[0]!r}): fine-tuning a classifier "
                         "needs 2 or more classes")
    present = {c for r in rows for c in data.labels[r]}
    empty = [c for c in data.classes if c not in present]
    if empty:
        raise InputError(f"class(es) {empty} have no readable clip; add clips or remove the "
                         "class (an empty class folder, or every file of it unreadable)")


def split(data: LabelledSet, rows: list[int], cfg: FinetuneConfig
          ) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test) entries, each file in one: `beats.labelled.split_by_file`."""
    return split_by_file(data, rows, val_fraction=cfg.val_fraction,
                         test_fraction=cfg.test_fraction, val_fold=cfg.val_fold,
                         test_fold=cfg.test_fold, seed=cfg.seed)


# --------------------------------------------------------------------------- the model
def prepare_model(backbone: BEATs, classes: Sequence[str], multilabel: bool,
                  cfg: FinetuneConfig) -> BEATs:
    """A fine-tuned-layout copy of ``backbone``: its encoder weights, a new head of
    ``len(classes)`` outputs (initialised from ``cfg.seed``), the run's dropouts, and
    ``label_dict`` {index: class name}."""
    model_cfg = dataclasses.replace(
        backbone.cfg, finetuned_model=True, predictor_class=len(classes),
        predictor_activation="sigmoid" if multilabel else "softmax",
        layer_wise_gradient_decay_ratio=cfg.grad_decay, encoder_layerdrop=cfg.layerdrop,
        dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
        predictor_dropout=cfg.head_dropout, extra=dict(backbone.cfg.extra),
    )
    torch.manual_seed(cfg.seed)
    model = BEATs(model_cfg)
    weights = {k: v for k, v in backbone.state_dict().items() if not k.startswith("predictor.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith("predictor.") for k in missing), missing
    model.label_dict = dict(enumerate(classes))
    return model


def _layer_levels(model: BEATs) -> dict[str, int]:
    """Parameter name -> depth below the head: head 0, layer L-1-i -> i+1, input L+1."""
    depth = model.cfg.encoder_layers
    levels = {}
    for name, _ in model.named_parameters():
        if name.startswith("predictor."):
            levels[name] = 0
        elif name.startswith("encoder.layers."):
            levels[name] = depth - int(name.split(".")[2])
        elif name.startswith("encoder.layer_norm.") and model.cfg.layer_norm_first:
            levels[name] = 1  # the final LayerNorm of pre-norm models sits on top
        else:
            levels[name] = depth + 1
    return levels


# --------------------------------------------------------------------------- the task
class FinetuneTask(loop.Task):
    """Classification fine-tuning as a `beats.train.loop.Task`."""

    name = "finetune"
    crop_step: int | None = None  # crops start anywhere (`ClipDataset`)

    def __init__(self, model: BEATs, train: list[Clip], val: list[Clip], classes: list[str],
                 multilabel: bool, cfg: FinetuneConfig, info: dict[str, Any] | None = None,
                 identity: dict[str, Any] | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.classes = classes
        self.multilabel = multilabel
        self.info = info or {}
        self._identity = identity or {}
        augment = ItemAugmenter(roll=cfg.roll, time_mask=cfg.time_mask, freq_mask=cfg.freq_mask)
        self.train_set = ClipDataset(train, crop_seconds=cfg.crop_seconds, seed=cfg.seed,
                                     augment=augment, crop_step=self.crop_step)
        self.val_clips = val
        self.clip_seconds = cfg.crop_seconds
        if cfg.balanced and multilabel:
            self.sample_weights = balanced_weights([self.label_indices(c.target) for c in train],
                                                   len(classes))
        self.frozen = self._freeze(cfg.freeze_layers)

    def _freeze(self, k: int) -> list[torch.nn.Module]:
        """Freeze the input side and the bottom ``k`` layers; return the frozen modules."""
        if k == 0:
            return []
        m = self.model
        layers = list(m.encoder.layers)
        if k > len(layers):
            raise InputError(f"freeze-layers {k}: the model has {len(layers)} layers")
        frozen = [m.patch_embedding, m.layer_norm, m.encoder.pos_conv, *layers[:k]]
        if m.post_extract_proj is not None:
            frozen.append(m.post_extract_proj)
        if not m.cfg.layer_norm_first:
            frozen.append(m.encoder.layer_norm)  # post-norm: applied below layer 0
        for module in frozen:
            module.requires_grad_(False)
        return frozen

    def label_indices(self, target: Any) -> list[int]:
        """The class indices of a multi-label clip's target (balanced sampling)."""
        return list(target)

    def run_info(self) -> dict[str, Any]:
        return {"classes": self.classes, "multilabel": self.multilabel, **self.info}

    def identity(self) -> dict[str, Any]:
        return {"classes": self.classes, **self._identity}

    def train_mode(self) -> None:
        self.model.train()
        for module in self.frozen:
            module.eval()

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_clips(items)
        batch["targets"] = self.targets(batch["targets"])
        return batch

    def targets(self, raw: list[Any]) -> torch.Tensor:
        """(B,) class indices, or (B, K) 0/1 for multi-label."""
        if not self.multilabel:
            return torch.tensor(raw, dtype=torch.long)
        out = torch.zeros(len(raw), len(self.classes))
        for i, labels in enumerate(raw):
            out[i, list(labels)] = 1.0
        return out

    def parameter_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        decay = self.cfg.layer_lr_decay
        levels = _layer_levels(self.model)
        groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault((levels[name], p.ndim > 1), []).append(p)
        return [{"params": ps, "lr_scale": decay**level,
                 "weight_decay": cfg.weight_decay if decayed else 0.0}
                for (level, decayed), ps in sorted(groups.items())]

    def forward_loss(self, batch: dict[str, Any], denominator: float
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        wav, lengths, targets = batch["wav"], batch["lengths"], batch["targets"]
        soft = self.multilabel or self.cfg.mixup > 0
        if soft and not self.multilabel:
            targets = F.one_hot(targets, len(self.classes)).float()
        if self.cfg.mixup > 0:
            wav, lengths, targets = mixup(wav, lengths, targets, self.cfg.mixup,
                                          self.cfg.mixup_alpha)
        features, frames = filterbank(wav, lengths, self.model.cfg)
        features = apply_masks(features, batch.get("time_masks"), batch.get("freq_masks"))
        logits = self.model.forward_fbank(features, frames).logits
        assert logits is not None
        if soft:
            per_clip = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            loss = per_clip.mean(dim=1).sum() / denominator
        else:
            loss = F.cross_entropy(logits, targets, reduction="sum") / denominator
        metrics = {}
        if not self.multilabel:
            truth = targets.argmax(dim=1) if soft else targets
            correct = (logits.argmax(dim=1) == truth).sum().float()
            metrics["accuracy"] = torch.stack([correct, torch.tensor(float(len(truth)),
                                                                     device=correct.device)])
        return loss, metrics

    # ------------------------------------------------------------------ evaluation
    def predict(self, clips: list[Clip]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, K) float32, targets) of whole clips, in order, leaving out clips that
        cannot be read; model in eval mode. Clips up to `EVAL_WINDOW` seconds run in
        batches of ``eval_batch``; a longer one runs alone, in windows (`_windowed`)."""
        long = [i for i, c in enumerate(clips) if (c.duration or 0.0) > EVAL_WINDOW]
        short = sorted(set(range(len(clips))) - set(long),
                       key=lambda i: -(clips[i].duration or 0.0))
        batches = [short[i : i + self.cfg.eval_batch]
                   for i in range(0, len(short), self.cfg.eval_batch)]
        dataset = ClipDataset(clips, train=False)
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_clips)
        self.model.eval()
        device = next(self.model.parameters()).device
        logits = torch.zeros(len(clips), len(self.classes))
        kept = torch.zeros(len(clips), dtype=torch.bool)
        with torch.no_grad():
            for batch in loader:
                if batch["count"] == 0:
                    continue
                lengths = batch["lengths"].to(device)
                features, frames = filterbank(batch["wav"].to(device), lengths, self.model.cfg)
                out = self.model.forward_fbank(features, frames)
                logits[batch["index"]] = out.logits.float().cpu()
                kept[batch["index"]] = True
            for i in long:
                try:
                    logits[i] = self._windowed(clips[i])
                except Exception as e:
                    if not expected(e):
                        raise  # a bug, not the file
                    continue  # unreadable now: left out, as in a batch
                kept[i] = True
        targets = self.targets([c.target for c in clips])
        return logits[kept], targets[kept]

    def _windowed(self, clip: Clip) -> torch.Tensor:
        """(K,) logits of a long clip: the class head's scores at every position, averaged,
        as for a whole clip. The positions come from windows of `EVAL_WINDOW` seconds every
        `EVAL_HOP` on the clip's 160 ms steps, each step taken from one window, as ``beats
        extract`` stitches them (`beats.windows.plan_windows`); ``eval_batch`` windows run
        per forward pass, and each batch's samples are read on their own: memory is that of
        one batch of windows, whatever the clip's length."""
        model = self.model
        assert model.predictor is not None
        device = next(model.parameters()).device
        duration = clip.duration if clip.duration is not None else audio_info(clip.source).duration
        windows = plan_windows(round(duration * SAMPLE_RATE), EVAL_WINDOW, EVAL_HOP)
        span = STEP_SAMPLES * (windows[0].stop - windows[0].start - 1) + STEP_SPAN
        total = torch.zeros(len(self.classes), dtype=torch.float64)
        positions = 0
        for first in range(0, len(windows), self.cfg.eval_batch):
            group = windows[first : first + self.cfg.eval_batch]
            lo = STEP_SAMPLES * group[0].start
            part = _samples(clip, lo, STEP_SAMPLES * group[-1].start + span)
            wav = torch.stack([torch.from_numpy(part[STEP_SAMPLES * w.start - lo :][:span])
                               for w in group]).to(device)
            lengths = torch.full((len(group),), span, dtype=torch.long, device=device)
            features, frames = filterbank(wav, lengths, model.cfg)
            x = model.forward_fbank(features, frames).features
            for i, w in enumerate(group):
                kept = x[i, PATCHES_PER_STEP * (w.keep_start - w.start) :
                         PATCHES_PER_STEP * (w.keep_stop - w.start)]
                total += model.predictor(kept).float().sum(dim=0).double().cpu()
                positions += kept.shape[0]
        return (total / positions).float()

    def report(self, clips: list[Clip]) -> dict[str, Any]:
        logits, targets = self.predict(clips)
        out = classification_report(logits, targets, self.multilabel, self.classes)
        if self.multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, targets)
        else:
            loss = F.cross_entropy(logits, targets)
        out["loss"] = float(loss)
        return out

    def evaluate(self) -> dict[str, float] | None:
        if not self.val_clips:
            return None
        r = self.report(self.val_clips)
        out = {"score": score(r), "tiebreak": -r["loss"], "loss": r["loss"]}
        out.update({k: r[k] for k in ("accuracy", "macro_f1", "mAP") if k in r})
        return out

    def export(self, out_dir: Path, tag: str, state_dict: dict[str, torch.Tensor]) -> None:
        names = ["model"] if tag == "best" else ["model-last"]
        if tag == "last" and not self.val_clips:
            names.append("model")  # no validation: the last model is the model
        for name in names:
            serialization.write_pretrained(out_dir / name, self.model.cfg.to_dict(), state_dict,
                                           self.model.label_dict, architecture="BEATs")


# --------------------------------------------------------------------------- the API
@dataclass
class FinetuneResult:
    """What `finetune` returns: the fine-tuned model (best validation weights), the
    report written to ``OUT/report.json``, and the loop's `FitResult`."""

    model: BEATs
    report: dict[str, Any]
    fit: loop.FitResult


def finetune(model: BEATs | str | Path, data: LabelledSet | str | Path,
             config: FinetuneConfig | None = None, out_dir: str | Path = "finetuned",
             *, cv: bool = False, model_name: str | None = None) -> FinetuneResult:
    """Fine-tune ``model`` (a `BEATs` or anything `BEATs.from_pretrained` takes) on
    ``data`` (a `beats.labelled.LabelledSet`, or a class folder, CSV or strong-label TSV
    path) into ``out_dir``.

    Before any training: the folder is checked (another run there needs
    ``config.resume``; a resumed run needs the same settings, model, classes and data), every
    file's header is read (unreadable files are recorded in ``OUT/failed.jsonl`` and
    skipped), and the classes are checked (two or more, none without a clip). ``cv=True``
    first trains one model per fold into ``OUT/cv/fold-F/`` (the fold as test set) and
    reports their mean. Resuming a finished run returns it as it was written
    (``result.fit.finished_before``).
    """
    cfg = config or FinetuneConfig()
    out_dir = Path(out_dir)
    loop.check_output_folder(out_dir, cfg.resume)
    d = distributed.setup(cfg.device)  # held for the whole run (folds, report)
    try:
        return _finetune(model, data, cfg, out_dir, cv, model_name)
    finally:
        distributed.teardown(d)


def _finetune(model: BEATs | str | Path, data: LabelledSet | str | Path,
              cfg: FinetuneConfig, out_dir: Path, cv: bool, model_name: str | None
              ) -> FinetuneResult:
    from . import strong  # it builds on FinetuneTask

    source = None
    if cfg.weak is not None and not cfg.strong:
        raise InputError("--weak adds clip-labelled clips to --strong training: give "
                         "--strong with a strong-label TSV, or put the clips in DATA")
    needs_times = ("--strong trains on event times: DATA must be a strong-label TSV "
                   "(tab-separated header filename onset offset event_label)")
    if not isinstance(data, LabelledSet):
        source = str(data)
        if not cfg.strong:
            data = read_labelled_set(data)
        elif Path(data).suffix.lower() != ".tsv":
            raise InputError(needs_times)
        else:  # one class is a detector (sigmoid), where a classifier needs two
            data = read_strong_tsv(data)
    if cfg.strong and data.events is None:
        raise InputError(needs_times)
    if not isinstance(model, BEATs):
        model_name = model_name or str(model)
        model = BEATs.from_pretrained(model)
    clips, failed = scan(clips_of(data, range(len(data))))
    readable = {id(c.source) for c in clips}
    rows = [r for r in range(len(data)) if id(data.sources[r]) in readable]
    durations = {id(c.source): c.duration for c in clips}
    if not cfg.strong:
        check_classes(data, rows)
    elif not rows:
        raise InputError("no file of the strong labels could be read (see failed.jsonl)")
    info = {"data": source, "model": model_name, "output": str(out_dir)}
    identity = {"model": model_identity(model), "data": data.digest()}
    extra: list[Clip] = []
    if cfg.weak is not None:
        weak = strong.read_weak(cfg.weak, data.classes, data)
        extra, weak_failed = scan(clips_of(weak, range(len(weak))))
        failed = failed + weak_failed
        identity["weak"] = weak.digest()
        info["weak"] = {"data": cfg.weak, "clips": len(extra)}
    folds_report = None
    if cv:
        folds = sorted({data.folds[r] for r in rows if data.folds[r] is not None})
        if len(folds) < 2:
            raise InputError("--cv needs a fold for every clip (CSV fold column), 2 or more")
        per_fold = {}
        for fold in folds:  # a validation fold that is the test fold: a share instead
            val_fold = cfg.val_fold if cfg.val_fold != fold else None
            fold_cfg = dataclasses.replace(cfg, test_fold=fold, val_fold=val_fold)
            per_fold[fold] = _run(model, data, rows, durations, failed, fold_cfg,
                                  out_dir / "cv" / f"fold-{fold}", info,
                                  identity, extra=extra).report["test"]
        keys = [k for k in ("accuracy", "macro_f1", "mAP") if k in per_fold[folds[0]]]
        folds_report = {"folds": per_fold, "mean": {
            k: float(np.mean([per_fold[f][k] for f in folds])) for k in keys}}
    return _run(model, data, rows, durations, failed, cfg, out_dir, info, identity,
                folds_report, extra)


def model_identity(model: BEATs) -> dict[str, Any]:
    """What identifies a starting model for ``--resume``: its config and `weights_digest`."""
    return {**model.cfg.to_dict(), "weights": state.weights_digest(model)}


def _run(backbone: BEATs, data: LabelledSet, rows: list[int], durations: dict[int, float],
         failed: list[tuple[str, str]], cfg: FinetuneConfig, out_dir: Path,
         info: dict[str, Any], identity: dict[str, Any],
         folds_report: dict[str, Any] | None = None, extra: Sequence[Clip] = ()
         ) -> FinetuneResult:
    from . import strong

    train, val, test = split(data, rows, cfg)
    if not data.multilabel:
        check_classes(data, train)

    def clips(rs: list[int]) -> list[Clip]:
        out = strong.strong_clips(data, rs) if cfg.strong else clips_of(data, rs)
        for c in out:
            c.duration = durations[id(c.source)]
        return out

    model = prepare_model(backbone, data.classes, data.multilabel, cfg)
    info = {**info, "output": str(out_dir), "clips": len(rows), "failed_files": len(failed),
            "splits": {"train": len(train), "val": len(val), "test": len(test)}}
    kind = strong.StrongTask if cfg.strong else FinetuneTask
    task = kind(model, clips(train) + list(extra), clips(val), data.classes, data.multilabel,
                cfg, info, identity)
    task.failed = failed
    fit = loop.fit(task, cfg, out_dir)
    if fit.finished_before:  # its record stands as it was written
        report = json.loads((out_dir / REPORT_FILE).read_text())
        return FinetuneResult(BEATs.from_pretrained(out_dir / "model"), report, fit)
    best = out_dir / state.STATE_DIR / state.BEST
    if best.exists():
        loop.load_model_weights(task.model, state.load(best)["model"], cfg)
    d = distributed.setup(cfg.device)
    report: dict[str, Any] = {
        "classes": data.classes, "multilabel": data.multilabel, "clips": len(rows),
        "train_clips": len(train), "val_clips": len(val), "test_clips": len(test),
        "failed_files": [{"path": p, "error": e} for p, e in fit.failed],
        "steps": fit.steps, "best_step": fit.best_step, "stopped_early": fit.stopped_early,
        "training_seconds": round(fit.seconds, 3), "strong": cfg.strong,
    }
    if extra:
        report["weak_clips"] = len(extra)
    for name, rs in (("train", train), ("val", val), ("test", test)):
        if rs:
            report[name] = task.report(clips(rs))
            if data.events is not None and not cfg.strong:  # clip-level training, timed data
                files = [(data.sources[r], durations[id(data.sources[r])], data.events[r])
                         for r in rs]
                report[name].update(strong.detection_report(
                    task.model, files, data.classes, eval_batch=cfg.eval_batch))
    if folds_report is not None:
        report["cv"] = folds_report
    if d.main:
        _write_report(out_dir, report)
    distributed.barrier(d)
    loop.finish(out_dir, fit)
    return FinetuneResult(BEATs.from_pretrained(out_dir / "model"), report, fit)


def _samples(clip: Clip, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of a clip at 16 kHz, float32, zero-padded past its end; a
    file is read from ``start`` (seeked, not decoded from its beginning)."""
    if isinstance(clip.source, (str, Path)):
        wav, _ = load_audio(clip.source, offset=start / SAMPLE_RATE,
                            duration=(stop - start) / SAMPLE_RATE)
    else:
        source = clip.source
        if isinstance(source, torch.Tensor):
            source = source.detach().cpu().numpy()
        wav = np.asarray(source, dtype=np.float32)[start:stop]
    wav = np.ascontiguousarray(wav[: stop - start], dtype=np.float32)
    if len(wav) < stop - start:
        wav = np.pad(wav, (0, stop - start - len(wav)))
    if not np.isfinite(wav).all():
        raise AudioError(f"{clip.name}: the audio holds NaN or Inf samples")
    return wav


def _write_report(out_dir: Path, report: dict[str, Any]) -> None:
    with atomic_write(out_dir / REPORT_FILE, "w") as f:
        json.dump(report, f, indent=2)
