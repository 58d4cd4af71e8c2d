"""Which device a command runs on."""

from __future__ import annotations

import os

import torch


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA (this process's LOCAL_RANK under torchrun), else MPS, else CPU;
    anything else is taken as a torch device name (``cpu``, ``cuda:1``, ...). A plain
    ``cuda`` names this process's GPU like ``auto`` does: an index is always given, which
    ``torch.cuda.set_device`` (the training set-up) and NCCL need."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
