"""Training data: clips, the step-indexed sampler, collation and bad-file handling.

Everything random about the data is a function of (seed, step, item):

- The global stream of items is epoch after epoch of a permutation of the items drawn
  from (seed, epoch), or with balanced sampling a weighted draw with replacement from
  (seed, epoch). Optimiser step s takes stream positions [s N, (s + 1) N), N clips per
  step over all processes; process r takes its contiguous share, split into micro-batches.
  Resuming at step s therefore needs nothing but s.
- An item's crop offset and augmentation draws come from a generator seeded by (seed,
  stream position, item index), inside the Dataset: the same under any number of
  DataLoader workers or processes, and after a resume.

A file that cannot be read gives an item with ``error`` set (``Type: file: message``, and
``trace``, (its traceback,) for an unexpected error type); `collate_clips` leaves it out of
the batch (its ``count`` counts readable clips only) and lists it in ``failed`` as a
`failure_entry`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..audio import SAMPLE_RATE, AudioError, audio_info, load_audio
from ..config import BEATsConfig
from ..errors import InputError
from ..failures import Failure
from ..fbank import fbank
from ..inputs import MIN_SAMPLES, pad_to_minimum

Key = tuple[int, int]  # (stream position, item index)
# (source, "Type: message") or, for an unexpected error type, (source, text, traceback)
FailureEntry = tuple[str, ...]
ItemAugment = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, dict[str, Any]]]


@dataclass
class Clip:
    """One training example.

    Attributes:
        source: an audio file path, or 16 kHz mono float samples (numpy or torch, 1-D).
        target: whatever the task trains on (fine-tuning: a class index, or a tuple of
            class indices for multi-label data); None for unlabelled audio.
        duration: seconds; read from the file header (or the array) when None.
    """

    source: str | Path | np.ndarray | torch.Tensor
    target: Any = None
    duration: float | None = None

    @property
    def name(self) -> str:
        return str(self.source) if isinstance(self.source, (str, Path)) else "<array>"


def scan(clips: Sequence[Clip]) -> tuple[list[Clip], list[tuple[str, str]]]:
    """Fill in durations from file headers; return (readable clips, [(path, error)]).

    Only headers are read (fast); a file whose header is fine but whose samples are not
    is caught when it is read in training and dropped from its batch then.
    """
    good, failed = [], []
    for clip in clips:
        if not isinstance(clip.source, (str, Path)):
            n = len(clip.source)
            if n == 0:
                failed.append(failure_entry(clip.name, InputError("an empty array")))
                continue
            good.append(Clip(clip.source, clip.target, n / SAMPLE_RATE))
            continue
        try:
            info = audio_info(clip.source)
            if info.frames == 0:
                raise AudioError(f"{clip.source}: the file holds no samples")
        except Exception as e:  # one file never stops a run
            failed.append(failure_entry(clip.name, e))
            continue
        good.append(Clip(clip.source, clip.target, info.duration))
    return good, failed


def failure_entry(source: str, error: BaseException) -> FailureEntry:
    """What `scan` and `collate_clips` list for a file that failed: ``(source, "Type:
    source: message")``, and the traceback third for an unexpected error type (the loop
    writes it to ``OUT/errors.log``)."""
    failure = Failure.of(error, source)
    return (source, failure.text) + ((failure.trace,) if failure.trace else ())


class ClipDataset(Dataset):
    """Clips read (and cropped, augmented) on demand; indexed by a stream `Key`.

    Args:
        clips: the examples. A file clip without a duration has its header read when it is
            first drawn (in the worker): millions of files need no scan before training.
        crop_seconds: training reads a random crop of this length from longer clips
            (None: whole clips). Evaluation (``train=False``) reads whole clips.
        seed: the run's seed (crops and augmentation follow from it).
        augment: ``augment(wav, rng) -> (wav, extras)`` for training items: the extras
            (numpy arrays of equal shape per item) are stacked into the batch.
        train: random crops and augmentation (False: whole clips, no augmentation).
        crop_step: crop offsets are whole multiples of this many samples (at 16 kHz): 2560
            aligns crops on BEATs' 160 ms time steps, so that stored per-step labels of
            the whole file apply to the crop. None: any offset.

    Each item records ``offset``, the crop's first sample in the clip (at 16 kHz).
    """

    def __init__(self, clips: Sequence[Clip], *, crop_seconds: float | None = None,
                 seed: int = 0, augment: ItemAugment | None = None, train: bool = True,
                 crop_step: int | None = None) -> None:
        # a Sequence is kept as is (`beats.train.unlabelled.AudioFiles` holds millions of
        # paths compactly: a list of Clip objects would cost ~0.5 KB each in every worker)
        self.clips = clips if isinstance(clips, Sequence) else list(clips)
        self.crop_seconds = crop_seconds
        self.seed = seed
        self.augment = augment
        self.train = train
        self.crop_step = crop_step

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: Key | int) -> dict[str, Any]:
        position, index = (key, key) if isinstance(key, int) else key
        clip = self.clips[index]
        rng = np.random.default_rng([self.seed, position, index])
        item: dict[str, Any] = {"index": index, "position": position, "target": clip.target,
                                "source": clip.name, "error": None, "wav": None}
        try:
            wav, item["offset"] = self._read(clip, rng)
        except Exception as e:  # one file never stops a run
            entry = failure_entry(clip.name, e)
            item["error"], item["trace"] = entry[1], entry[2:]
            return item
        if self.train and self.augment is not None:
            wav, extras = self.augment(wav, rng)
            item.update(extras)
        item["wav"] = wav
        return item

    def _read(self, clip: Clip, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(samples, offset of the crop in samples at 16 kHz)."""
        crop = self.crop_seconds if self.train else None
        duration = clip.duration
        if duration is None:
            duration = (audio_info(clip.source).duration
                        if isinstance(clip.source, (str, Path)) else len(clip.source) / SAMPLE_RATE)
        start = 0
        if crop is not None and duration > crop:
            room = int((duration - crop) * SAMPLE_RATE)  # last possible first sample
            step = self.crop_step or 1
            start = int(rng.integers(0, room // step + 1)) * step
        offset = start / SAMPLE_RATE
        if isinstance(clip.source, (str, Path)):
            wav, _ = load_audio(clip.source, offset=offset,
                                duration=crop if crop is not None and duration > crop else None)
        else:
            samples = clip.source
            if isinstance(samples, torch.Tensor):
                samples = samples.detach().cpu().numpy()
            wav = np.asarray(samples, dtype=np.float32)
            if wav.ndim != 1:
                raise InputError(f"clip arrays must be 1-D 16 kHz samples, got {wav.shape}")
            if crop is not None and duration > crop:
                wav = wav[start : start + round(crop * SAMPLE_RATE)]
        if not np.isfinite(wav).all():
            raise AudioError(f"{clip.name}: the audio holds NaN or Inf samples")
        return pad_to_minimum(np.ascontiguousarray(wav, dtype=np.float32)), start


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> a batch.

    Returns ``wav`` (B, N) float32 zero-padded, ``lengths`` (B,) int64, ``targets`` (list),
    ``index`` (B,) int64, ``offset`` (B,) int64 (each crop's first sample in its clip),
    any augmentation extras stacked (B, ...), ``count`` (B: clips,
    the loss terms of a classification batch), ``seconds`` (audio seconds in the batch),
    and ``failed``, the `failure_entry` of each item that could not be read.
    """
    good = [it for it in items if it["error"] is None]
    batch: dict[str, Any] = {
        "failed": [(it["source"], it["error"], *it.get("trace", ())) for it in items
                   if it["error"] is not None],
        "count": len(good),
        "targets": [it["target"] for it in good],
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
    }
    lengths = torch.tensor([len(it["wav"]) for it in good], dtype=torch.long)
    wav = torch.zeros(len(good), int(lengths.max()) if len(good) else MIN_SAMPLES)
    for i, it in enumerate(good):
        wav[i, : len(it["wav"])] = torch.from_numpy(it["wav"])
    batch.update(wav=wav, lengths=lengths, seconds=float(lengths.sum()) / SAMPLE_RATE)
    batch["offset"] = torch.tensor([it["offset"] for it in good], dtype=torch.long)
    reserved = {"wav", "target", "index", "position", "source", "error", "trace", "offset"}
    for name in (good[0].keys() - reserved) if good else ():
        batch[name] = torch.from_numpy(np.stack([it[name] for it in good]))
    return batch


class StepSampler:
    """The micro-batches of keys of one process, step after step (a DataLoader
    ``batch_sampler``).

    Args:
        num_items: items per epoch (the dataset's length).
        per_step: clips per optimiser step over all processes (N).
        rank, world: this process and how many there are.
        micro_batch: clips per forward pass (None: the whole share at once).
        seed: data order seed.
        start, total: the steps to yield, [start, total).
        weights: per-item sampling weights (balanced sampling with replacement), or None
            for a permutation per epoch.

    Every process yields `accum` micro-batches per step (some may be empty when the
    step's share is smaller than that).
    """

    def __init__(self, num_items: int, per_step: int, *, rank: int = 0, world: int = 1,
                 micro_batch: int | None = None, seed: int = 0, start: int = 0,
                 total: int = 1, weights: Sequence[float] | None = None) -> None:
        if num_items < 1:
            raise InputError("no training items")
        self.num_items, self.per_step = num_items, per_step
        self.rank, self.world = rank, world
        self.seed, self.start, self.total = seed, start, total
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        share = math.ceil(per_step / world)
        self.accum = math.ceil(share / (micro_batch or share)) if share else 1
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """Item indices of one epoch of the stream."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            if self.weights is None:
                order = rng.permutation(self.num_items)
            else:
                order = rng.choice(self.num_items, size=self.num_items, replace=True,
                                   p=self.weights / self.weights.sum())
            self._orders = {epoch: order}  # keep one epoch: positions only move forward
        return self._orders[epoch]

    def step_keys(self, step: int) -> list[Key]:
        """All keys of optimiser step ``step`` (every process's), in stream order."""
        keys = []
        for position in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, offset = divmod(position, self.num_items)
            keys.append((position, int(self.order(epoch)[offset])))
        return keys

    def micro_batches(self, step: int) -> list[list[Key]]:
        keys = self.step_keys(step)
        lo = round(len(keys) * self.rank / self.world)
        hi = round(len(keys) * (self.rank + 1) / self.world)
        mine = keys[lo:hi]
        return [list(part) for part in _split(mine, self.accum)]

    def __iter__(self) -> Iterator[list[Key]]:
        for step in range(self.start, self.total):
            yield from self.micro_batches(step)

    def __len__(self) -> int:
        return (self.total - self.start) * self.accum


def _split(keys: list[Key], parts: int) -> list[list[Key]]:
    """``keys`` in ``parts`` contiguous pieces whose sizes differ by at most one."""
    bounds = [round(len(keys) * i / parts) for i in range(parts + 1)]
    return [keys[bounds[i] : bounds[i + 1]] for i in range(parts)]


def balanced_weights(targets: Sequence[Sequence[int]], num_classes: int) -> list[float]:
    """AST's balanced-sampling weight per clip: sum over its labels of 1000 / (label count
    + 0.01), the count taken over the training clips."""
    counts = np.zeros(num_classes)
    for labels in targets:
        for k in labels:
            counts[k] += 1
    return [float(sum(1000.0 / (counts[k] + 0.01) for k in labels)) for labels in targets]


def filterbank(
    wav: torch.Tensor, lengths: torch.Tensor, cfg: BEATsConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's filterbank for a model of config ``cfg``: (features (B, T, 128), frames (B,)).

    Always float32, even under autocast: the power spectrum spans ~1e17 and overflows
    float16 (bfloat16 would lose the low bins). Every trainer computes it here, once per
    batch, and passes it to ``forward_fbank`` (and to a tokenizer's ``labels_from_fbank``).
    """
    with torch.autocast(wav.device.type, enabled=False):
        return fbank(wav.float(), lengths, mean=cfg.fbank_mean, std=cfg.fbank_std)
