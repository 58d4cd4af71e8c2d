"""Unlabelled training audio, shared by ``beats pretrain`` and ``beats distill``.

STAND-IN (issue 14): issue 13's ``beats pretrain`` is building the shared version of this
module in parallel. This one keeps the same names and meanings (`find_audio`,
`UnlabelledConfig`, `audio_dataset`, `heldout_dataset`, `heldout_batches`) in their
simplest form, so that the shared module replaces it without changes to distillation.

- `find_audio(inputs)`: the AUDIO arguments as ``beats extract`` takes them (files,
  folders searched recursively, ``.txt``/``.lst`` lists) -> clips. No header is read
  before training: a file that cannot be read is left out of its batch when drawn and
  recorded in ``OUT/failed.jsonl``.
- `UnlabelledConfig`: `TrainConfig` plus ``crop_seconds`` and ``eval_batch``.
- `audio_dataset`: random crops of ``crop_seconds`` starting on whole 160 ms steps; a
  file shorter than the crop is read whole (padded in its batch, the padding masked).
- `heldout_dataset` / `heldout_batches`: fixed crops of held-out files (item i has the
  key (i, i) under a fixed seed), the same at every evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..audio import AUDIO_EXTENSIONS
from ..files import discover_inputs, printable
from ..windows import STEP_SAMPLES
from .config import TrainConfig
from .data import Clip, ClipDataset, ItemAugment

HELDOUT_SEED = 2**31 - 1  # held-out crops: fixed, whatever the run's seed


def find_audio(inputs: Sequence[str | os.PathLike], what: str = "AUDIO") -> list[Clip]:
    """The audio files ``inputs`` name, as clips, in a stable order.

    Raises ``ValueError`` (one line) when an input does not exist or no audio file is
    found; ``what`` names the inputs in the message (``AUDIO``, ``--heldout``).
    """
    for item in inputs:
        path = Path(os.fsdecode(item))
        if not path.exists():
            raise ValueError(f"{what}: {printable(str(path))} does not exist: give audio "
                             "files, folders holding them, or .txt/.lst lists of paths")
    files = discover_inputs(inputs)
    if not files:
        named = ", ".join(printable(os.fsdecode(p)) for p in list(inputs)[:3]) or "nothing"
        raise ValueError(f"{what}: no audio files found in {named} (looked for files ending "
                         f"in {' '.join(AUDIO_EXTENSIONS)}, in any case); give audio files, "
                         "folders holding them, or .txt/.lst lists of paths")
    return [Clip(f.path) for f in files]


@dataclass
class UnlabelledConfig(TrainConfig):
    """`TrainConfig` plus what trainers on unlabelled audio share.

    Attributes:
        crop_seconds: training reads random crops of this length, starting on whole
            160 ms steps; shorter files are read whole. ``batch_seconds`` counts clips of
            this length.
        eval_batch: held-out clips per forward pass in evaluation.
    """

    crop_seconds: float = 10.0
    eval_batch: int = 16

    def validate(self) -> None:
        super().validate()
        if not self.crop_seconds * 16000 >= 2800:
            raise ValueError(f"crop-seconds={self.crop_seconds!r}: must be at least 0.175 "
                             "(one 160 ms step of patches)")
        if not (isinstance(self.eval_batch, int) and self.eval_batch >= 1):
            raise ValueError(f"eval-batch={self.eval_batch!r}: must be a positive integer")


def audio_dataset(files: Sequence[Clip], cfg: UnlabelledConfig,
                  augment: ItemAugment | None = None) -> ClipDataset:
    """Training crops of ``files`` (see the module docstring)."""
    return ClipDataset(files, crop_seconds=cfg.crop_seconds, seed=cfg.seed, augment=augment,
                       crop_step=STEP_SAMPLES)


def heldout_dataset(files: Sequence[Clip], cfg: UnlabelledConfig,
                    augment: ItemAugment | None = None) -> ClipDataset:
    """Held-out crops, drawn once from a fixed seed; read item i with the key (i, i)."""
    return ClipDataset(files, crop_seconds=cfg.crop_seconds, seed=HELDOUT_SEED,
                       augment=augment, crop_step=STEP_SAMPLES)


def heldout_batches(num_items: int, batch: int) -> list[list[tuple[int, int]]]:
    """Keys of the held-out set in batches of ``batch`` (a DataLoader ``batch_sampler``)."""
    keys = [(i, i) for i in range(num_items)]
    return [keys[i : i + batch] for i in range(0, num_items, batch)]
