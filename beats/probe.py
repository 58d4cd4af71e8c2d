"""Linear and attentive probes on BEATs embeddings (``beats probe``).

The labelled set is read and split by `beats.labelled` (a folder with one subfolder per
class, a CSV, a strong-label TSV). Embeddings come from a ``beats extract`` output folder
(matched by input path, nothing recomputed) or are computed from the audio into
``OUT/embeddings`` with the same engine (long files in windows), so both routes train on
the same numbers. A file that cannot be embedded is left out and listed in
``OUT/failed.jsonl``.

Training is a plain loop: features standardised with training-set statistics, AdamW,
mini-batches, early stopping on the validation metric (accuracy, or mAP for multi-label;
ties go to the lower validation loss), best weights kept. The probe is saved as
``head.safetensors`` + ``head.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import InputError, NotFoundError
from .files import InputFile, atomic_path, atomic_write
from .heads import Head, classification_loss
from .labelled import (  # noqa: F401 - the probe's data, kept importable from here
    LabelledSet,
    read_csv,
    read_folder,
    read_labelled_set,
    split_by_file,
    stratified_split,
)
from .manifest import FAILED, latest_by_key, read_manifest
from .metrics import accuracy, macro_f1, mean_average_precision
from .options import check, option

KINDS = ("linear", "attentive")
# What a probe writes into its folder; a folder holding one of them holds a probe.
PROBE_FILES = ("head.safetensors", "head.json", "report.json")
FAILED_FILE = "failed.jsonl"  # files that could not be embedded (manifest records)


# --------------------------------------------------------------------------- data
def input_files(paths: list[Path]) -> list[InputFile]:
    """Inputs keyed by their path below the files' common folder."""
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [InputFile(p, p.relative_to(root).as_posix()) for p in paths]


def load_embeddings(embeddings_dir: str | os.PathLike, paths: list[Path]
                    ) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
    """The embeddings a ``beats extract`` run wrote for ``paths`` (matched by absolute path):
    ``arrays[i]`` for ``paths[i]``, None where the run recorded it as failed, and those
    failures as ``[(path, error)]``. A path the run never saw is an `InputError`."""
    out_dir = Path(embeddings_dir)
    records = latest_by_key(read_manifest(out_dir / "manifest.jsonl"))
    if not records:
        raise InputError(f"{out_dir}: no manifest.jsonl; is it a `beats extract` output?")
    by_input = {str(Path(r.input).resolve()): r for r in records.values()}
    shards: dict[str, dict[str, np.ndarray]] = {}
    arrays: list[np.ndarray | None] = []
    failed, missing = [], []
    for p in paths:
        record = by_input.get(str(p))
        if record is None:
            missing.append(str(p))
            arrays.append(None)
        elif record.status == FAILED or record.output is None:
            failed.append((str(p), record.error or "no embedding was written"))
            arrays.append(None)
        elif "#" in record.output:
            shard, key = record.output.split("#", 1)
            if shard not in shards:
                shards[shard] = load_numpy(out_dir / shard)
            arrays.append(shards[shard][key])
        else:
            arrays.append(np.load(out_dir / record.output))
    if missing:
        raise InputError(
            f"{len(missing)} labelled file(s) have no embedding in {out_dir}, e.g. "
            f"{missing[:3]}; run `beats extract` on them (or train from audio)"
        )
    return arrays, failed


def load_cached(embeddings_dir: str | os.PathLike, paths: list[Path]) -> list[np.ndarray]:
    """`load_embeddings` where every file must have its embedding (a failed one is an
    `InputError`)."""
    arrays, failed = load_embeddings(embeddings_dir, paths)
    if failed:
        raise InputError(f"{len(failed)} labelled file(s) could not be embedded, e.g. "
                         f"{failed[0][0]}: {failed[0][1]}")
    return [a for a in arrays if a is not None]


def holds_probe(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a probe (`PROBE_FILES`)."""
    return any((Path(out_dir) / name).exists() for name in PROBE_FILES)


# --------------------------------------------------------------------------- model
def as_sequence(embedding: np.ndarray) -> np.ndarray:
    """(C,) -> (1, C); (T, C) as is; (T, 8, C) -> (8T, C)."""
    if embedding.ndim == 1:
        return embedding[None]
    if embedding.ndim == 3:
        return embedding.reshape(-1, embedding.shape[-1])
    if embedding.ndim == 2:
        return embedding
    raise InputError(
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
            raise InputError(f"probe kind {kind!r}: choose one of {KINDS}")
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
    """Optimiser and early-stopping settings of `fit` (``beats probe``'s options)."""

    epochs: int = option(200, help="most training epochs", ge=1)
    lr: float = option(1e-3, help="AdamW learning rate", gt=0)
    weight_decay: float = option(1e-4, help="AdamW weight decay", ge=0)
    batch_size: int = option(32, help="clips per step", ge=1)
    patience: int = option(20, help="epochs without improvement before stopping", ge=1)
    seed: int = option(0, help="seed of the splits and the head", ge=0)

    def __post_init__(self) -> None:
        check(self)


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
        raise NotFoundError(f"{out_dir}: no head.json; is it a `beats probe` output?")
    meta = json.loads((out_dir / "head.json").read_text())
    state = load_file(str(out_dir / "head.safetensors"))
    dim = state["mean"].numel()
    probe = Probe(dim, len(meta["classes"]), meta["kind"])
    probe.load_state_dict(state)
    return probe.eval(), meta
