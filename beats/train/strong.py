"""Strong-label fine-tuning: training on when each sound is heard, not only whether.

``beats finetune ANNOTATIONS.tsv --strong`` trains the same model as clip-level fine-tuning
(a linear head at every position, `beats.train.finetune`), so its output is a standard
fine-tuned checkpoint that ``beats detect`` and ``beats tag`` read. What changes is the
loss and the evaluation:

- **Frame targets.** Time step t of a clip (``0.16 t`` to ``0.16 (t + 1)`` seconds, as
  ``beats detect`` reads it) is positive for a class when an event of the class overlaps
  it. The loss is the binary cross-entropy of `BEATsOutput.frame_logits` against these
  targets, averaged over a clip's valid steps and the classes.
- **Crops** start on whole steps, and the events move with them: a crop from 3.2 s sees an
  event at 4.0 s at 0.8 s. ``--roll`` moves the events with the audio (an event cut by the
  wrap-around becomes two). SpecAugment's time masks leave the targets as they are (the
  sound is hidden, not gone: the model learns to use context). Mixup mixes the frame
  targets step by step with the clips' weight; steps past the shorter clip's end take the
  longer clip's targets, scaled by its weight.
- **Weak clips** (``--weak``: a class folder or CSV, clip-level labels only, training
  only) add clip-level BCE on the clip logits (the mean over steps). A strong crop mixed
  with a weak clip becomes a weak clip whose labels are the classes heard in the crop.
- **Evaluation** (`detection_report`): the frame probabilities of whole files become events
  as ``beats detect`` makes them (threshold 0.5, no filter: `beats.detect.DetectConfig`'s
  defaults), scored with segment-based F1 (1 s segments), event-based F1 (onset collar
  200 ms, offset collar max(200 ms, 20 %)) and PSDS (DCASE scenario 1), as
  `beats.sed_metrics` defines them. The validation score that picks the best checkpoint
  is the segment-based macro F1, ties broken by the frame loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..audio import SAMPLE_RATE, AudioError, load_audio
from ..detect import DetectConfig, Detector
from ..errors import InputError
from ..events import STEP_SECONDS, decode_events
from ..failures import expected
from ..inputs import pad_to_minimum
from ..labelled import Event, LabelledSet, read_csv, read_folder, read_strong_tsv
from ..model import BEATs
from ..reading import check_samples
from ..sed_metrics import event_f1, psds, segment_f1
from ..windows import STEP_SAMPLES, num_steps
from .augment import apply_masks, mix, mixed_lengths, mixup_draw
from .data import Clip, collate_clips, filterbank
from .finetune import FinetuneTask

SEGMENT, COLLAR, OFFSET_SHARE = 1.0, 0.2, 0.2  # seconds, seconds, share of the event
_EPS = 1e-6  # seconds: event edges this close to a step edge count as on it


@dataclass(frozen=True)
class StrongTarget:
    """A strong-labelled clip's training target: its events (seconds from the file's
    start, class names)."""

    events: tuple[Event, ...]


# --------------------------------------------------------------------------- targets
def step_targets(events: Sequence[Event], steps: int, classes: dict[str, int],
                 start: float = 0.0, length: float | None = None, roll: float = 0.0
                 ) -> np.ndarray:
    """(steps, classes) float32 0/1: step t (from ``start + 0.16 t`` seconds in the file)
    is 1 for a class when one of its events overlaps it.

    ``length`` and ``roll`` describe a circular roll of the crop: the audio at crop time
    u moved to ``(u + roll) mod length``; the events move with it.
    """
    out = np.zeros((steps, len(classes)), dtype=np.float32)
    end = length if length is not None else steps * STEP_SECONDS
    for event in events:
        a, b = event.onset - start, event.offset - start
        if b < 0 or a > end or (b == 0 < b - a) or (a == end < b - a):
            continue  # outside the audio (an instant event on an edge stays)
        a, b = max(a, 0.0), min(b, end)
        pieces = [(a, b)]
        if roll and length:
            a, b = a + roll % length, b + roll % length
            if a >= length:
                pieces = [(a - length, b - length)]
            elif b > length:  # the part past the end wraps to the start
                pieces = [(a, length), (0.0, b - length)]
            else:
                pieces = [(a, b)]
        for lo, hi in pieces:
            first = max(0, math.floor(lo / STEP_SECONDS + _EPS))
            last = min(steps, max(first + 1, math.ceil(hi / STEP_SECONDS - _EPS)))
            out[first:last, classes[event.label]] = 1.0
    return out


def still_strong(strong: torch.Tensor, partner: torch.Tensor, mixed: torch.Tensor
                 ) -> torch.Tensor:
    """(B,) bool: which clips keep frame targets after mixup. A clip mixed with a weak
    partner becomes weak; a clip left unmixed keeps what it was."""
    partner, mixed = partner.to(strong.device), mixed.to(strong.device)
    return strong & (strong[partner] | ~mixed)


# --------------------------------------------------------------------------- the task
class StrongTask(FinetuneTask):
    """Frame-level fine-tuning as a `beats.train.loop.Task` (the module doc)."""

    name = "finetune"
    crop_step = STEP_SAMPLES  # crops start on whole steps: the events' times move with them

    @functools.cached_property
    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def label_indices(self, target: Any) -> list[int]:
        """A clip's classes: those of its events, or its weak labels."""
        if isinstance(target, StrongTarget):
            return sorted({self.class_index[e.label] for e in target.events})
        return list(target)

    def run_info(self) -> dict[str, Any]:
        return {**super().run_info(), "strong": True}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """`collate_clips` plus ``frame_targets`` (B, T, K), ``clip_targets`` (B, K) and
        ``strong`` (B,) bool (False for weak clips: their frame targets are unknown)."""
        batch = collate_clips(items)
        count, k = batch["count"], len(self.classes)
        steps = num_steps(batch["wav"].shape[1]) if count else 0
        frames = np.zeros((count, steps, k), dtype=np.float32)
        clips = np.zeros((count, k), dtype=np.float32)
        strong = np.zeros(count, dtype=bool)
        rolls = batch.get("roll")
        for i, target in enumerate(batch["targets"]):
            length = int(batch["lengths"][i])
            if isinstance(target, StrongTarget):
                valid = num_steps(length)
                roll = 0.0 if rolls is None else float(rolls[i]) / SAMPLE_RATE
                frames[i, :valid] = step_targets(
                    target.events, valid, self.class_index,
                    start=float(batch["offset"][i]) / SAMPLE_RATE,
                    length=length / SAMPLE_RATE, roll=roll)
                clips[i] = frames[i, :valid].max(axis=0) if valid else 0.0
                strong[i] = True
            else:
                clips[i, list(target)] = 1.0
        batch.update(frame_targets=torch.from_numpy(frames),
                     clip_targets=torch.from_numpy(clips), strong=torch.from_numpy(strong))
        return batch

    def forward_loss(self, batch: dict[str, Any], denominator: float
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        wav, lengths = batch["wav"], batch["lengths"]
        frames, clips, strong = batch["frame_targets"], batch["clip_targets"], batch["strong"]
        if self.cfg.mixup > 0 and wav.shape[0] > 1:
            partner, lam, mixed = mixup_draw(wav.shape[0], self.cfg.mixup, self.cfg.mixup_alpha)
            wav, frames, clips = (mix(x, partner, lam) for x in (wav, frames, clips))
            lengths = mixed_lengths(lengths, partner, mixed)
            strong = still_strong(strong, partner, mixed)
        features, num_frames = filterbank(wav, lengths, self.model.cfg)
        features = apply_masks(features, batch.get("time_masks"), batch.get("freq_masks"))
        out = self.model.forward_fbank(features, num_frames)
        assert out.frame_logits is not None and out.logits is not None
        valid = (~out.step_padding_mask).float()
        per_step = F.binary_cross_entropy_with_logits(
            out.frame_logits, frames.to(out.frame_logits.device), reduction="none").mean(-1)
        frame_loss = (per_step * valid).sum(1) / valid.sum(1).clamp(min=1.0)
        clip_loss = F.binary_cross_entropy_with_logits(
            out.logits, clips.to(out.logits.device), reduction="none").mean(-1)
        per_clip = torch.where(strong.to(frame_loss.device), frame_loss, clip_loss)
        return per_clip.sum() / denominator, {}

    def report(self, clips: list[Clip]) -> dict[str, Any]:
        files = [(c.source, c.duration, c.target.events) for c in clips
                 if isinstance(c.target, StrongTarget)]
        return detection_report(self.model, files, self.classes,
                                eval_batch=self.cfg.eval_batch)

    def evaluate(self) -> dict[str, float] | None:
        if not self.val_clips:
            return None
        r = self.report(self.val_clips)
        macro = r["segment_f1"]["macro_f1"]
        return {"score": out_value(macro), "tiebreak": -r["frame_loss"],
                "loss": r["frame_loss"], "segment_f1": out_value(macro),
                "event_f1": out_value(r["event_f1"]["macro_f1"])}


def out_value(x: float | None) -> float:
    """A metric for metrics.jsonl: None (no reference event) as 0."""
    return 0.0 if x is None else float(x)


# --------------------------------------------------------------------------- evaluation
FileEvents = tuple[Any, float | None, Sequence[Event]]  # (source, seconds, events)


def frame_probabilities(detector: Detector, files: Sequence[FileEvents],
                        eval_batch: int = 8) -> list[np.ndarray | None]:
    """(steps, classes) float32 frame probabilities of each file (None: unreadable).

    Files up to the detection window run in batches of ``eval_batch`` (outputs do not
    depend on the batch); longer ones run alone, in windows, as ``beats detect`` scores
    them. A file is read whole (memory: its samples, 230 MB per hour). The columns are
    the detector's classes: all of the model's (``classes=None``).
    """
    model, detect = detector.model, detector.config
    out: list[np.ndarray | None] = [None] * len(files)
    waves: dict[int, np.ndarray] = {}
    for i, (source, _, _) in enumerate(files):
        try:
            waves[i] = _samples(source)
        except Exception as e:
            if not expected(e):
                raise  # a bug, not the file
    window = detect.window * SAMPLE_RATE if detect.window is not None else math.inf
    short = sorted((i for i in waves if len(waves[i]) <= window), key=lambda i: -len(waves[i]))
    model.eval()
    with torch.inference_mode():
        for first in range(0, len(short), eval_batch):
            group = short[first : first + eval_batch]
            result = model.extract_features([waves[i] for i in group])
            assert result.frame_logits is not None
            probs = model.activate(result.frame_logits).float().cpu().numpy()
            for row, i in enumerate(group):
                out[i] = probs[row, : num_steps(len(waves[i]))]
    for i in waves:
        if out[i] is None:
            out[i] = detector.frame_scores(waves[i]).probs
    return out


def _samples(source: Any) -> np.ndarray:
    if isinstance(source, (str, os.PathLike)):
        wav = load_audio(source)[0]
    else:
        if isinstance(source, torch.Tensor):
            source = source.detach().cpu().numpy()
        wav = np.asarray(source, dtype=np.float32)
    error, _ = check_samples(wav)  # the checks of beats detect, which the report mirrors
    if error is not None:
        raise AudioError(f"the audio {error}")
    return pad_to_minimum(wav)


def detection_report(model: BEATs, files: Sequence[FileEvents], classes: Sequence[str],
                     detect: DetectConfig | None = None, eval_batch: int = 8
                     ) -> dict[str, Any]:
    """Sound event detection scores of ``model`` on ``files`` against their events.

    ``classes`` name the model's outputs in order. Returns ``files`` (how many were
    scored; unreadable ones are left out), ``frame_loss`` (BCE of the frame probabilities
    against the step targets), ``segment_f1`` and ``event_f1``
    (`beats.sed_metrics.F1Scores.to_dict`), ``psds`` over ``psds_classes`` (the classes
    with a reference event; None when there is none) and ``detect`` (the post-processing).
    """
    detect = detect or DetectConfig()
    classes = list(classes)
    if model.cfg.predictor_class != len(classes):
        raise InputError(f"the model has {model.cfg.predictor_class} classes, the data "
                         f"{len(classes)}: {classes}")
    detector = Detector(model, dataclasses.replace(detect, classes=None))
    probs = frame_probabilities(detector, files, eval_batch)
    post = detector.post
    index = {c: i for i, c in enumerate(classes)}
    reference, estimated, durations, scores = {}, {}, {}, {}
    losses = []
    for i, ((_, seconds, events), p) in enumerate(zip(files, probs, strict=True)):
        if p is None:
            continue
        name = str(i)
        reference[name] = [(e.onset, e.offset, e.label) for e in events]
        estimated[name] = [(e.onset, e.offset, e.label) for e in decode_events(p, classes, post)]
        durations[name] = float(seconds) if seconds else len(p) * STEP_SECONDS
        truth = step_targets(events, len(p), index)
        clipped = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
        losses.append(float(-(truth * np.log(clipped) + (1 - truth) * np.log1p(-clipped)).mean()))
        steps = np.arange(len(p) + 1) * STEP_SECONDS
        scores[name] = (steps, p)
    if not reference:
        raise InputError("no file could be read for the detection report")
    seg = segment_f1(reference, estimated, classes, segment=SEGMENT, durations=durations)
    evt = event_f1(reference, estimated, classes, collar=COLLAR, offset_share=OFFSET_SHARE)
    heard = [c for c in classes if any(e[2] == c for evs in reference.values() for e in evs)]
    value = None
    if heard:
        columns = [index[c] for c in heard]
        value = psds({n: (t, s[:, columns]) for n, (t, s) in scores.items()},
                     {n: merge_overlaps(evs, heard) for n, evs in reference.items()},
                     durations, heard).psds
    return {"files": len(reference), "frame_loss": float(np.mean(losses)),
            "segment_f1": seg.to_dict(), "event_f1": evt.to_dict(),
            "psds": None if value is None else float(value), "psds_classes": heard,
            "detect": {"threshold": detect.threshold, "median_filter": detect.median_filter,
                       "min_duration": detect.min_duration, "min_gap": detect.min_gap}}


def merge_overlaps(events: Sequence[tuple[float, float, str]], classes: Sequence[str]
                   ) -> list[tuple[float, float, str]]:
    """Events of each class in ``classes`` with overlapping or touching ones joined (PSDS
    needs a class's reference events apart); other classes' events dropped."""
    out = []
    for c in classes:
        spans = sorted((a, b) for a, b, label in events if label == c)
        for a, b in spans:
            if out and out[-1][2] == c and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(b, out[-1][1]), c)
            else:
                out.append((a, b, c))
    return out


def evaluate_detection(model: BEATs, data: LabelledSet | str | os.PathLike,
                       detect: DetectConfig | None = None, batch: int = 8) -> dict[str, Any]:
    """`detection_report` of a fine-tuned ``model`` on a strong-label set (a DCASE TSV
    path or a `LabelledSet` with events), its classes named by ``model.label_dict``."""
    if not isinstance(data, LabelledSet):
        data = read_strong_tsv(data)
    if data.events is None:
        raise InputError("evaluate_detection needs strong labels (a DCASE TSV with times)")
    label_dict = model.label_dict or {}
    classes = [str(label_dict.get(i, f"class {i}")) for i in range(model.cfg.predictor_class)]
    unknown = sorted(set(data.classes) - set(classes))
    if unknown:
        raise InputError(f"the annotations name classes the model lacks: {unknown} (the "
                         f"model's: {classes})")
    files = [(s, None, evs) for s, evs in zip(data.sources, data.events, strict=True)]
    return detection_report(model, files, classes, detect, batch)


# --------------------------------------------------------------------------- data
def strong_clips(data: LabelledSet, rows: Sequence[int]) -> list[Clip]:
    """`Clip` objects of strong-labelled entries (targets: `StrongTarget`)."""
    if data.events is None:
        raise InputError("--strong needs strong labels: a DCASE TSV with the header "
                         "filename onset offset event_label")
    return [Clip(data.sources[r], StrongTarget(tuple(data.events[r]))) for r in rows]


def read_weak(source: str | os.PathLike, classes: Sequence[str], strong: LabelledSet
              ) -> LabelledSet:
    """The ``--weak`` set: a class folder or CSV whose classes are among ``classes`` and
    whose files are not in the strong set (a file in both would leak into evaluation).
    Returned with ``classes`` as its classes and multi-label, so that
    `beats.train.finetune.clips_of` gives targets in the strong set's class order."""
    path = Path(source)
    if not path.exists():
        raise InputError(f"--weak {source} does not exist: give a class folder or a .csv of "
                         "clip-level labels")
    if path.is_dir():
        weak = read_folder(path)
    elif path.suffix.lower() == ".csv" and path.is_file():
        weak = read_csv(path)
    else:
        raise InputError(f"--weak {source}: give a class folder or a .csv of clip-level "
                         "labels")
    unknown = sorted(set(weak.classes) - set(classes))
    if unknown:
        raise InputError(f"--weak {source}: classes {unknown} are not in the strong labels' "
                         f"{list(classes)}")
    shared = {os.fsdecode(s) for s in strong.sources} & {os.fsdecode(s) for s in weak.sources}
    if shared:
        raise InputError(f"--weak {source}: {len(shared)} file(s) also in the strong labels, "
                         f"such as {sorted(shared)[0]}; list each file once")
    weak.classes, weak.multilabel = list(classes), True  # targets: index tuples, strong's order
    return weak
