"""Device names: every CUDA device handed on carries an index."""

from __future__ import annotations

import torch

from beats.devices import pick_device


def test_plain_cuda_gets_this_process_index(monkeypatch):
    # torch.cuda.set_device (called by the training set-up) refuses an index-less "cuda"
    # with a ValueError; the name must come back with the process's GPU index.
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pick_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("cuda") == torch.device("cuda", 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert pick_device("cpu") == torch.device("cpu")
