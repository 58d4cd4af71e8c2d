"""AudioSet class labels and the location of the package's data files."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

from .errors import NotFoundError


def data_dir() -> Path:
    """The ``checkpoints`` data folder: inside the installed package, or the repository's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "checkpoints", here.parent / "checkpoints"):
        if (candidate / "audioset_labels.csv").is_file():
            return candidate
    raise NotFoundError(
        "the beats data folder (checkpoints/) is missing; reinstall the package"
    )


@functools.lru_cache(maxsize=1)
def audioset_names() -> dict[str, str]:
    """AudioSet MID (e.g. ``/m/09x0r``) to display name (``Speech``), 527 classes."""
    with open(data_dir() / "audioset_labels.csv", newline="", encoding="utf-8") as f:
        return {row["mid"]: row["display_name"] for row in csv.DictReader(f)}


def display_names(label_dict: dict[int, str]) -> list[str]:
    """Display names in class-index order for a checkpoint's ``{index: MID}`` label dict.

    A MID outside AudioSet keeps the MID itself as its name.
    """
    names = audioset_names()
    return [names.get(label_dict[i], label_dict[i]) for i in sorted(label_dict)]
