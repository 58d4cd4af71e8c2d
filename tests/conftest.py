"""Shared fixtures: the reference vectors (copied from the original implementation's run)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .servers import HubServer

# No test may reach the internet or a user's caches or tokens. huggingface_hub reads its
# settings when first imported, so they are fixed here, before anything imports it: its
# endpoint is a hub-like server on 127.0.0.1 for the whole session, its home a temporary
# folder. The beats cache also points to a temporary folder.
assert "huggingface_hub" not in sys.modules, "huggingface_hub was imported before conftest"
HUB = HubServer()
_TMP = Path(tempfile.mkdtemp(prefix="beats-tests-"))
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
             "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_TOKEN_PATH",
             "HF_HUB_ENABLE_HF_TRANSFER", "BEATS_REGISTRY", "HUGGINGFACE_CO_STAGING"):
    os.environ.pop(_var, None)
os.environ["HF_ENDPOINT"] = HUB.url
os.environ["HF_HOME"] = str(_TMP / "hf-home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["BEATS_CACHE"] = str(_TMP / "beats-cache")
# Read those settings now: beats imports huggingface_hub only when it downloads, so the
# first test to do so would otherwise freeze whatever that test had set (HF_HUB_OFFLINE=1,
# say) into huggingface_hub's constants for every later test.
import huggingface_hub.constants  # noqa: E402, F401

from beats import BEATs, BEATsConfig  # noqa: E402


def pytest_unconfigure(config) -> None:
    HUB.close()
    shutil.rmtree(_TMP, ignore_errors=True)


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


@pytest.fixture(scope="session")
def sound_classes_dir(tmp_path_factory) -> Path:
    """3 classes x 20 real clips (espeak-ng speech, sox tones/chords, sox noise), made once."""
    from .audio_files import HAVE_ESPEAK, HAVE_SOX, sound_classes

    if not (HAVE_SOX and HAVE_ESPEAK):
        pytest.skip("sox and espeak-ng make the audio (.ci/run installs them)")
    return sound_classes(tmp_path_factory.mktemp("sounds"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small random BEATs saved with save_pretrained (the tiny released layout)."""
    torch.manual_seed(0)
    return BEATs(tiny_config()).save_pretrained(tmp_path_factory.mktemp("tiny") / "model")
