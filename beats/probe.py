"""Linear and attentive probes on BEATs embeddings (``beats probe``).

A labelled set comes from a folder (one subfolder per class) or a CSV with columns
``path,label[,fold]`` (paths relative to the CSV; several labels joined by ``;`` make the
task multi-label). Embeddings come from a ``beats extract`` output folder (matched by
input path, nothing recomputed) or are computed from the audio into ``OUT/embeddings``
with the same engine, so both routes train on the same numbers.

Training is a plain loop: features standardised with training-set statistics, AdamW,
mini-batches, early stopping on the validation metric (accuracy, or mAP for multi-label;
ties go to the lower validation loss), best weights kept. The probe is saved as
``head.safetensors`` + ``head.json``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file
from torch import nn

from .audio import AUDIO_EXTENSIONS
from .files import InputFile, atomic_path, atomic_write
from .heads import Head, classification_loss
from .manifest import FAILED, latest_by_key, read_manifest
from .metrics import accuracy, macro_f1, mean_average_precision

KINDS = ("linear", "attentive")


# --------------------------------------------------------------------------- data
@dataclass
class LabelledSet:
    """Audio files with labels. ``labels[i]`` is a tuple of class names."""

    paths: list[Path]
    labels: list[tuple[str, ...]]
    folds: list[str | None]
    classes: list[str] = field(default_factory=list)
    multilabel: bool = False

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("the labelled set is empty")
        if not self.classes:
            self.classes = sorted({c for labels in self.labels for c in labels})
        if len(self.classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, found {self.classes}")
        self.multilabel = self.multilabel or any(len(ls) != 1 for ls in self.labels)

    def targets(self) -> torch.Tensor:
        """(N,) class indices, or (N, K) 0/1 for multi-label."""
        index = {c: i for i, c in enumerate(self.classes)}
        if not self.multilabel:
            return torch.tensor([index[ls[0]] for ls in self.labels])
        out = torch.zeros(len(self.labels), len(self.classes))
        for i, ls in enumerate(self.labels):
            out[i, [index[c] for c in ls]] = 1.0
        return out


def read_folder(root: str | os.PathLike) -> LabelledSet:
    """One subfolder per class; audio files found recursively inside each."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for name in classes:
        for dirpath, dirs, files in os.walk(root / name):
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(AUDIO_EXTENSIONS) and not f.startswith("."):
                    paths.append((Path(dirpath) / f).resolve())
                    labels.append((name,))
    if not paths:
        raise ValueError(f"{root}: no audio files in class subfolders (expected {root}/CLASS/*)")
    return LabelledSet(paths, labels, [None] * len(paths), classes)


def read_csv(path: str | os.PathLike) -> LabelledSet:
    """A labelled table, in one of two layouts (paths relative to the CSV):

    - ``path,label[,fold]``: ``label`` holds one class, or several joined by ``;``
      (multi-label);
    - ``path,CLASS_1,...,CLASS_K[,fold]``: a multi-label header naming the classes, each
      row 1 (or 0 / empty) under each class.

    A row whose fields do not match the header is refused with its line number.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        rows = list(reader)
    if "path" not in header or len(header) < 2:
        raise ValueError(f"{path}: needs a header with columns path,label[,fold] (or "
                         "path,CLASS_1,...,CLASS_K[,fold] for multi-label)")
    wide = "label" not in header
    classes = [h for h in header if h not in ("path", "fold")] if wide else []
    if wide and len(classes) < 2:
        raise ValueError(f"{path}: a multi-label header needs 2 or more class columns after "
                         f"'path', got {classes}")
    paths, labels, folds = [], [], []
    for number, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"{path}:{number}: the row has a different number of fields "
                             f"than the header ({len(header)}: {','.join(header)})")
        row = {k.strip(): v.strip() for k, v in row.items()}
        if wide:
            bad = {c: row[c] for c in classes if row[c] not in ("0", "1", "")}
            if bad:
                raise ValueError(f"{path}:{number}: {bad} do not match the multi-label "
                                 "header: each class column holds 1 (has the label) or 0")
            names = tuple(sorted(c for c in classes if row[c] == "1"))
        else:
            names = tuple(sorted({x.strip() for x in row["label"].split(";") if x.strip()}))
            if not names:
                raise ValueError(f"{path}:{number}: empty label")
        p = Path(row["path"])
        paths.append((p if p.is_absolute() else path.parent / p).resolve())
        labels.append(names)
        folds.append(row.get("fold") or None)
    return LabelledSet(paths, labels, folds, classes=sorted(classes), multilabel=wide)


def read_labelled_set(source: str | os.PathLike) -> LabelledSet:
    source = Path(source)
    if source.is_dir():
        return read_folder(source)
    if source.suffix.lower() == ".csv":
        return read_csv(source)
    raise ValueError(f"{source}: give a folder with one subfolder per class, or a .csv")


def input_files(paths: list[Path]) -> list[InputFile]:
    """Inputs keyed by their path below the files' common folder."""
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [InputFile(p, p.relative_to(root).as_posix()) for p in paths]


def load_cached(embeddings_dir: str | os.PathLike, paths: list[Path]) -> list[np.ndarray]:
    """The embeddings a ``beats extract`` run wrote for ``paths`` (matched by absolute path)."""
    out_dir = Path(embeddings_dir)
    records = latest_by_key(read_manifest(out_dir / "manifest.jsonl"))
    if not records:
        raise FileNotFoundError(f"{out_dir}: no manifest.jsonl; is it a `beats extract` output?")
    by_input = {str(Path(r.input).resolve()): r for r in records.values()}
    shards: dict[str, dict[str, np.ndarray]] = {}
    arrays, missing = [], []
    for p in paths:
        record = by_input.get(str(p))
        if record is None or record.status == FAILED or record.output is None:
            missing.append(str(p))
            continue
        if "#" in record.output:
            shard, key = record.output.split("#", 1)
            if shard not in shards:
                shards[shard] = load_numpy(out_dir / shard)
            arrays.append(shards[shard][key])
        else:
            arrays.append(np.load(out_dir / record.output))
    if missing:
        raise ValueError(
            f"{len(missing)} labelled file(s) have no embedding in {out_dir}, e.g. "
            f"{missing[:3]}; run `beats extract` on them (or train from audio)"
        )
    return arrays


# --------------------------------------------------------------------------- model
def as_sequence(embedding: np.ndarray) -> np.ndarray:
    """(C,) -> (1, C); (T, C) as is; (T, 8, C) -> (8T, C)."""
    if embedding.ndim == 1:
        return embedding[None]
    if embedding.ndim == 3:
        return embedding.reshape(-1, embedding.shape[-1])
    if embedding.ndim == 2:
        return embedding
    raise ValueError(
        f"embeddings of shape {embedding.shape} hold several layers; extract one layer "
        "(--layers k) for a probe"
    )


def collate(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad sequences to (B, S, C) with a padding mask (B, S)."""
    seqs = [torch.from_numpy(as_sequence(a).astype(np.float32)) for a in arrays]
    longest = max(s.shape[0] for s in seqs)
    x = torch.zeros(len(seqs), longest, seqs[0].shape[-1])
    mask = torch.ones(len(seqs), longest, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = s
        mask[i, : len(s)] = False
    return x, mask


class Probe(nn.Module):
    """Standardisation then a `Head`: (B, S, C), mask -> logits (B, classes)."""

    def __init__(self, dim: int, num_classes: int, kind: str = "linear") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"probe kind {kind!r}: choose one of {KINDS}")
        self.kind = kind
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.head = Head(dim, num_classes, pooling="mean" if kind == "linear" else "attentive")

    def set_normalisation(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        valid = x[~mask]
        self.mean.copy_(valid.mean(dim=0))
        self.std.copy_(valid.std(dim=0).clamp(min=1e-6))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.mean) / self.std, mask)


# --------------------------------------------------------------------------- metrics
def metrics(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> dict[str, float]:
    """accuracy and macro F1 (single-label), or mAP (multi-label): see `beats.metrics`."""
    if multilabel:
        return {"mAP": mean_average_precision(logits, targets)[0]}
    return {"accuracy": accuracy(logits, targets), "macro_f1": macro_f1(logits, targets)}


def _score(m: dict[str, float]) -> float:
    return m.get("mAP", m.get("accuracy", 0.0))


# --------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Optimiser and early-stopping settings of `fit`."""

    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    patience: int = 20
    seed: int = 0


def fit(probe: Probe, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
        train: list[int], val: list[int], config: TrainConfig, multilabel: bool
        ) -> list[dict[str, float]]:
    """Train ``probe`` on rows ``train``; early-stop on ``val`` (if any); keep the best.

    Returns the per-epoch history (train loss, validation metrics).
    """
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    probe.set_normalisation(x[train], mask[train])
    opt = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_t = torch.tensor(train)
    best: tuple[float, float] | None = None
    best_state, since, history = None, 0, []
    for epoch in range(config.epochs):
        probe.train()
        order = train_t[torch.randperm(len(train_t), generator=g)]
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            opt.zero_grad()
            loss = classification_loss(probe(x[rows], mask[rows]), y[rows], multilabel)
            loss.backward()
            opt.step()
            total += loss.item() * len(rows)
        entry = {"epoch": epoch + 1, "train_loss": total / len(order)}
        if val:
            probe.eval()
            with torch.no_grad():
                logits = probe(x[val], mask[val])
                entry["val_loss"] = float(classification_loss(logits, y[val], multilabel))
                entry.update(metrics(logits, y[val], multilabel))
            # small validation sets saturate the metric early: ties go to the lower loss
            score = (_score(entry), -entry["val_loss"])
            if best is None or score > best:
                best, since = score, 0
                best_state = {k: v.clone() for k, v in probe.state_dict().items()}
            else:
                since += 1
        history.append(entry)
        if val and since >= config.patience:
            break
    if best_state is not None:
        probe.load_state_dict(best_state)
    probe.eval()
    return history


def stratified_split(labels: list[tuple[str, ...]], rows: list[int], fraction: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """Split ``rows`` into (kept, held out) with about ``fraction`` of each class held out."""
    if fraction <= 0:
        return rows, []
    rng = np.random.default_rng(seed)
    by_class: dict[tuple[str, ...], list[int]] = {}
    for r in rows:
        by_class.setdefault(labels[r][:1], []).append(r)
    kept, held = [], []
    for members in by_class.values():
        members = list(rng.permutation(members))
        n = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        held += members[:n]
        kept += members[n:]
    return sorted(kept), sorted(held)


# --------------------------------------------------------------------------- storage
def save_probe(out_dir: str | os.PathLike, probe: Probe, meta: dict[str, Any]) -> None:
    """``head.safetensors`` (weights) + ``head.json`` (classes, kind, embedding settings)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "head.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(tmp))
    with atomic_write(out_dir / "head.json", "w") as f:
        json.dump(meta, f, indent=2)


def load_probe(out_dir: str | os.PathLike) -> tuple[Probe, dict[str, Any]]:
    out_dir = Path(out_dir)
    if not (out_dir / "head.json").exists():
        raise FileNotFoundError(f"{out_dir}: no head.json; is it a `beats probe` output?")
    meta = json.loads((out_dir / "head.json").read_text())
    state = load_file(str(out_dir / "head.safetensors"))
    dim = state["mean"].numel()
    probe = Probe(dim, len(meta["classes"]), meta["kind"])
    probe.load_state_dict(state)
    return probe.eval(), meta
