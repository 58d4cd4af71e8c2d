"""The acoustic tokenizer: reference tokens, batch invariance, the EMA vector quantiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from beats.fbank import FBANK_MEAN, FBANK_STD
from beats.quantizer import VectorQuantizer, l2norm
from beats.tokenizer import PAD_TOKEN, BEATsTokenizer

from .conftest import NUM_WAVES, REFERENCE, padded_batch


@pytest.fixture(scope="module")
def tokenizer() -> BEATsTokenizer:
    return BEATsTokenizer.from_pretrained(REFERENCE / "tokenizer.pt")


@pytest.fixture(scope="module")
def expected_labels() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / "tokenizer.expected.safetensors")


@pytest.mark.parametrize("i", range(NUM_WAVES))
def test_tokens_from_waveform_match_reference(tokenizer, expected_labels, waves, i):
    ref = expected_labels[f"labels.{i}"]
    out = tokenizer.extract_labels(waves[f"wav.{i}"])
    assert out.labels.shape == (1, ref.numel())
    agree = (out.labels[0] == ref).float().mean().item()
    assert agree >= 0.99


@pytest.mark.parametrize("i", range(NUM_WAVES))
def test_tokens_from_reference_filterbank_are_identical(tokenizer, expected_labels, waves, i):
    fb = ((waves[f"fbank_raw.{i}"] - FBANK_MEAN) / (2 * FBANK_STD)).unsqueeze(0)
    with torch.no_grad():
        x, _ = tokenizer.encoder(tokenizer.embed_patches(fb))
        ids = tokenizer.tokens_from_features(x)
    assert torch.equal(ids[0], expected_labels[f"labels.{i}"])


def test_batched_tokens_equal_alone_and_padding_is_marked(tokenizer, waves):
    clips = [waves[f"wav.{i}"] for i in range(3)]
    batch, lengths = padded_batch(clips)
    labels, mask = tokenizer.extract_labels(batch, lengths=lengths)
    for b, clip in enumerate(clips):
        alone = tokenizer.extract_labels(clip).labels[0]
        valid = alone.numel()
        assert torch.equal(labels[b, :valid], alone)
        assert (labels[b, valid:] == PAD_TOKEN).all()
        assert int((~mask[b]).sum()) == valid
    assert labels.dtype == torch.int64 and (labels[~mask] >= 0).all()


def test_tokenizer_checkpoint_loads_its_statistics(tokenizer):
    raw = torch.load(REFERENCE / "tokenizer.pt", weights_only=True)["model"]
    for key in ("quantize.cluster_size", "quantize.embedding.cluster_size",
                "quantize.embedding.embed_avg", "quantize.embedding.initted",
                "quantize.embedding.weight"):
        assert torch.equal(tokenizer.state_dict()[key], raw[key]), key


def test_eval_lookup_changes_nothing(tokenizer, waves):
    before = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    tokenizer.extract_labels(waves["wav.0"])
    tokenizer.quantize(torch.randn(50, tokenizer.cfg.quant_dim))
    for k, v in tokenizer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_lookup_is_nearest_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(12, 5).eval()
    z = torch.randn(40, 5)
    ids = vq.lookup(z)
    brute = torch.cdist(l2norm(z), vq.embedding.weight).argmin(dim=1)
    assert torch.equal(ids, brute)


def _centres(k: int, dim: int, seed: int) -> torch.Tensor:
    return l2norm(torch.randn(k, dim, generator=torch.Generator().manual_seed(seed)))


def _points(centres: torch.Tensor, n: int, spread: float, seed: int) -> torch.Tensor:
    """n unit vectors scattered around randomly chosen centres."""
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(centres.shape[0], (n,), generator=g)
    return l2norm(centres[which] + spread * torch.randn(n, centres.shape[1], generator=g))


def test_ema_training_converges_to_known_clusters():
    centres = _centres(6, 8, seed=0)
    vq = VectorQuantizer(6, 8, decay=0.9)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # start each code off its own centre: cosine 0.74 .. 0.97
        vq.embedding.weight.copy_(l2norm(centres + 0.25 * torch.randn(6, 8, generator=g)))
        vq.embedding.initted.fill_(1.0)
    start = (vq.embedding.weight * centres).sum(-1)
    assert start.min() < 0.8
    vq.train()
    for step in range(60):
        vq(_points(centres, 600, 0.05, seed=100 + step))
    final = (vq.embedding.weight * centres).sum(-1)
    assert final.min() > 0.99
    assert torch.allclose(vq.embedding.weight.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert vq.cluster_size.sum() > 0


def test_kmeans_initialisation_finds_clusters():
    torch.manual_seed(0)
    centres = _centres(4, 6, seed=3)
    points = _points(centres, 2000, 0.05, seed=4)
    vq = VectorQuantizer(4, 6, kmeans_iters=20).train()
    assert vq.embedding.initted.item() == 0
    vq(points)
    assert vq.embedding.initted.item() == 1
    best = (vq.embedding.weight @ centres.t()).max(dim=0).values  # each centre has a code
    assert best.min() > 0.98


def test_straight_through_gradient_and_commitment_loss():
    vq = VectorQuantizer(8, 4).eval()
    z = torch.randn(10, 4, requires_grad=True)
    z_q, loss, ids = vq(z)
    assert torch.allclose(z_q, vq.embedding.weight[ids], atol=1e-6)
    (z_q.sum() + loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert not vq.embedding.weight.requires_grad


def test_finetuned_config_refused():
    from beats import BEATsConfig

    with pytest.raises(ValueError, match="finetuned_model"):
        BEATsTokenizer(BEATsConfig(finetuned_model=True, encoder_layers=1))


def test_tokenize_cli_equals_python_api(tmp_path, tokenizer):
    from beats.audio import load_audio

    from .audio_files import sf_write
    from .test_extract import beats_cli

    src = tmp_path / "in"
    src.mkdir()
    for i, seconds in enumerate((0.5, 1.3, 2.2)):
        sf_write(src / f"c{i}.wav", seconds=seconds, rate=22050, seed=i)
    out = tmp_path / "out"
    proc = beats_cli("tokenize", str(src), "-o", str(out), "-m", str(REFERENCE / "tokenizer.pt"),
                     "-j", "0", "-b", "3")
    assert proc.returncode == 0, proc.stderr
    assert "3 ok" in proc.stderr
    for i in range(3):
        got = np.load(out / f"c{i}.wav.npy")
        times = np.load(out / f"c{i}.wav.times.npy")
        wav, _ = load_audio(src / f"c{i}.wav")
        want = tokenizer.extract_labels(wav).labels[0].view(-1, 8).numpy()
        assert got.dtype == np.int64 and np.array_equal(got, want)
        assert np.allclose(times, 0.0875 + 0.16 * np.arange(len(want)))
    encoder_only = beats_cli("tokenize", str(src), "-o", str(tmp_path / "x"), "-m",
                             str(REFERENCE / "postnorm_gru.pt"), "-j", "0")
    assert encoder_only.returncode == 2


def test_long_files_are_tokenized_in_windows(tmp_path, tokenizer):
    from beats import extract_windowed
    from beats.audio import load_audio
    from beats.extract import ExtractOptions, extract

    from .audio_files import sf_write

    sf_write(tmp_path / "long.wav", seconds=14.0, seed=5)
    extract(tokenizer, [tmp_path / "long.wav"], tmp_path / "out",
            ExtractOptions(tokens=True, num_workers=0, window=5.0), progress=False)
    got = np.load(tmp_path / "out" / "long.wav.npy")
    wav, _ = load_audio(tmp_path / "long.wav")
    stitched = extract_windowed(tokenizer, wav, window_s=5.0, hop_s=4.0).features
    want = tokenizer.tokens_from_features(stitched.unsqueeze(0))[0].view(-1, 8).numpy()
    assert got.shape == want.shape and np.array_equal(got, want)


def test_tokenizer_safetensors_round_trip(tmp_path, tokenizer, waves):
    from beats import BEATs

    from .test_extract import beats_cli

    folder = tokenizer.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    again = BEATsTokenizer.from_pretrained(folder)
    for k, v in tokenizer.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert torch.equal(again.extract_labels(waves["wav.2"]).labels,
                       tokenizer.extract_labels(waves["wav.2"]).labels)
    converted = tmp_path / "converted"
    beats_cli("convert", str(REFERENCE / "tokenizer.pt"), str(converted), check=True)
    assert torch.equal(BEATsTokenizer.from_pretrained(converted).extract_labels(waves["wav.0"])
                       .labels, tokenizer.extract_labels(waves["wav.0"]).labels)
    with pytest.raises(ValueError, match="tokenizer"):
        BEATs.from_pretrained(folder)
