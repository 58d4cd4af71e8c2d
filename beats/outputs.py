"""The output folder of a ``beats extract`` (or ``beats detect``) run: writers, settings,
and what a resumed run may skip.

A folder holds ``run.json`` (the settings outputs depend on), ``manifest.jsonl`` (one
record per input, `beats.manifest`), the outputs (``.npy`` files mirroring the input tree,
or safetensors shards named per run so that no run ever overwrites another's shard) and
``.beats.lock`` (`beats.files.folder_lock`, held by the running process).
"""

from __future__ import annotations

import errno
import io
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors

from .audio import AudioError, audio_info
from .errors import InputError, RunExistsError
from .events import Event, clean_label, step_time
from .files import InputFile, atomic_write, output_path, printable, safe_key
from .inputs import MIN_SAMPLES
from .manifest import OK, PADDED, ManifestWriter, Record, latest_by_key, read_manifest

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
# Errors of the output disk as a whole: they stop the run rather than fail one file.
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def abs_input(path: Path) -> str:
    """The absolute input path a record holds (so it can be matched from anywhere)."""
    return os.path.abspath(path)


def new_run_id() -> str:
    """A name unique to one run: its UTC start time and random hex, ``20250131T120000-9f3a1c``."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


# --------------------------------------------------------------------------- writers
class NpyWriter:
    """One ``.npy`` per input at ``OUT/<key>.npy`` (and ``<key>.times.npy``)."""

    suffix = ".npy"

    def __init__(self, output_dir: Path, manifest: ManifestWriter) -> None:
        self.output_dir = output_dir
        self.manifest = manifest

    def write(self, record: Record, embedding: np.ndarray, times: np.ndarray | None) -> None:
        path = output_path(self.output_dir, record.key, self.suffix)
        if times is not None:
            with atomic_write(path.with_name(path.name[: -len(".npy")] + ".times.npy")) as f:
                np.save(f, times)
        with atomic_write(path) as f:
            np.save(f, embedding)
        record.output = path.relative_to(self.output_dir.resolve()).as_posix()
        self.manifest.append(record)

    def close(self) -> None:
        pass


def tensor_name(key: str) -> str:
    """The safetensors name of a key (names must be valid UTF-8: see `printable`)."""
    return printable(key)


class ShardWriter:
    """Collects outputs and writes ``shard-RUN-RR-NNNNN.safetensors`` of ``size`` inputs
    (RUN: this run's id, RR: its rank); their manifest records are appended only once the
    shard is on disk."""

    def __init__(self, output_dir: Path, manifest: ManifestWriter, size: int, rank: int,
                 run_id: str) -> None:
        self.output_dir = output_dir
        self.manifest = manifest
        self.size = size
        self.prefix = f"shard-{run_id}-{rank:02d}"
        self.number = 0
        self.tensors: dict[str, np.ndarray] = {}
        self.records: list[Record] = []

    def write(self, record: Record, embedding: np.ndarray, times: np.ndarray | None) -> None:
        name = tensor_name(record.key)
        if name in self.tensors:
            raise InputError(f"its tensor name {name!r} is taken by another input in the shard")
        self.tensors[name] = np.ascontiguousarray(embedding)
        if times is not None:
            self.tensors[name + "#times"] = times
        record.output = name
        self.records.append(record)
        if len(self.records) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        name = f"{self.prefix}-{self.number:05d}.safetensors"
        with atomic_write(self.output_dir / name) as f:
            f.write(save_safetensors(self.tensors, metadata={"format": "beats-embeddings"}))
        for record in self.records:
            record.output = f"{name}#{record.output}"
            self.manifest.append(record)
        self.number += 1
        self.tensors, self.records = {}, []

    def close(self) -> None:
        self.flush()


# --------------------------------------------------------------------------- settings
def check_run_file(output_dir: Path, fingerprint: dict[str, Any], resume: bool) -> None:
    """Refuse to mix runs: a resumed run needs the same settings, a new one an unused
    folder. Then record the settings in ``run.json``."""
    path = output_dir / RUN_FILE
    if resume and path.exists():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in fingerprint.items() if before.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise InputError(
                f"cannot resume in {output_dir}: the earlier run used other settings "
                f"({details}); use a new output folder or the same settings"
            )
    elif not resume and (output_dir / MANIFEST).exists():
        raise RunExistsError(
            f"{output_dir} already holds a run ({MANIFEST}); pass --resume to continue it "
            "or choose an empty output folder"
        )
    with atomic_write(path, "w") as f:
        json.dump(fingerprint, f, indent=2)


def fold_rank_manifests(output_dir: Path) -> None:
    """Append every ``manifest.rankNNN.jsonl`` to manifest.jsonl in key order, then delete
    the parts."""
    parts = sorted(output_dir.glob("manifest.rank*.jsonl"))
    if not parts:
        return
    records = [r for p in parts for r in read_manifest(p)]
    with ManifestWriter(output_dir / MANIFEST) as manifest:
        for record in sorted(records, key=lambda r: r.key):
            manifest.append(record)
    for p in parts:
        p.unlink()


# --------------------------------------------------------------------------- resume
def completed(output_dir: Path, previous: dict[str, Record], npy: bool) -> dict[str, Record]:
    """The records (by key) whose outputs exist, whole (npy: with the recorded shape;
    safetensors: the shard holds the tensor)."""
    done: dict[str, Record] = {}
    shards: dict[str, set[str]] = {}
    for key, record in previous.items():
        if record.status not in (OK, PADDED) or record.output is None:
            continue
        if npy:
            try:
                shape = np.load(output_dir / record.output, mmap_mode="r").shape
            except (OSError, ValueError):
                continue
            if list(shape) == record.shape:
                done[key] = record
            continue
        shard, _, name = record.output.partition("#")
        if shard not in shards:
            try:
                with safe_open(output_dir / shard, "np") as f:
                    shards[shard] = set(f.keys())
            except Exception:  # missing or damaged shard: its records are redone
                shards[shard] = set()
        if name in shards[shard]:
            done[key] = record
    return done


def _same_file(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def earlier_keys(items: list[InputFile], previous: dict[str, Record]) -> list[InputFile]:
    """Key inputs as the earlier run in this folder did, whatever the spelling of the
    inputs now: an input below a folder the earlier run took inputs from (its record's
    input path minus its key) gets its key relative to that folder (the deepest one).
    So ``my_audio/`` then ``--resume my_audio/speech`` both write ``speech/...``."""
    roots = {r.input[: -len(r.key)] for r in previous.values()
             if r.input.endswith("/" + r.key)}
    if not roots:
        return items
    out = []
    for item in items:
        path = abs_input(item.path)
        key = item.key
        for parent in Path(path).parents:  # the deepest first
            root = os.path.join(parent, "")
            if root in roots:
                key = safe_key(Path(path[len(root):]))
                break
        out.append(InputFile(item.path, key))
    seen: dict[str, Path] = {}
    for item in out:
        if item.key in seen:
            raise InputError(
                f"cannot resume: {seen[item.key]} and {item.path} both map to the output "
                f"{item.key!r} given the earlier run's layout; use a new output folder"
            )
        seen[item.key] = item.path
    return out


def split_done(
    items: list[InputFile], done: dict[str, Record]
) -> tuple[list[InputFile], int]:
    """(inputs still to do, how many are done). An input is done when a complete record
    holds its file (its absolute or real path), or its key and the file the record names
    is this one or no longer exists (the inputs were moved). An input whose key holds the
    output of another file that still exists is refused: redoing it would overwrite that."""
    by_file = {os.path.realpath(r.input) for r in done.values()}
    todo, skipped, clashes = [], 0, []
    for item in items:
        path = abs_input(item.path)
        record = done.get(item.key)
        if os.path.realpath(path) in by_file:
            skipped += 1
        elif record is None:
            todo.append(item)
        elif _same_file(record.input, path) or not os.path.exists(record.input):
            skipped += 1
        else:
            clashes.append((item, record))
    if clashes:
        item, record = clashes[0]
        raise InputError(
            f"cannot resume: {len(clashes)} input(s) would overwrite outputs of other "
            f"files, e.g. {printable(abs_input(item.path))} -> {printable(item.key)}, which holds "
            f"{printable(record.input)}; resume with the earlier run's inputs, or use a "
            "new output folder"
        )
    return todo, skipped


def adopt_unrecorded(
    output_dir: Path, items: list[InputFile], manifest: ManifestWriter
) -> set[str]:
    """npy outputs written by a run killed before it could record them: writes are atomic,
    so an existing file is complete. Record them (``recovered``) instead of recomputing."""
    adopted = set()
    for item in items:
        try:
            path = output_path(output_dir, item.key, NpyWriter.suffix)
            if not path.exists():
                continue
            shape = np.load(path, mmap_mode="r").shape
            info = audio_info(item.path)
        except (AudioError, OSError, ValueError):
            continue
        status = PADDED if info.duration * 16000 < MIN_SAMPLES else OK
        manifest.append(Record(
            abs_input(item.path), item.key, status, info.duration, info.sample_rate,
            path.relative_to(output_dir.resolve()).as_posix(), list(shape),
            extra={"recovered": True},
        ))
        adopted.add(item.key)
    return adopted


# --------------------------------------------------------------------------- events
EVENTS_FILE = "events.tsv"
SCORES_DIR = "scores"
EVENT_FORMATS = ("tsv", "audacity", "raven", "json")
# One file per input beside events.tsv, by format (tsv: events.tsv only).
EVENT_SUFFIXES = {"audacity": ".txt", "raven": ".selections.txt", "json": ".json"}
EVENTS_HEADER = "filename\tonset\toffset\tevent_label\tscore\n"


def _time(seconds: float) -> str:
    return f"{seconds:.3f}"


def events_table(rows: list[tuple[str, Event]]) -> str:
    """A DCASE event table: ``filename onset offset event_label score``, tab-separated,
    with its header."""
    lines = [EVENTS_HEADER]
    for name, e in rows:
        lines.append(f"{clean_label(printable(name))}\t{_time(e.onset)}\t{_time(e.offset)}\t"
                     f"{clean_label(e.label)}\t{e.score:.4f}\n")
    return "".join(lines)


def audacity_labels(events: list[Event]) -> str:
    """An Audacity label track (File > Import > Labels): ``start end label`` per line,
    the score in brackets after the label."""
    return "".join(f"{_time(e.onset)}\t{_time(e.offset)}\t{clean_label(e.label)} "
                   f"({e.score:.2f})\n" for e in events)


def raven_table(events: list[Event], high_hz: float = 8000.0) -> str:
    """A Raven selection table: one selection per event over the whole band (0 Hz to
    ``high_hz``), with ``Annotation`` and ``Score`` columns."""
    lines = ["Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\tLow Freq (Hz)\t"
             "High Freq (Hz)\tAnnotation\tScore\n"]
    for i, e in enumerate(events, start=1):
        lines.append(f"{i}\tSpectrogram 1\t1\t{_time(e.onset)}\t{_time(e.offset)}\t0\t"
                     f"{high_hz:g}\t{clean_label(e.label)}\t{e.score:.4f}\n")
    return "".join(lines)


def scores_table(probs: np.ndarray, labels: list[str]) -> str:
    """Frame scores as sed_scores_eval reads them: columns ``onset offset`` and one per
    class, one row per 160 ms step (step t from 0.16 t to 0.16 (t + 1) seconds)."""
    buffer = io.StringIO()
    buffer.write("\t".join(["onset", "offset", *map(clean_label, labels)]) + "\n")
    steps = np.arange(len(probs))
    table = np.column_stack([step_time(steps), step_time(steps + 1), probs.astype(np.float64)])
    np.savetxt(buffer, table, fmt=["%.3f", "%.3f"] + ["%.7g"] * len(labels), delimiter="\t")
    return buffer.getvalue()


def scores_path(output_dir: Path, key: str) -> Path:
    """``OUT/scores/<key without its audio suffix>.tsv``: sed_scores_eval names a file's
    scores after the file name without its extension."""
    stem = key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key
    return output_path(output_dir / SCORES_DIR, stem, ".tsv")


def record_events(record: Record) -> list[Event] | None:
    """The events a ``beats detect`` manifest record holds (None: not a detect record)."""
    raw = record.extra.get("events")
    if not isinstance(raw, list):
        return None
    try:
        return [Event(float(a), float(b), str(c), float(d)) for a, b, c, d in raw]
    except (TypeError, ValueError):
        return None


class EventWriter:
    """The outputs of ``beats detect``: each input's events (in its manifest record, and
    in a file per input for the audacity, raven and json formats), its frame scores with
    ``save_scores``, and ``events.tsv`` for all inputs, rewritten from the manifest when
    the run ends (so a resumed run's table holds the earlier runs' files too)."""

    def __init__(self, output_dir: Path, manifest: ManifestWriter,
                 decode: Callable[[np.ndarray], list[Event]], labels: list[str],
                 fmt: str = "tsv", save_scores: bool = False) -> None:
        if fmt not in EVENT_FORMATS:
            raise InputError(f"format {fmt!r}: choose one of {EVENT_FORMATS}")
        self.output_dir = output_dir
        self.manifest = manifest
        self.decode = decode
        self.labels = labels
        self.fmt = fmt
        self.save_scores = save_scores

    def write(self, record: Record, probs: np.ndarray, times: np.ndarray | None) -> None:
        events = self.decode(probs)
        outputs = []
        if self.save_scores:
            path = scores_path(self.output_dir, record.key)
            with atomic_write(path, "w") as f:
                f.write(scores_table(probs, self.labels))
            outputs.append(path)
        if self.fmt != "tsv":
            path = output_path(self.output_dir, record.key, EVENT_SUFFIXES[self.fmt])
            if self.fmt == "audacity":
                text = audacity_labels(events)
            elif self.fmt == "raven":
                text = raven_table(events, (record.sample_rate or 16000) / 2)
            else:
                text = json.dumps({"filename": printable(record.key), "duration": record.duration,
                                   "events": [{"onset": e.onset, "offset": e.offset,
                                               "event_label": e.label, "score": e.score}
                                              for e in events]}, indent=1) + "\n"
            with atomic_write(path, "w") as f:
                f.write(text)
            outputs.insert(0, path)
        root = self.output_dir.resolve()
        record.output = outputs[0].relative_to(root).as_posix() if outputs else None
        record.extra["events"] = [[e.onset, e.offset, e.label, e.score] for e in events]
        self.manifest.append(record)

    def close(self) -> None:
        """Write ``events.tsv``: every input's events, by file name then onset."""
        records = latest_by_key(read_manifest(self.output_dir / MANIFEST))
        rows = []
        for key in sorted(records):
            events = record_events(records[key])
            if records[key].status in (OK, PADDED) and events is not None:
                rows += [(key, e) for e in events]
        with atomic_write(self.output_dir / EVENTS_FILE, "w") as f:
            f.write(events_table(rows))



def events_completed(output_dir: Path, previous: dict[str, Record], fmt: str,
                     save_scores: bool) -> dict[str, Record]:
    """The earlier ``beats detect`` records whose events and files are all there."""
    done = {}
    for key, record in previous.items():
        if record.status not in (OK, PADDED) or record_events(record) is None:
            continue
        try:
            wanted = ([scores_path(output_dir, key)] if save_scores else []) + (
                [output_path(output_dir, key, EVENT_SUFFIXES[fmt])] if fmt != "tsv" else [])
        except ValueError:
            continue
        if all(p.is_file() for p in wanted):
            done[key] = record
    return done


def read_scores_table(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A frame-score table (`scores_table`): ``(timestamps (steps + 1,), scores (steps,
    classes), class names)``, ready for `beats.sed_metrics.psds`."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    if header[:2] != ["onset", "offset"] or len(header) < 3:
        raise InputError(f"{path}: not a frame-score table (columns onset, offset, classes)")
    table = np.loadtxt(path, delimiter="\t", skiprows=1, ndmin=2)
    return np.append(table[:, 0], table[-1, 1]), table[:, 2:], header[2:]
