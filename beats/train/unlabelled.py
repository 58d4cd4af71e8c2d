"""Unlabelled training audio: AUDIO inputs (as ``beats extract`` takes them) -> clips.

MINIMAL STAND-IN (issue 14, written while issue 13's ``beats pretrain`` builds the shared
version): ``beats pretrain`` and ``beats distill`` both read unlabelled audio; when the
pre-training module that does this lands, `unlabelled_clips` should be replaced by it
(same job: find the files, read their headers, list the unreadable ones).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..files import discover_inputs, printable
from .data import Clip, scan


def unlabelled_clips(inputs: Sequence[Any]) -> tuple[list[Clip], list[tuple[str, str]],
                                                     list[str]]:
    """``(readable clips, [(source, error)] of unreadable ones, the inputs as text)``.

    ``inputs``: audio files, folders (searched recursively) and ``.txt``/``.lst`` lists
    (`beats.files.discover_inputs`), `Clip` objects, or 1-D 16 kHz arrays. Only file
    headers are read. Raises ``ValueError`` when there is no audio at all or none of it
    can be read (before any training).
    """
    clips: list[Clip] = []
    paths: list[str | os.PathLike] = []
    sources: list[str] = []
    for item in inputs:
        if isinstance(item, Clip):
            clips.append(item)
            sources.append(item.name)
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            clips.append(Clip(item))
            sources.append("<array>")
        else:
            paths.append(item)
            sources.append(printable(os.fsdecode(item)))
    if paths:
        clips.extend(Clip(f.path) for f in discover_inputs(paths))
    if not clips:
        named = ", ".join(sources[:3]) or "the inputs"
        raise ValueError(f"no audio files found in {named} (give audio files, folders holding "
                         "them, or .txt/.lst lists of paths)")
    good, failed = scan(clips)
    if not good:
        first = f": {failed[0][0]}: {failed[0][1]}" if failed else ""
        raise ValueError(f"none of the {len(clips)} audio inputs can be read{first}")
    return good, failed, sources

