"""A run's state on disk: training checkpoints (``OUT/state/last.pt``, ``best.pt``), RNG
capture, the mark of a finished run, and what identifies a run for ``--resume``.

A checkpoint holds plain tensors, numbers, strings, lists and dicts only, so it loads
with ``torch.load(weights_only=True)``: the model and optimiser state dicts, the GradScaler
state, the loop's counters, and every process's RNG states (torch, CUDA, Python's
`random`, numpy's legacy global generator) as tensors and lists. Files are written with
`beats.files.atomic_path`: a run killed while saving keeps the previous checkpoint whole.

``OUT/state/finished.json`` is written last, when everything a run writes is written: a
finished run's files are never written again (`save_finished`, `load_finished`).

A run's identity (`identity_differences`) is what its task was trained on: the model (its
config and `weights_digest`), the classes, the data (`beats.labelled.LabelledSet.digest`
and the like). A resumed run must have the same; what differs is named in one line.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, NotFoundError
from ..files import atomic_path, atomic_write

STATE_DIR = "state"
LAST = "last.pt"
BEST = "best.pt"
FINISHED = "finished.json"
# How `identity_differences` names each part of a run's identity.
IDENTITY_NAMES = {
    "model": "another model", "classes": "another class set", "data": "another data list",
    "audio": "other audio files", "heldout": "other held-out files",
    "teacher": "another teacher", "student": "another student config",
    "labels": "another label source",
}


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, as weights-only-loadable values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                  int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what `capture_rng` took."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save` (``weights_only=True``); a clear error if torn."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NotFoundError(f"no training state at {path}: nothing to resume") from None
    except Exception as e:  # torn or foreign file
        raise InputError(f"{path} cannot be read as a beats training state: {e}") from None


def save_finished(out_dir: Path, record: dict[str, Any]) -> None:
    """Mark the run in ``out_dir`` finished (``state/finished.json``, ``record``: what it
    did, JSON-ready)."""
    with atomic_write(Path(out_dir) / STATE_DIR / FINISHED, "w") as f:
        json.dump(record, f, indent=2)


def load_finished(out_dir: Path) -> dict[str, Any] | None:
    """The record `save_finished` wrote, or None for a run that has not finished."""
    path = Path(out_dir) / STATE_DIR / FINISHED
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise InputError(f"{path} cannot be read ({e}): delete it to finish the run "
                         "again with --resume") from None


def weights_digest(weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a model's or state dict's tensors: names, dtypes, shapes, bytes."""
    state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def identity_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a run's recorded identity and this one's, in words (``another
    class set (['a', 'b'] -> ['a', 'c'])``); a part the earlier run did not record is not
    compared."""
    now = json.loads(json.dumps(now))  # tuples -> lists, as recorded
    out = []
    for key, value in now.items():
        if key not in before or before[key] == value:
            continue
        old = before[key]
        if isinstance(old, dict) and isinstance(value, dict):
            keys = [*value, *(k for k in old if k not in value)]
            parts = [f"{k} {_short(old.get(k))} -> {_short(value.get(k))}"
                     for k in keys if old.get(k) != value.get(k)]
            change = "; ".join(parts[:3]) + ("; ..." if len(parts) > 3 else "")
        else:
            change = f"{_short(old)} -> {_short(value)}"
        out.append(f"{IDENTITY_NAMES.get(key, f'another {key}')} ({change})")
    return out


def _short(value: Any) -> str:
    """A value for a one-line message: digests cut to 12 characters, long JSON cut."""
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
