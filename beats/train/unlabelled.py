"""Unlabelled audio for the self-supervised trainers (``beats pretrain``, ``beats distill``).

What every trainer on unlabelled audio shares, in one place:

- `find_audio(inputs)`: the AUDIO arguments as ``beats extract`` takes them (files,
  folders searched recursively, ``.txt``/``.lst`` list files) -> `AudioFiles`, a compact
  sequence of `beats.train.data.Clip`. A list file is read once, line by line, and its
  paths are neither checked nor opened: millions of paths cost about their bytes, and
  no header is read before training (`ClipDataset` reads a header when the file is
  first drawn). A file that is missing or cannot be read fails when drawn: it is left
  out of its batch and recorded in ``OUT/failed.jsonl``, and the run goes on.
- `UnlabelledConfig`: `TrainConfig` plus ``crop_seconds`` (10) and ``eval_batch``.
- `audio_dataset(files, cfg, augment)`: a `ClipDataset` of random crops of
  ``crop_seconds`` starting on whole 160 ms steps (so that per-step labels of the whole
  file, ``beats tokenize`` outputs, apply to the crop); a file shorter than the crop is
  read whole and zero-padded in its batch (the padding is masked: no patch of it is
  kept, masked or scored); below 0.175 s it is padded to that.
- `heldout_dataset(files, cfg, augment)`: the same crops and draws, fixed: item i always
  gets key (i, i) under the held-out seed, so every evaluation sees the same data.
- `crop_patches(batch)`: the patch count of a collated batch (``S = 8 * (T // 16)``)
  and each clip's valid patches.
- `check_audio(files, cfg)`: before training, headers are read in order until one
  step's worth of crops is found readable (so a huge corpus costs a few hundred headers):
  the unreadable files met on the way, and how many were readable (none stops the run,
  too little audio for one step is a warning).
- `files_digest(files)`: what identifies the file list of a run for ``--resume``.

The command-line side is `beats.commands.training.add_audio_arguments` (AUDIO...,
``--heldout``); the options come from the config's fields.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from ..audio import AUDIO_EXTENSIONS, SAMPLE_RATE
from ..errors import InputError
from ..files import printable
from ..inputs import MIN_SAMPLES
from ..options import option
from ..windows import STEP_SAMPLES
from .config import EVALUATION, TrainConfig
from .data import Clip, ClipDataset, ItemAugment, scan
from .masking import num_patches

HELDOUT_SEED = 2**31 - 1  # crops and masks of held-out clips: fixed, whatever --seed


class AudioFiles(Sequence[Clip]):
    """File paths stored compactly (one bytes buffer and offsets, no object per file: cheap
    for millions and shared with DataLoader workers without copying); item i is a `Clip`
    of the path, its duration read when it is first drawn."""

    def __init__(self, paths: Iterable[str | os.PathLike]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def path(self, index: int) -> str:
        """The ``index``-th path, as the OS gives it (undecodable bytes kept)."""
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        return os.fsdecode(self._buffer[start : int(self._ends[index])].tobytes())

    @overload
    def __getitem__(self, index: int) -> Clip: ...
    @overload
    def __getitem__(self, index: slice) -> list[Clip]: ...

    def __getitem__(self, index: int | slice) -> Clip | list[Clip]:
        if isinstance(index, slice):
            return [Clip(self.path(i)) for i in range(*index.indices(len(self)))]
        return Clip(self.path(index))

    def __iter__(self) -> Iterator[Clip]:
        return (self[i] for i in range(len(self)))

    def paths(self) -> list[str]:
        return [self.path(i) for i in range(len(self))]


def _walk(folder: Path) -> Iterator[str]:
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            if name.lower().endswith(AUDIO_EXTENSIONS) and not name.startswith("."):
                yield os.path.join(root, name)


def _listed(list_file: Path) -> Iterator[str]:
    """The paths of a list file (one per line, ``#`` comments), relative ones taken from
    the list's folder, as `beats.files.discover_inputs` reads them; nothing is opened."""
    base = list_file.parent
    text = list_file.read_bytes().decode("utf-8", "surrogateescape")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            yield line if os.path.isabs(line) else os.path.join(base, line)


def find_audio(inputs: Sequence[str | os.PathLike], what: str = "AUDIO") -> AudioFiles:
    """The audio files that ``inputs`` name, in a stable order.

    ``inputs``: files (any name: a file that is not audio fails when drawn), folders
    (searched recursively for audio extensions) and list files (``.txt``/``.lst``, one
    path per line). A file named twice is drawn twice as often. Raises ``ValueError``
    (one line) when an input does not exist or nothing is found; ``what`` names the
    inputs in that message (``AUDIO``, ``--heldout``).
    """
    found: list[str] = []
    for item in inputs:
        path = Path(os.fsdecode(item))
        if path.is_dir():
            found.extend(_walk(path))
        elif path.suffix.lower() in (".txt", ".lst") and path.is_file():
            found.extend(_listed(path))
        elif path.exists():
            found.append(str(path))
        else:
            raise InputError(f"{what}: {printable(str(path))} does not exist: give audio "
                             "files, folders holding them, or .txt/.lst lists of paths")
    if not found:
        named = ", ".join(printable(os.fsdecode(p)) for p in list(inputs)[:3]) or "nothing"
        raise InputError(f"{what}: no audio files found in {named} (looked for files ending "
                         f"in {' '.join(AUDIO_EXTENSIONS)}, in any case); give audio files, "
                         "folders holding them, or .txt/.lst lists of paths")
    return AudioFiles(found)


@dataclass
class UnlabelledConfig(TrainConfig):
    """`TrainConfig` plus what trainers on unlabelled audio share: the crop length
    (``batch_seconds`` counts clips of this length) and the held-out batch."""

    crop_seconds: float = option(
        10.0, help="seconds per training crop: random crops of longer files, starting on "
        "160 ms steps; shorter files are padded and the padding masked",
        ge=MIN_SAMPLES / SAMPLE_RATE, flags=("--crop-seconds", "--crop"), metavar="SECONDS")
    eval_batch: int = option(16, help="held-out clips per forward pass", ge=1,
                             group=EVALUATION)


def audio_dataset(files: Sequence[Clip], cfg: UnlabelledConfig,
                  augment: ItemAugment | None = None) -> ClipDataset:
    """Training crops of ``files``: ``cfg.crop_seconds`` long, on 160 ms steps, per-item
    draws (``augment(wav, rng)``: masks, ...) from the (seed, position, index) generator."""
    return ClipDataset(files, crop_seconds=cfg.crop_seconds, seed=cfg.seed, augment=augment,
                       crop_step=STEP_SAMPLES)


def heldout_dataset(files: Sequence[Clip], cfg: UnlabelledConfig,
                    augment: ItemAugment | None = None) -> ClipDataset:
    """Held-out crops: as `audio_dataset`, drawn once from a fixed seed; read item i with
    the key ``(i, i)`` (see `heldout_batches`)."""
    return ClipDataset(files, crop_seconds=cfg.crop_seconds, seed=HELDOUT_SEED,
                       augment=augment, crop_step=STEP_SAMPLES)


def heldout_batches(num_items: int, batch: int) -> list[list[tuple[int, int]]]:
    """Keys of the held-out set in batches of ``batch`` (a DataLoader ``batch_sampler``)."""
    keys = [(i, i) for i in range(num_items)]
    return [keys[i : i + batch] for i in range(0, num_items, batch)]


def crop_patches(batch: dict[str, Any]) -> tuple[int, list[int]]:
    """(S, [valid patches of each clip]) of a `collate_clips` batch: S = 8 * (T // 16) for
    the padded length, each clip's own count from its length."""
    return (num_patches(int(batch["wav"].shape[1])),
            [num_patches(int(n)) for n in batch["lengths"].tolist()])


def check_audio(files: Sequence[Clip], cfg: UnlabelledConfig, per_step: int
                ) -> tuple[list[tuple[str, str]], int]:
    """Read headers in order until ``per_step`` crops' worth of audio (``per_step *
    cfg.crop_seconds`` seconds) is found readable, or the files run out.

    Returns ([(path, error)] of the unreadable files met, readable files met). Warns when
    all the readable audio is shorter than that: every step then repeats it.
    """
    wanted = per_step * cfg.crop_seconds
    failed: list[tuple[str, str]] = []
    readable, seconds = 0, 0.0
    for clip in files:
        if seconds >= wanted:
            break
        good, bad = scan([clip])
        failed += bad
        readable += len(good)
        seconds += sum(c.duration or 0.0 for c in good)
    if readable and seconds < wanted:
        warnings.warn(
            f"the readable audio ({seconds:.1f} s in {readable} file(s)) is shorter than one "
            f"step's crops ({per_step} x {cfg.crop_seconds:g} s = {wanted:g} s): every step "
            "repeats the same audio; add audio, or lower --batch-size or --crop", UserWarning,
            stacklevel=2)
    return failed, readable


def files_digest(files: Sequence[Clip]) -> dict[str, Any]:
    """``{"files": N, "digest": hex}``: a SHA-256 of the file paths (or samples), in order."""
    h = hashlib.sha256()
    for clip in files:
        source = clip.source
        if isinstance(source, (str, Path)):
            h.update(os.fsencode(source))
        else:
            h.update(np.ascontiguousarray(np.asarray(source, dtype=np.float32)).tobytes())
        h.update(b"\0")
    return {"files": len(files), "digest": h.hexdigest()}
