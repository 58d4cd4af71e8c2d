"""Fine-tuning (spec section 5): the whole BEATs with a per-position linear head.

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
- ``OUT/metrics.jsonl``, ``OUT/config.json``, ``OUT/state/`` (see `beats.train.loop`).

Layer-wise decay comes in two forms: ``layer_lr_decay`` (learning rate of layer L-1-i
multiplied by decay^(i+1), the effective one under Adam) and ``grad_decay`` (the released
configs' ``layer_wise_gradient_decay_ratio``, GradMultiply between layers; Adam's
per-parameter normalisation cancels a constant gradient scale almost entirely, so it acts
only through epsilon and the global-norm clip).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import serialization
from ..files import atomic_write
from ..metrics import classification_report, score
from ..model import BEATs
from ..probe import read_labelled_set, stratified_split
from . import distributed, loop, state
from .augment import ItemAugmenter, apply_masks, mixup
from .config import TrainConfig
from .data import Clip, ClipDataset, balanced_weights, collate_clips, filterbank, scan

REPORT_FILE = "report.json"


@dataclass
class FinetuneConfig(TrainConfig):
    """`TrainConfig` plus the fine-tuning recipe (defaults: a small dataset on a CPU).

    Attributes:
        crop_seconds: training reads random crops of this length from longer clips.
        layer_lr_decay: learning rate of encoder layer L-1-i is lr * decay^(i+1); the
            patch embedding and positional convolution get decay^(L+1) (1: off).
        grad_decay: GradMultiply ratio between layers (the released 0.6; 1: off).
        layerdrop, dropout, attention_dropout, head_dropout: the model's dropouts in
            training (written into the exported config).
        freeze_layers: keep the patch embedding and the bottom k layers frozen.
        mixup, mixup_alpha: probability that a clip is mixed, Beta(alpha, alpha) weight;
            mixup makes the loss BCE (soft targets), as in the paper.
        time_mask: each of 2 time masks is up to this share of the frames (0: off).
        freq_mask: each of 2 frequency masks is up to this many mel bins (0: off).
        roll: random circular roll of the waveform.
        balanced: AST's balanced sampling (multi-label data only).
        val_fraction, test_fraction, val_fold, test_fold: the splits (as `beats probe`).
        eval_batch: clips per forward pass in evaluation.
    """

    lr: float = 5e-4
    epochs: int = 30
    batch_size: int = 16
    patience: int = 10
    crop_seconds: float = 10.0
    layer_lr_decay: float = 0.75
    grad_decay: float = 1.0
    layerdrop: float = 0.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    head_dropout: float = 0.1
    freeze_layers: int = 0
    mixup: float = 0.0
    mixup_alpha: float = 0.8
    time_mask: float = 0.06
    freq_mask: int = 16
    roll: bool = False
    balanced: bool = False
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    val_fold: str | None = None
    test_fold: str | None = None
    eval_batch: int = 8

    def validate(self) -> None:
        super().validate()
        for name in ("layer_lr_decay", "grad_decay", "mixup_alpha", "crop_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)!r}: must be "
                                 "positive")
        for name in ("layerdrop", "dropout", "attention_dropout", "head_dropout", "mixup",
                     "time_mask", "val_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)!r}: must lie "
                                 "in [0, 1)")
        if self.freeze_layers < 0 or self.freq_mask < 0 or self.eval_batch < 1:
            raise ValueError("freeze-layers and freq-mask must be >= 0, eval-batch >= 1")


# --------------------------------------------------------------------------- data
@dataclass
class LabelledClips:
    """Labelled audio for fine-tuning: ``sources[i]`` (a path, or 16 kHz samples) has the
    class names ``labels[i]`` and an optional ``folds[i]``.

    Build it with `from_items` (lists of (path or array, label(s)[, fold])) or `read`
    (a folder with one subfolder per class, or a CSV, as ``beats probe`` takes them).
    """

    sources: list[Any]
    labels: list[tuple[str, ...]]
    folds: list[str | None]
    classes: list[str]
    multilabel: bool

    @classmethod
    def from_items(cls, items: Iterable[Sequence[Any]], classes: Sequence[str] | None = None,
                   multilabel: bool | None = None) -> LabelledClips:
        """``items``: (source, label) or (source, label, fold); a label is a class name or
        a list of names (multi-label). ``classes`` fixes the class order (default: sorted)."""
        sources, labels, folds = [], [], []
        for item in items:
            source, label = item[0], item[1]
            names = (label,) if isinstance(label, str) else tuple(label)
            sources.append(source)
            labels.append(tuple(sorted(set(names))))
            folds.append(None if len(item) < 3 or item[2] is None else str(item[2]))
        if not sources:
            raise ValueError("the labelled set is empty")
        found = sorted({c for ls in labels for c in ls})
        classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the classes {classes}")
        if multilabel is None:
            multilabel = any(len(ls) != 1 for ls in labels)
        return cls(sources, labels, folds, classes, multilabel)

    @classmethod
    def read(cls, source: str | Path) -> LabelledClips:
        """A class-per-subfolder folder or a CSV (see `beats.probe.read_csv`)."""
        data = read_labelled_set(source)
        return cls(list(data.paths), list(data.labels), list(data.folds), list(data.classes),
                   data.multilabel)

    def clips(self, rows: Sequence[int]) -> list[Clip]:
        index = {c: i for i, c in enumerate(self.classes)}
        out = []
        for r in rows:
            target = tuple(index[c] for c in self.labels[r])
            out.append(Clip(self.sources[r], target if self.multilabel else target[0]))
        return out


def check_classes(data: LabelledClips, rows: Sequence[int]) -> None:
    """Clear errors for one class only and for a class with no clip."""
    if len(data.classes) < 2:
        raise ValueError(f"only one class ({data.classes[0]!r}): fine-tuning a classifier "
                         "needs 2 or more classes")
    present = {c for r in rows for c in data.labels[r]}
    empty = [c for c in data.classes if c not in present]
    if empty:
        raise ValueError(f"class(es) {empty} have no readable clip; add clips or remove the "
                         "class (an empty class folder, or every file of it unreadable)")


def split(data: LabelledClips, rows: list[int], cfg: FinetuneConfig
          ) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test) rows: folds when named, else stratified fractions (as probe)."""
    if cfg.test_fold is not None:
        test = [r for r in rows if data.folds[r] == cfg.test_fold]
        rest = [r for r in rows if data.folds[r] != cfg.test_fold]
        if not test:
            raise ValueError(f"no clip is in test fold {cfg.test_fold!r}")
    else:
        rest, test = stratified_split(data.labels, rows, cfg.test_fraction, cfg.seed)
    if cfg.val_fold is not None:
        val = [r for r in rest if data.folds[r] == cfg.val_fold]
        train = [r for r in rest if data.folds[r] != cfg.val_fold]
        if not val:
            raise ValueError(f"no clip is in validation fold {cfg.val_fold!r}")
    else:
        train, val = stratified_split(data.labels, rest, cfg.val_fraction, cfg.seed + 1)
    if not train:
        raise ValueError("no training clips left after the validation/test split")
    return train, val, test


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

    def __init__(self, model: BEATs, train: list[Clip], val: list[Clip], classes: list[str],
                 multilabel: bool, cfg: FinetuneConfig, info: dict[str, Any] | None = None
                 ) -> None:
        self.model = model
        self.cfg = cfg
        self.classes = classes
        self.multilabel = multilabel
        self.info = info or {}
        augment = ItemAugmenter(roll=cfg.roll, time_mask=cfg.time_mask, freq_mask=cfg.freq_mask)
        self.train_set = ClipDataset(train, crop_seconds=cfg.crop_seconds, seed=cfg.seed,
                                     augment=augment)
        self.val_clips = val
        self.clip_seconds = cfg.crop_seconds
        if cfg.balanced and multilabel:
            self.sample_weights = balanced_weights([c.target for c in train], len(classes))
        self.frozen = self._freeze(cfg.freeze_layers)

    def _freeze(self, k: int) -> list[torch.nn.Module]:
        """Freeze the input side and the bottom ``k`` layers; return the frozen modules."""
        if k == 0:
            return []
        m = self.model
        layers = list(m.encoder.layers)
        if k > len(layers):
            raise ValueError(f"freeze-layers {k}: the model has {len(layers)} layers")
        frozen = [m.patch_embedding, m.layer_norm, m.encoder.pos_conv, *layers[:k]]
        if m.post_extract_proj is not None:
            frozen.append(m.post_extract_proj)
        if not m.cfg.layer_norm_first:
            frozen.append(m.encoder.layer_norm)  # post-norm: applied below layer 0
        for module in frozen:
            module.requires_grad_(False)
        return frozen

    def run_info(self) -> dict[str, Any]:
        return {"classes": self.classes, "multilabel": self.multilabel, **self.info}

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
        """(logits (N, K) float32, targets) of whole clips, in order; model in eval mode."""
        dataset = ClipDataset(clips, train=False)
        order = sorted(range(len(clips)), key=lambda i: -(clips[i].duration or 0.0))
        batches = [order[i : i + self.cfg.eval_batch]
                   for i in range(0, len(order), self.cfg.eval_batch)]
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
        targets = self.targets([c.target for c in clips])
        return logits[kept], targets[kept]

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


def finetune(model: BEATs | str | Path, data: LabelledClips | str | Path,
             config: FinetuneConfig | None = None, out_dir: str | Path = "finetuned",
             *, cv: bool = False, model_name: str | None = None) -> FinetuneResult:
    """Fine-tune ``model`` (a `BEATs` or anything `BEATs.from_pretrained` takes) on
    ``data`` (`LabelledClips`, or a folder / CSV path) into ``out_dir``.

    Before any training: the folder is checked (another run there needs
    ``config.resume``), every file's header is read (unreadable files are recorded in
    ``OUT/failed.jsonl`` and skipped), and the classes are checked (two or more, none
    without a clip). ``cv=True`` first trains one model per fold into
    ``OUT/cv/fold-F/`` (the fold as test set) and reports their mean.
    """
    cfg = config or FinetuneConfig()
    out_dir = Path(out_dir)
    loop.check_output_folder(out_dir, cfg.resume)
    d = distributed.setup(cfg.device)  # held for the whole run (folds, report)
    try:
        return _finetune(model, data, cfg, out_dir, cv, model_name)
    finally:
        distributed.teardown(d)


def _finetune(model: BEATs | str | Path, data: LabelledClips | str | Path,
              cfg: FinetuneConfig, out_dir: Path, cv: bool, model_name: str | None
              ) -> FinetuneResult:
    source = None
    if not isinstance(data, LabelledClips):
        source = str(data)
        data = LabelledClips.read(data)
    if not isinstance(model, BEATs):
        model_name = model_name or str(model)
        model = BEATs.from_pretrained(model)
    clips, failed = scan(data.clips(range(len(data.sources))))
    readable = {id(c.source) for c in clips}
    rows = [r for r in range(len(data.sources)) if id(data.sources[r]) in readable]
    durations = {id(c.source): c.duration for c in clips}
    check_classes(data, rows)
    info = {"data": source, "model": model_name, "output": str(out_dir)}
    folds_report = None
    if cv:
        folds = sorted({data.folds[r] for r in rows if data.folds[r] is not None})
        if len(folds) < 2:
            raise ValueError("--cv needs a fold for every clip (CSV fold column), 2 or more")
        per_fold = {}
        for fold in folds:
            fold_cfg = dataclasses.replace(cfg, test_fold=fold)
            per_fold[fold] = _run(model, data, rows, durations, failed, fold_cfg,
                                  out_dir / "cv" / f"fold-{fold}", info).report["test"]
        keys = [k for k in ("accuracy", "macro_f1", "mAP") if k in per_fold[folds[0]]]
        folds_report = {"folds": per_fold, "mean": {
            k: float(np.mean([per_fold[f][k] for f in folds])) for k in keys}}
    result = _run(model, data, rows, durations, failed, cfg, out_dir, info)
    if folds_report is not None:
        result.report["cv"] = folds_report
        if distributed.setup(cfg.device).main:
            _write_report(out_dir, result.report)
    return result


def _run(backbone: BEATs, data: LabelledClips, rows: list[int], durations: dict[int, float],
         failed: list[tuple[str, str]], cfg: FinetuneConfig, out_dir: Path,
         info: dict[str, Any]) -> FinetuneResult:
    train, val, test = split(data, rows, cfg)
    if not data.multilabel:
        check_classes(data, train)

    def clips(rs: list[int]) -> list[Clip]:
        out = data.clips(rs)
        for c in out:
            c.duration = durations[id(c.source)]
        return out

    model = prepare_model(backbone, data.classes, data.multilabel, cfg)
    info = {**info, "output": str(out_dir), "clips": len(rows), "failed_files": len(failed),
            "splits": {"train": len(train), "val": len(val), "test": len(test)}}
    task = FinetuneTask(model, clips(train), clips(val), data.classes, data.multilabel, cfg,
                        info)
    task.failed = failed
    fit = loop.fit(task, cfg, out_dir)
    best = out_dir / state.STATE_DIR / state.BEST
    if best.exists():
        loop.load_model_weights(task.model, state.load(best)["model"], cfg)
    d = distributed.setup(cfg.device)
    report: dict[str, Any] = {
        "classes": data.classes, "multilabel": data.multilabel, "clips": len(rows),
        "train_clips": len(train), "val_clips": len(val), "test_clips": len(test),
        "failed_files": [{"path": p, "error": e} for p, e in fit.failed],
        "steps": fit.steps, "best_step": fit.best_step, "stopped_early": fit.stopped_early,
        "training_seconds": round(fit.seconds, 3),
    }
    for name, split_clips in (("train", clips(train)), ("val", clips(val)), ("test", clips(test))):
        if split_clips:
            report[name] = task.report(split_clips)
    if d.main:
        _write_report(out_dir, report)
    distributed.barrier(d)
    return FinetuneResult(BEATs.from_pretrained(out_dir / "model"), report, fit)


def _write_report(out_dir: Path, report: dict[str, Any]) -> None:
    with atomic_write(out_dir / REPORT_FILE, "w") as f:
        json.dump(report, f, indent=2)
