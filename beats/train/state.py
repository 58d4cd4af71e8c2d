"""Training-state checkpoints (``OUT/state/last.pt``, ``best.pt``) and RNG capture.

A checkpoint holds plain tensors, numbers, strings, lists and dicts only, so it loads
with ``torch.load(weights_only=True)``: the model and optimiser state dicts, the GradScaler
state, the loop's counters, and every process's RNG states (torch, CUDA, Python's
`random`, numpy's legacy global generator) as tensors and lists. Files are written with
`beats.files.atomic_path`: a run killed while saving keeps the previous checkpoint whole.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_path

STATE_DIR = "state"
LAST = "last.pt"
BEST = "best.pt"


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
        raise FileNotFoundError(f"no training state at {path}: nothing to resume") from None
    except Exception as e:  # torn or foreign file
        raise ValueError(f"{path} cannot be read as a beats training state: {e}") from None
