"""Labelled audio sets: reading them, checking them and splitting them by file.

The one place for every labelled layout that ``beats probe`` and ``beats finetune`` take:

- a folder with one subfolder per class (audio found recursively inside each);
- a CSV ``path,label[,fold]``: one class per row, or several joined by ``;`` (multi-label);
- a multi-label CSV ``path,CLASS_1,...,CLASS_K[,fold]`` with 1 (has the label) or 0 cells;
- a DCASE strong-label TSV ``filename onset offset event_label`` (`read_strong_tsv`):
  sound events with their times in seconds, grouped per file.

Paths in a table are relative to the table's folder. A set holds every file once (files are
the same when their resolved paths are): a row that repeats an earlier one exactly is
dropped, with one warning saying how many were; a file listed again with other labels is
refused with both row numbers in a single-label set and gets the union of the labels in a
multi-label one; a file listed in two folds is refused. `split_by_file` then puts each file
in exactly one of train, validation and test.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .audio import AUDIO_EXTENSIONS, AudioError, audio_info
from .errors import InputError

STRONG_COLUMNS = ("filename", "onset", "offset", "event_label")
END_TOLERANCE = 0.01  # seconds an event may run past its file's end (annotation rounding)
SHOWN = 3  # conflicts or bad rows named in one message before "and N more"


class LabelledDataWarning(UserWarning):
    """Something about a labelled set that the run works around: dropped duplicate rows,
    a class too small to be in every split."""


class Event(NamedTuple):
    """One sound event of a strong label: ``label`` sounds from ``onset`` to ``offset``
    (seconds from the file's start)."""

    onset: float
    offset: float
    label: str


@dataclass
class LabelledSet:
    """Audio with labels, one entry per file.

    Attributes:
        sources: absolute resolved paths, or 1-D arrays of 16 kHz samples (Python API).
        labels: ``labels[i]``, the class names of entry i (sorted; empty for a file of a
            strong-label set with no event, or a multi-label row with no 1).
        folds: ``folds[i]``, the CSV fold of entry i, or None.
        classes: every class, in the order of the model's outputs.
        multilabel: whether an entry may hold several labels (sigmoid, mAP) or exactly one.
        events: strong labels only: ``events[i]``, the events of entry i, by onset.
    """

    sources: list[Any]
    labels: list[tuple[str, ...]]
    folds: list[str | None]
    classes: list[str] = field(default_factory=list)
    multilabel: bool = False
    events: list[tuple[Event, ...]] | None = None

    def __post_init__(self) -> None:
        if not self.sources:
            raise InputError("the labelled set is empty")
        if not len(self.sources) == len(self.labels) == len(self.folds):
            raise InputError("sources, labels and folds must have one entry per file")
        if not self.classes:
            self.classes = sorted({c for ls in self.labels for c in ls})
        self.multilabel = self.multilabel or any(len(ls) != 1 for ls in self.labels)

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def paths(self) -> list[Path]:
        """The sources as paths (a set read from a folder or a table holds only paths)."""
        if not all(isinstance(s, Path) for s in self.sources):
            raise InputError("this labelled set holds arrays, not files")
        return list(self.sources)

    def targets(self) -> torch.Tensor:
        """(N,) class indices, or (N, K) 0/1 floats for a multi-label set."""
        index = {c: i for i, c in enumerate(self.classes)}
        if not self.multilabel:
            return torch.tensor([index[ls[0]] for ls in self.labels])
        out = torch.zeros(len(self.labels), len(self.classes))
        for i, ls in enumerate(self.labels):
            out[i, [index[c] for c in ls]] = 1.0
        return out

    def digest(self) -> dict[str, Any]:
        """``{"files": N, "digest": hex}``: a SHA-256 of every entry's file (or samples),
        labels, fold and events, and of the classes, in order. Two sets with the same
        digest list the same files with the same labels."""
        h = hashlib.sha256()
        h.update(json.dumps([self.classes, self.multilabel]).encode())
        for i, source in enumerate(self.sources):
            h.update(b"\0")
            if isinstance(source, Path):
                h.update(os.fsencode(source))
            else:
                h.update(np.ascontiguousarray(np.asarray(source, dtype=np.float32)).tobytes())
            entry = [list(self.labels[i]), self.folds[i]]
            if self.events is not None:
                entry.append([list(e) for e in self.events[i]])
            h.update(json.dumps(entry).encode())
        return {"files": len(self.sources), "digest": h.hexdigest()}

    @classmethod
    def from_items(cls, items: Iterable[Sequence[Any]], classes: Sequence[str] | None = None,
                   multilabel: bool | None = None) -> LabelledSet:
        """A set from ``(source, label)`` or ``(source, label, fold)`` items: ``source`` a
        path or a 1-D array of 16 kHz samples, ``label`` a class name or a list of names.

        ``classes`` fixes the class order (default: sorted); ``multilabel`` (default: any
        item with other than one label) also decides what a path given twice with other
        labels means: merged labels, or an error. Exact repeats are dropped with a warning.
        """
        rows = _Rows("the items", "item")
        given = []
        for number, item in enumerate(items):
            source, label = item[0], item[1]
            names = (label,) if isinstance(label, str) else tuple(label)
            fold = None if len(item) < 3 or item[2] is None else str(item[2])
            given.append((number, source, tuple(sorted(set(names))), fold))
        if multilabel is None:
            multilabel = any(len(names) != 1 for _, _, names, _ in given)
        for number, source, names, fold in given:
            if isinstance(source, (str, os.PathLike)):
                source = Path(source).resolve()
            rows.add(number, source, names, fold)
        data = rows.build(multilabel)
        found = sorted({c for ls in data.labels for c in ls})
        if classes is not None:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise InputError(f"labels {unknown} are not among the classes {list(classes)}")
            data.classes = list(classes)
        return data

    @classmethod
    def read(cls, source: str | os.PathLike) -> LabelledSet:
        """`read_labelled_set`."""
        return read_labelled_set(source)


# --------------------------------------------------------------------------- one file once
class _Rows:
    """Rows gathered into one entry per file: exact repeats dropped (counted), other
    labels merged (multi-label) or refused (single-label), other folds refused.

    ``where`` names the set in messages; ``unit`` is what a row number counts (``row`` of a
    table, ``item`` of a list, ``file`` of a folder)."""

    def __init__(self, where: str, unit: str) -> None:
        self.where, self.unit = where, unit
        self.sources: list[Any] = []
        self.labels: list[tuple[str, ...]] = []
        self.folds: list[str | None] = []
        self.first: list[Any] = []  # the row that introduced each entry
        self.index: dict[str, int] = {}
        self.pending: list[tuple[Any, Any, tuple[str, ...]]] = []  # (first row, row, labels)
        self.conflicts: dict[str, list[str]] = {"labels": [], "folds": []}
        self.dropped = 0

    def add(self, row: Any, source: Any, labels: tuple[str, ...], fold: str | None) -> int:
        """Add a row; returns the index of its file's entry."""
        key = os.fsdecode(source) if isinstance(source, Path) else None
        if key is None or key not in self.index:
            if key is not None:
                self.index[key] = len(self.sources)
            self.sources.append(source)
            self.labels.append(labels)
            self.folds.append(fold)
            self.first.append(row)
            return len(self.sources) - 1
        i = self.index[key]
        if self.folds[i] != fold:
            self.conflicts["folds"].append(
                f"{self.unit}s {self.first[i]} and {row} put {Path(key).name} in folds "
                f"{self.folds[i]} and {fold}")
        elif self.labels[i] == labels:
            self.dropped += 1
        else:
            self.pending.append((i, row, labels))
        return i

    def build(self, multilabel: bool, events: list[tuple[Event, ...]] | None = None
              ) -> LabelledSet:
        """The set; raises `InputError` naming the conflicting rows, warns of repeats."""
        for i, row, labels in self.pending:
            if multilabel:
                self.labels[i] = tuple(sorted(set(self.labels[i]) | set(labels)))
            else:
                name = Path(os.fsdecode(self.sources[i])).name
                self.conflicts["labels"].append(
                    f"{self.unit}s {self.first[i]} and {row} give {name} the labels "
                    f"{'/'.join(self.labels[i]) or '(none)'} and {'/'.join(labels) or '(none)'}")
        if self.conflicts["folds"]:
            raise InputError(f"{self.where}: a file is in one fold only, but "
                             f"{_listed(self.conflicts['folds'])}; keep one row per file")
        if self.conflicts["labels"]:
            raise InputError(
                f"{self.where}: a file has one label in a single-label set, but "
                f"{_listed(self.conflicts['labels'])}; keep one row per file (or join its "
                "labels with ';' to make the set multi-label)")
        if self.dropped:
            warnings.warn(f"{self.where}: {self.dropped} duplicate {self.unit}(s) dropped "
                          "(a file listed again with the same labels)", LabelledDataWarning,
                          stacklevel=3)
        if not self.sources:
            raise InputError(f"{self.where}: the labelled set is empty")
        return LabelledSet(self.sources, self.labels, self.folds, multilabel=multilabel,
                           events=events)


def _listed(parts: list[str]) -> str:
    """The first few of ``parts`` joined, then how many more there are."""
    text = "; ".join(parts[:SHOWN])
    return text + (f"; and {len(parts) - SHOWN} more" if len(parts) > SHOWN else "")


def _rows_text(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:5]))
    return shown + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")


# --------------------------------------------------------------------------- readers
def read_folder(root: str | os.PathLike) -> LabelledSet:
    """One subfolder per class (its name is the class); audio files found recursively."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    rows = _Rows(str(root), "file")
    for name in classes:
        for dirpath, dirs, files in os.walk(root / name):
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(AUDIO_EXTENSIONS) and not f.startswith("."):
                    path = Path(dirpath) / f
                    rows.add(path.relative_to(root).as_posix(), path.resolve(), (name,), None)
    if not rows.sources:
        raise InputError(f"{root}: no audio files in class subfolders (expected "
                         f"{root}/CLASS/*)")
    data = rows.build(multilabel=False)
    data.classes = classes  # an empty class folder is still a class (finetune names it)
    return data


def _read_text(path: Path) -> str:
    """A table's text: UTF-8 (a byte-order mark is allowed); anything else is one clear
    error naming the file and the encoding expected."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:4096]:
        raise InputError(f"{path}: the file is UTF-16 text; labelled tables must be UTF-8: "
                         "save it as UTF-8 (in a spreadsheet: 'CSV UTF-8')")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); "
                         "labelled tables must be UTF-8: save the file as UTF-8") from None


def read_csv(path: str | os.PathLike) -> LabelledSet:
    """A labelled table in one of two layouts (paths relative to the CSV):

    - ``path,label[,fold]``: ``label`` holds one class, or several joined by ``;``
      (multi-label);
    - ``path,CLASS_1,...,CLASS_K[,fold]``: a multi-label header naming the classes, each
      row 1 (or 0 / empty) under each class.

    A row whose fields do not match the header is refused with its line number; repeated
    files as the module docstring says.
    """
    path = Path(path)
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    if "path" not in header or len(header) < 2:
        raise InputError(f"{path}: needs a header with columns path,label[,fold] (or "
                         "path,CLASS_1,...,CLASS_K[,fold] for multi-label)")
    wide = "label" not in header
    classes = [h for h in header if h not in ("path", "fold")] if wide else []
    if wide and len(classes) < 2:
        raise InputError(f"{path}: a multi-label header needs 2 or more class columns after "
                         f"'path', got {classes}")
    parsed = []
    for number, row in enumerate(reader, start=2):
        if None in row or any(v is None for v in row.values()):
            raise InputError(f"{path}:{number}: the row has a different number of fields "
                             f"than the header ({len(header)}: {','.join(header)})")
        row = {k: v.strip() for k, v in row.items()}
        if wide:
            bad = {c: row[c] for c in classes if row[c] not in ("0", "1", "")}
            if bad:
                raise InputError(f"{path}:{number}: {bad} do not match the multi-label "
                                 "header: each class column holds 1 (has the label) or 0")
            names = tuple(sorted(c for c in classes if row[c] == "1"))
        else:
            names = tuple(sorted({x.strip() for x in row["label"].split(";") if x.strip()}))
            if not names:
                raise InputError(f"{path}:{number}: empty label")
        if not row["path"]:
            raise InputError(f"{path}:{number}: empty path")
        parsed.append((number, row["path"], names, row.get("fold") or None))
    multilabel = wide or any(len(names) != 1 for _, _, names, _ in parsed)
    rows = _Rows(str(path), "row")
    for number, name, names, fold in parsed:
        p = Path(name)
        rows.add(number, (p if p.is_absolute() else path.parent / p).resolve(), names, fold)
    data = rows.build(multilabel)
    if wide:
        data.classes = sorted(classes)
    return data


def read_strong_tsv(path: str | os.PathLike) -> LabelledSet:
    """A DCASE strong-label table: tab-separated, header ``filename onset offset
    event_label``, one row per event (seconds), paths relative to the table's folder. A
    file with no event is one row with empty onset, offset and label.

    Returns a multi-label set: ``events[i]`` holds file i's events by onset, ``labels[i]``
    their classes. Rows that repeat an event exactly are dropped with one warning. Bad
    rows are refused together, in one line naming their numbers (`InputError`): unknown
    or missing columns, fields that do not match the header, an empty file name, times that
    are not numbers, negative, or with the onset after the offset, an event half given, a
    file that does not exist, an event ending past its file's end (when the audio header
    gives the duration; `END_TOLERANCE` allowed).
    """
    path = Path(path)
    table = list(csv.reader(io.StringIO(_read_text(path), newline=""), delimiter="\t"))
    while table and not any(x.strip() for x in table[-1]):
        table.pop()
    header = [h.strip() for h in table[0]] if table else []
    unknown = [h for h in header if h not in STRONG_COLUMNS]
    missing = [h for h in STRONG_COLUMNS if h not in header]
    if unknown or missing:
        what = ", ".join(filter(None, [f"unknown column(s) {unknown}" if unknown else "",
                                       f"missing column(s) {missing}" if missing else ""]))
        raise InputError(f"{path}: {what}; a strong-label table has the tab-separated "
                         f"header {' '.join(STRONG_COLUMNS)}")
    col = {h: header.index(h) for h in STRONG_COLUMNS}
    bad: dict[str, list[int]] = {}
    durations: dict[str, float | None] = {}
    parsed: list[tuple[int, Path, Event | None]] = []
    for number, fields in enumerate(table[1:], start=2):
        if not any(x.strip() for x in fields):
            continue
        if len(fields) != len(header):
            bad.setdefault(f"not {len(header)} tab-separated fields", []).append(number)
            continue
        name, onset, offset, label = (fields[col[h]].strip() for h in STRONG_COLUMNS)
        if not name:
            bad.setdefault("no file name", []).append(number)
            continue
        file = Path(name) if Path(name).is_absolute() else path.parent / name
        key = os.fsdecode(file)
        if key not in durations:
            durations[key] = _duration(file)
        if durations[key] == -1.0:
            bad.setdefault("file not found", []).append(number)
            continue
        if not (onset or offset or label):
            parsed.append((number, file.resolve(), None))
            continue
        if not (onset and offset and label):
            bad.setdefault("onset, offset and label must all be given (or all empty)",
                           []).append(number)
            continue
        try:
            start, end = float(onset), float(offset)
        except ValueError:
            bad.setdefault("times that are not numbers", []).append(number)
            continue
        if not (math.isfinite(start) and math.isfinite(end)):
            bad.setdefault("times that are not numbers", []).append(number)
        elif start < 0 or end < 0:
            bad.setdefault("negative times", []).append(number)
        elif start > end:
            bad.setdefault("onset after offset", []).append(number)
        elif durations[key] is not None and end > durations[key] + END_TOLERANCE:
            bad.setdefault("event ending after its file", []).append(number)
        else:
            parsed.append((number, file.resolve(), Event(start, end, label)))
    if bad:
        details = "; ".join(f"{why}: row(s) {_rows_text(rows)}" for why, rows in bad.items())
        raise InputError(f"{path}: bad rows ({details}); fix or remove them")
    if not parsed:
        raise InputError(f"{path}: the table lists no file")
    rows = _Rows(str(path), "row")
    events: dict[int, set[Event]] = {}
    repeated = 0
    for number, file, event in parsed:
        i = rows.add(number, file, (), None)
        if event is not None:
            repeated += event in events.setdefault(i, set())
            events[i].add(event)
    rows.dropped = 0  # a file's rows are its events: only a repeated event is a duplicate
    if repeated:
        warnings.warn(f"{path}: {repeated} duplicate row(s) dropped (an event listed twice)",
                      LabelledDataWarning, stacklevel=2)
    per_file = [tuple(sorted(events.get(i, ()))) for i in range(len(rows.sources))]
    rows.labels = [tuple(sorted({e.label for e in evs})) for evs in per_file]
    return rows.build(multilabel=True, events=per_file)


def _duration(file: Path) -> float | None:
    """The file's duration from its header; None when the header cannot be read; -1
    when the file does not exist."""
    if not file.is_file():
        return -1.0
    try:
        return audio_info(file).duration
    except (AudioError, OSError, ValueError):
        return None  # unreadable: it fails (and is recorded) when it is read


def read_labelled_set(source: str | os.PathLike) -> LabelledSet:
    """A labelled set for classification: a class folder, a ``.csv`` or a strong-label
    ``.tsv`` (its files' labels are the classes of their events). Needs 2 or more classes."""
    source = Path(source)
    if source.is_dir():
        data = read_folder(source)
    elif source.suffix.lower() == ".csv":
        data = read_csv(source)
    elif source.suffix.lower() == ".tsv":
        data = read_strong_tsv(source)
    elif not source.exists():
        raise InputError(f"{source} does not exist: give a folder with one subfolder per "
                         "class, a .csv or a strong-label .tsv")
    else:
        raise InputError(f"{source}: give a folder with one subfolder per class, a .csv or "
                         "a strong-label .tsv")
    if len(data.classes) < 2:
        raise InputError(f"{source}: a classifier needs at least 2 classes, found "
                         f"{data.classes}")
    return data


# --------------------------------------------------------------------------- splits
def stratified_split(labels: Sequence[tuple[str, ...]], rows: list[int], fraction: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """Split ``rows`` into (kept, held out) with about ``fraction`` of each class (by its
    first label) held out; a class of one row stays in the kept part."""
    if fraction <= 0:
        return list(rows), []
    rng = np.random.default_rng(seed)
    by_class: dict[tuple[str, ...], list[int]] = {}
    for r in rows:
        by_class.setdefault(tuple(labels[r][:1]), []).append(r)
    kept, held = [], []
    for members in by_class.values():
        members = [int(m) for m in rng.permutation(members)]
        n = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        held += members[:n]
        kept += members[n:]
    return sorted(kept), sorted(held)


def split_by_file(data: LabelledSet, rows: Sequence[int] | None = None, *,
                  val_fraction: float = 0.15, test_fraction: float = 0.2,
                  val_fold: str | None = None, test_fold: str | None = None, seed: int = 0
                  ) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) entries of ``rows`` (default: all), each file in exactly
    one of them.

    The test set is the fold ``test_fold`` when named, else ``test_fraction`` of each
    class (seed ``seed``); validation likewise from the rest (``val_fold``, or
    ``val_fraction`` with seed ``seed + 1``). Raises `InputError` for a named fold that
    holds no file and when no file is left for training; warns when a class has fewer
    files than there are splits (it cannot be in every one).
    """
    rows = list(range(len(data))) if rows is None else list(rows)
    groups: dict[Any, list[int]] = {}
    for r in rows:  # entries naming the same file travel together (sets built by hand)
        source = data.sources[r]
        groups.setdefault(os.fsdecode(source) if isinstance(source, Path) else r, []).append(r)
    firsts = [members[0] for members in groups.values()]
    together = {members[0]: members for members in groups.values()}

    def expand(part: list[int]) -> list[int]:
        return sorted(r for first in part for r in together[first])

    def fold(name: str, what: str, among: list[int]) -> tuple[list[int], list[int]]:
        inside = [r for r in among if data.folds[r] == name]
        if not inside:
            raise InputError(f"no file is in {what} fold {name!r} (folds: "
                             f"{sorted({f for f in data.folds if f is not None})})")
        return [r for r in among if data.folds[r] != name], inside

    if test_fold is not None:
        rest, test = fold(test_fold, "test", firsts)
    else:
        rest, test = stratified_split(data.labels, firsts, test_fraction, seed)
    if val_fold is not None:
        train, val = fold(val_fold, "validation", rest)
    else:
        train, val = stratified_split(data.labels, rest, val_fraction, seed + 1)
    if not train:
        raise InputError("no training files left after the validation/test split: lower "
                         "--val-fraction/--test-fraction or add files")
    wanted = ["train"] + [name for name, on in (
        ("validation", val_fold is not None or val_fraction > 0),
        ("test", test_fold is not None or test_fraction > 0)) if on]
    _warn_small_classes(data, firsts, wanted)
    return expand(train), expand(val), expand(test)


def _warn_small_classes(data: LabelledSet, rows: list[int], splits: list[str]) -> None:
    counts = {c: 0 for c in data.classes}
    for r in rows:
        for c in data.labels[r]:
            counts[c] = counts.get(c, 0) + 1
    small = [f"{c!r} ({n})" for c, n in counts.items() if 0 < n < len(splits)]
    if len(splits) > 1 and small:
        warnings.warn(f"class(es) {', '.join(small)} have fewer files than the "
                      f"{len(splits)} splits ({', '.join(splits)}): they cannot be in every "
                      "split; add files of them or use fewer splits", LabelledDataWarning,
                      stacklevel=3)
