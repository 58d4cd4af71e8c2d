"""Pre-training label sources: the random-projection tokenizer, labels from a filterbank,
and labels read back from ``beats tokenize`` outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from beats.audio import load_audio
from beats.fbank import fbank
from beats.tokenizer import PAD_TOKEN, BEATsTokenizer
from beats.train.random_tokenizer import TANH_SCALE, random_tokenizer
from beats.train.token_labels import TokenLabels, num_steps

from .audio_files import needs_espeak, needs_sox, sox, speech
from .conftest import REFERENCE, padded_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer() -> BEATsTokenizer:
    return random_tokenizer(0)


def by_hand(tokenizer: BEATsTokenizer, features: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (S, K) of one clip's projected patches with the codes, computed
    from the weights without the model: x -> LN(W1 x) -> LN(W2 .) -> cos with codes."""
    steps = features.shape[0] // 16
    patches = features[: 16 * steps].reshape(steps, 16, 8, 16).permute(0, 2, 1, 3)
    x = patches.reshape(steps * 8, 256).double()  # s = 8 t + f, each patch row-major
    w1 = tokenizer.patch_embedding.weight.double().reshape(512, 256)
    w2 = tokenizer.post_extract_proj.weight.double()
    y = F.layer_norm(x @ w1.t(), (512,), eps=1e-5)
    z = F.layer_norm(y @ w2.t(), (256,), eps=1e-5)
    codes = tokenizer.quantize.embedding.weight.double()
    return F.normalize(z, dim=-1) @ codes.t()


def test_random_tokenizer_is_a_random_projection_with_nearest_cosine(tokenizer, waves):
    assert tokenizer.cfg.encoder_layers == 0 and not tokenizer.training
    codes = tokenizer.quantize.embedding.weight
    assert codes.shape == (1024, 256)
    assert torch.allclose(codes.norm(dim=1), torch.ones(1024), atol=1e-6)
    agree = checked = 0
    for i in range(3):
        features, frames = fbank(waves[f"wav.{i}"].unsqueeze(0))
        labels = tokenizer.labels_from_fbank(features, frames)[0]
        cos = by_hand(tokenizer, features[0])
        top2 = cos.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-6  # not a tie at float32 precision
        agree += int((labels[clear] == cos.argmax(dim=1)[clear]).sum())
        checked += int(clear.sum())
        assert clear.float().mean() > 0.95
    assert agree == checked > 100


def test_tanh_stage_is_exactly_the_identity(tokenizer, waves):
    features, frames = fbank(waves["wav.1"].unsqueeze(0))
    with torch.no_grad():
        encoded = tokenizer.forward_fbank(features, frames).features
        assert torch.equal(tokenizer.quantize_layer(encoded), encoded)
        wide = 30.0 * torch.randn(1000, 256)  # beyond any LayerNorm output (|y| < 16)
        assert torch.equal(tokenizer.quantize_layer(wide), wide)
    assert TANH_SCALE * 30.0 * 6 < 1e-3  # tanh(z) == z in float32 far below this


def test_same_seed_same_labels_in_another_process_other_seed_differs(tokenizer, waves):
    features, frames = fbank(waves["wav.2"].unsqueeze(0))
    mine = tokenizer.labels_from_fbank(features, frames)[0].tolist()
    code = (
        "import json, torch, sys\n"
        "from safetensors.torch import load_file\n"
        "from beats.fbank import fbank\n"
        "from beats.train.random_tokenizer import random_tokenizer\n"
        "torch.manual_seed(123)\n"
        f"w = load_file({str(REFERENCE / 'waves.safetensors')!r})['wav.2']\n"
        "f, n = fbank(w.unsqueeze(0))\n"
        "print(json.dumps(random_tokenizer(0).labels_from_fbank(f, n)[0].tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert json.loads(out.stdout) == mine
    other = random_tokenizer(1).labels_from_fbank(features, frames)[0].tolist()
    assert sum(a != b for a, b in zip(mine, other, strict=True)) > 0.9 * len(mine)


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    random_tokenizer(3)
    assert torch.equal(torch.get_rng_state(), before)


def test_labels_from_fbank_equal_extract_labels_and_keep_the_mode(waves):
    reference = BEATsTokenizer.from_pretrained(REFERENCE / "tokenizer.pt")
    wav, lengths = padded_batch([waves[f"wav.{i}"] for i in range(3)])
    expected = reference.extract_labels(wav, lengths=lengths).labels
    features, frames = fbank(wav, lengths)
    reference.train()
    labels = reference.labels_from_fbank(features, frames)
    assert reference.training and torch.equal(labels, expected)
    assert (labels == PAD_TOKEN).any() and labels.dtype == torch.int64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(reference.labels_from_fbank(features, frames), expected)


@needs_sox
@needs_espeak
def test_checkpoint_round_trips_and_beats_tokenize_uses_it(tmp_path, tokenizer):
    folder = tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = BEATsTokenizer.from_pretrained(folder)
    mine, theirs = tokenizer.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)

    audio = tmp_path / "audio"
    audio.mkdir()
    speech(tmp_path / "speech.wav")  # 22.05 kHz: tokenize resamples it
    sox(str(tmp_path / "speech.wav"), str(audio / "speech.wav"), "pad", "0", "8")  # > 10 s
    sox("-n", "-r", "16000", "-c", "1", str(audio / "chord.wav"), "synth", "3",
        "sine", "300-3000", "vol", "0.5")
    for fmt in ("npy", "safetensors"):
        out = tmp_path / f"tokens-{fmt}"
        run = subprocess.run(
            [sys.executable, "-m", "beats", "tokenize", str(audio), "-o", str(out), "-m",
             str(folder), "-q", "-j", "0", "--format", fmt],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 0, run.stderr
        stored = TokenLabels(out)
        assert len(stored) == 2
        for name in ("speech.wav", "chord.wav"):
            wav, _ = load_audio(audio / name)
            features, frames = fbank(torch.from_numpy(wav).unsqueeze(0))
            expected = tokenizer.labels_from_fbank(features, frames)[0]
            tokens = stored.tokens(audio / name)
            assert tokens.shape == (num_steps(len(wav)), 8)
            assert torch.equal(torch.from_numpy(tokens).reshape(-1), expected)
            # a crop on a step boundary: the slice of the file's tokens equals its own labels
            offset, length = 2560 * 5, 2560 * 7 + 1000
            crop = torch.from_numpy(wav[offset : offset + length]).unsqueeze(0)
            features, frames = fbank(crop)
            labels = stored.crop(audio / name, offset, length, len(wav))
            assert labels.shape == (8 * 7,)
            assert torch.equal(labels, tokenizer.labels_from_fbank(features, frames)[0])

    wav, _ = load_audio(audio / "chord.wav")
    with pytest.raises(ValueError, match="not a multiple of 2560"):
        stored.crop(audio / "chord.wav", 1000, 5000, len(wav))
    with pytest.raises(ValueError, match="made from other audio"):
        stored.crop(audio / "chord.wav", 0, 5000, len(wav) + 2560)
    with pytest.raises(ValueError, match="runs past the end"):
        stored.crop(audio / "chord.wav", 2560 * 10, 2560 * 10, len(wav))
    with pytest.raises(ValueError, match="no tokens for this file"):
        stored.crop(tmp_path / "speech.wav", 0, 5000, len(wav))


def test_token_folders_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not a `beats tokenize` output folder"):
        TokenLabels(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"model": "x", "layers": "last"}))
    with pytest.raises(ValueError, match="holds embeddings"):
        TokenLabels(tmp_path)


def test_stored_tokens_must_be_token_arrays(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"output": "tokens"}))
    np.save(tmp_path / "a.npy", np.zeros((4, 768), dtype=np.float32))
    record = {"input": str(tmp_path / "a.wav"), "key": "a.wav", "status": "ok",
              "output": "a.npy"}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"not a \(T, 8\) int64 token array"):
        TokenLabels(tmp_path).tokens(tmp_path / "a.wav")
