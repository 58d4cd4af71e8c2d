"""The safetensors directory format that `save_pretrained` writes and `from_pretrained` reads.

A model directory (or Hugging Face Hub repo) holds:

- ``config.json``: ``BEATsConfig.to_dict()`` plus ``model_type`` (``"beats"``),
  ``architectures`` (the class that wrote it), ``beats_format_version`` and ``has_labels``;
- ``model.safetensors``: the state dict (nothing in it is ever unpickled);
- ``labels.json``: fine-tuned models, ``{class index: AudioSet MID}``.

Every file is written to a temporary name in the same directory and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import InputError, NotFoundError
from .files import atomic_path, atomic_write

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LABELS_NAME = "labels.json"
FORMAT_VERSION = 1
MODEL_TYPE = "beats"
_META_KEYS = ("model_type", "architectures", "beats_format_version", "has_labels")


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    with atomic_write(path, "w") as f:
        f.write(text)


def write_pretrained(
    directory: str | Path,
    cfg: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    label_dict: dict[int, str] | None,
    architecture: str,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and (with labels) ``labels.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    labels_path = directory / LABELS_NAME
    if label_dict is not None:
        _write_json(labels_path, {str(i): label_dict[i] for i in sorted(label_dict)})
    else:
        labels_path.unlink(missing_ok=True)  # a stale one from an earlier save
    config = {
        "model_type": MODEL_TYPE,
        "architectures": [architecture],
        "beats_format_version": FORMAT_VERSION,
        "has_labels": label_dict is not None,
        **cfg,
    }
    _write_json(directory / CONFIG_NAME, config)  # last: its presence marks a complete save
    return directory


def read_config(path: str | Path) -> tuple[dict[str, Any], bool]:
    """Read ``config.json``: (the ``cfg`` keys, whether a ``labels.json`` belongs with it)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"no {CONFIG_NAME} at {path}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise InputError(
            f"{path} describes a {model_type!r} model, not a BEATs model (model_type 'beats')"
        )
    version = config.get("beats_format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(
            f"{path} was written in beats format version {version!r}; this beats reads up to "
            f"version {FORMAT_VERSION}: upgrade beats"
        )
    has_labels = bool(config.get("has_labels", False))
    cfg = {k: v for k, v in config.items() if k not in _META_KEYS}
    return cfg, has_labels


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` onto the CPU; a truncated or corrupt file names itself."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no weights file at {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{path} is truncated or corrupt and cannot be read: {e}") from None


def read_labels(path: str | Path) -> dict[int, str]:
    """Read ``labels.json`` (``{"0": "/m/09x0r", ...}``) into ``{0: "/m/09x0r", ...}``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(
            f"no {LABELS_NAME} at {path}, but its config.json says the model has labels"
        ) from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} must map class indices to AudioSet MIDs")
    try:
        return {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        raise InputError(f"{path} must map class indices (integers) to AudioSet MIDs") from None
