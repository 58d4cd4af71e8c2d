"""What a run writes as it goes, on rank 0: ``metrics.jsonl``, TensorBoard events (when
tensorboard is installed), the tqdm bar, and ``failed.jsonl`` of unreadable files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..failures import ErrorLog, Failure
from ..files import atomic_write
from ..manifest import FAILED, ManifestWriter, Record
from . import distributed

METRICS_FILE = "metrics.jsonl"
FAILED_FILE = "failed.jsonl"


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The records of ``out_dir/metrics.jsonl`` in order ([] without one); a torn or
    unreadable line (a run killed mid-write) is skipped."""
    records = []
    path = Path(out_dir) / METRICS_FILE
    if path.exists():
        for text in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


class RunLog:
    """metrics.jsonl (+ TensorBoard when installed) on rank 0; the tqdm bar."""

    def __init__(self, out_dir: Path, start: int, total: int, d: distributed.Dist,
                 quiet: bool) -> None:
        self.main = d.main
        self.path = out_dir / METRICS_FILE
        self.file = None
        self.tb = None
        self.bar = None
        if not self.main:
            return
        if self.path.exists():  # drop lines past the resumed step: the file reads as one run
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
            with atomic_write(self.path, "w") as f:
                f.write("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start + 1)
        except ImportError:
            self.tb = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def write(self, entry: dict[str, Any]) -> None:
        if not self.main:
            return
        assert self.file is not None
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in entry.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, entry["step"])
            self.tb.flush()
        if self.bar is not None and "loss" in entry:
            self.bar.set_postfix(loss=f"{entry['loss']:.4g}", lr=f"{entry['lr']:.2e}")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        for thing in (self.file, self.tb, self.bar):
            if thing is not None:
                thing.close()


def _finite(x: float) -> float | None:
    """None for inf/NaN (a float16 step skipped by loss scaling), so the file stays JSON."""
    return x if math.isfinite(x) else None


class Window:
    """Sums over the steps since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps, self.loss, self.seconds, self.wall = 0, 0.0, 0.0, 0.0
        self.metrics: dict[str, list[float]] = {}
        self.last: dict[str, Any] = {}

    def snapshot(self) -> dict[str, Any]:
        """The sums so far (saved with the training state: a resumed run's next line
        covers the same steps as an uninterrupted run's)."""
        return {"steps": self.steps, "loss": self.loss, "seconds": self.seconds,
                "wall": self.wall, "metrics": {k: list(v) for k, v in self.metrics.items()},
                "last": {k: v for k, v in self.last.items() if isinstance(v, float)}}

    def restore(self, saved: dict[str, Any] | None) -> None:
        if saved:
            self.steps, self.loss = saved["steps"], saved["loss"]
            self.seconds, self.wall = saved["seconds"], saved["wall"]
            self.metrics = {k: list(v) for k, v in saved["metrics"].items()}
            self.last = dict(saved["last"])

    def add(self, result: dict[str, Any], wall: float) -> None:
        self.steps += 1
        self.loss += result["loss"]
        self.seconds += result["seconds"]
        self.wall += wall
        self.last = result
        for k, v in result.items():
            if isinstance(v, tuple):
                acc = self.metrics.setdefault(k, [0.0, 0.0])
                acc[0] += v[0]
                acc[1] += v[1]

    def entry(self, step: int, epoch: float, d: distributed.Dist) -> dict[str, Any]:
        out = {"step": step, "epoch": round(epoch, 4), "loss": self.loss / max(1, self.steps),
               "lr": self.last.get("lr", 0.0),
               "grad_norm": _finite(self.last.get("grad_norm", 0.0)),
               "audio_seconds_per_second": self.seconds / self.wall if self.wall else 0.0}
        for k, (total, n) in self.metrics.items():
            out[k] = total / n if n else 0.0
        self.reset()
        return out


class Failures:
    """Unreadable files met in training: gathered from every process at log steps and
    recorded once each in ``OUT/failed.jsonl`` (manifest records, status ``failed``); the
    traceback of an unexpected error type goes to ``OUT/errors.log`` (``unexpected``
    counts them). Entries are `beats.train.data.failure_entry` tuples."""

    def __init__(self, out_dir: Path, d: distributed.Dist) -> None:
        self.path = out_dir / FAILED_FILE
        self.errors = ErrorLog(out_dir)
        self.d = d
        self.pending: list[tuple[str, ...]] = []
        self.all: list[tuple[str, str]] = []
        self.seen: set[str] = set()
        self.unexpected = 0

    def add(self, lists: Any) -> None:
        for failed in lists:
            self.pending.extend(failed)

    def flush(self) -> None:
        gathered = distributed.gather_objects(self.pending, self.d)
        self.pending = []
        new = []
        for part in gathered:
            for source, error, *trace in part:
                if source not in self.seen:
                    self.seen.add(source)
                    new.append((source, error, *trace))
        if not new:
            return
        self.all.extend((source, error) for source, error, *_ in new)
        self.unexpected += sum(len(entry) > 2 for entry in new)
        if self.d.main:
            write_failures(self.path, self.errors, new)


def write_failures(path: Path, errors: ErrorLog, entries: Any) -> None:
    """Append failure entries to ``failed.jsonl`` at ``path``, their tracebacks (if any)
    to ``errors``."""
    with ManifestWriter(path) as writer:
        for source, error, *trace in entries:
            writer.append(Record(source, Path(source).name, FAILED, error=error))
            if trace:
                errors.add(source, Failure(error, trace[0]))
