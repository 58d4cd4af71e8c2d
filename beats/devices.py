"""Which device a command runs on."""

from __future__ import annotations

import os

import torch


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA (this process's LOCAL_RANK under torchrun), else MPS, else CPU;
    anything else is taken as a torch device name (``cpu``, ``cuda:1``, ...)."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
