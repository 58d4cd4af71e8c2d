"""Reading the inputs of the extraction engine (`beats.extract`), in DataLoader workers.

Each file is read, resampled and checked (`load`); whatever goes wrong with it becomes its
`beats.failures.Failure`, never an exception, so one file never stops a run. Batches are
of files of similar duration (`by_duration`, header reads only), read by `BatchReader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .audio import AudioError, AudioInfo, audio_info, load_audio
from .failures import Failure
from .files import InputFile
from .windows import SAMPLE_RATE

# Float samples belong in [-1, 1]. Up to WARN_PEAK is headroom; beyond it the record
# carries a warning; beyond MAX_PEAK (40 dB over full scale, e.g. int16 values stored as
# floats) the file fails: no recording holds such samples, and the features would be junk.
WARN_PEAK = 2.0
MAX_PEAK = 100.0


@dataclass
class Loaded:
    item: InputFile
    wav: np.ndarray | None
    info: AudioInfo | None
    error: Failure | None
    warning: str | None = None


def check_samples(wav: np.ndarray) -> tuple[str | None, str | None]:
    """(error, warning) about the values of decoded samples."""
    finite = np.isfinite(wav)
    if not finite.all():
        first = int(np.argmin(finite)) / SAMPLE_RATE
        return f"holds NaN or Inf samples (the first at {first:.3f} s)", None
    peak = float(np.abs(wav).max()) if wav.size else 0.0
    if peak > MAX_PEAK:
        return (f"samples peak at {peak:.3g}, far outside [-1, 1] (the limit is {MAX_PEAK:g}): "
                "floats holding integer-scaled values? rescale the file"), None
    if peak > WARN_PEAK:
        return None, f"samples peak at {peak:.3g}, outside [-1, 1]"
    return None, None


def load(item: InputFile, max_duration: float | None) -> Loaded:
    """One input read and checked; every problem becomes its error (never an exception)."""
    try:
        wav, info = load_audio(item.path, max_duration=max_duration)
        error, warning = check_samples(wav)
    except Exception as e:  # one file never stops a run, whatever went wrong with it
        return Loaded(item, None, None, Failure.of(e, item.path))
    if error is not None:
        return Loaded(item, None, info, Failure.of(AudioError(error), item.path))
    warnings = [w for w in (info.warning, warning) if w]
    return Loaded(item, wav, info, None, "; ".join(warnings) or None)


class BatchReader(Dataset):
    """Dataset whose items are whole batches of files, read in worker processes.

    ``stop`` (set by the main process on Ctrl-C) makes a worker skip the rest of its batch.
    """

    def __init__(self, batches: list[list[InputFile]], max_duration: float | None,
                 stop: Any) -> None:
        self.batches = batches
        self.max_duration = max_duration
        self.stop = stop

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[Loaded]:
        out = []
        for item in self.batches[index]:
            if self.stop.is_set():
                break
            out.append(load(item, self.max_duration))
        return out


def as_is(batch: list[Loaded]) -> list[Loaded]:
    return batch


def by_duration(items: list[InputFile], batch_size: int) -> list[list[InputFile]]:
    """Batches of similar duration (header reads only), longest first."""
    def duration(item: InputFile) -> float:
        try:
            return audio_info(item.path).duration
        except (AudioError, OSError, ValueError):
            return 0.0  # unreadable: fails when loaded, in a batch of its own kind

    ordered = sorted(items, key=lambda it: (-duration(it), it.key))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def stop_workers(iterator: Any) -> None:
    """After Ctrl-C: workers skip what is left of their batch (``stop``) and the loader's
    own shutdown ends them (they ignore SIGINT, `beats.workers.worker_init`)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()
