"""Shared fixtures: the reference vectors (copied from the original implementation's run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from beats import BEATs, BEATsConfig

REFERENCE = Path(__file__).parent / "data" / "reference"
MANIFEST = json.loads((REFERENCE / "manifest.json").read_text())
ENCODER_CASES = ["postnorm_gru", "finetuned", "prenorm_glu", "relpos_relu"]
NUM_WAVES = len(MANIFEST["waves"]["lengths"])


@pytest.fixture(scope="session")
def waves() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / "waves.safetensors")


@pytest.fixture(scope="session")
def expected() -> dict[str, dict[str, torch.Tensor]]:
    return {case: load_file(REFERENCE / f"{case}.expected.safetensors") for case in ENCODER_CASES}


_MODELS: dict[str, BEATs] = {}


def reference_model(case: str) -> BEATs:
    """The reference checkpoint of ``case`` loaded in eval mode (cached; do not mutate)."""
    if case not in _MODELS:
        _MODELS[case] = BEATs.from_pretrained(REFERENCE / f"{case}.pt")
    return _MODELS[case]


def tiny_config(**overrides) -> BEATsConfig:
    """A small released-layout config (deep norm, relative positions, GRU gate, E != C)."""
    cfg = dict(MANIFEST["cases"]["postnorm_gru"]["cfg"])
    cfg.update(overrides)
    return BEATsConfig.from_dict(cfg)


def padded_batch(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded (B, N) batch and its (B,) lengths."""
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
    return batch, lengths
