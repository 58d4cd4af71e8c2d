"""Pre-training's model side: masking, kept-patch positions, the SSL model and its loss."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from beats import BEATs
from beats.fbank import fbank
from beats.train.masking import (
    kept_patches,
    mask_patches,
    num_masked,
    num_patches,
    pad_masks,
)
from beats.train.ssl import (
    PRESETS,
    BEATsForPretraining,
    SSLConfig,
    summarize_metrics,
)

from .conftest import padded_batch, tiny_config

POSITIONS = ("true", "scattered", "compacted")


def ssl_config(**overrides) -> SSLConfig:
    model = tiny_config(dropout=0.0, attention_dropout=0.0, encoder_layerdrop=0.0)
    return SSLConfig(model=model, **{"num_labels": 32, **overrides})


@pytest.fixture(scope="module")
def batch(waves):
    """Three reference clips of different lengths as a padded batch: wav, lengths, fbank."""
    wav, lengths = padded_batch([waves[f"wav.{i}"] for i in range(3)])
    features, frames = fbank(wav, lengths)
    return wav, lengths, features, frames


def draw_masks(frames: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    length = 8 * (int(frames.max()) // 16)
    return pad_masks([mask_patches(8 * (int(t) // 16), ratio, generator) for t in frames],
                     length)


def scatter_back(enc) -> torch.Tensor:
    """Kept encodings placed at their positions in a zero (B, S, C) sequence."""
    batch, length = enc.padding.shape
    out = enc.x.new_zeros(batch, length, enc.x.shape[2])
    for b in range(batch):
        n = int((~enc.kept_padding[b]).sum())
        out[b, enc.index[b, :n]] = enc.x[b, :n]
    return out


# ----------------------------------------------------------------------------- masking
def test_ten_second_clip_keeps_124_of_496_patches():
    assert num_patches(160000) == 496
    mask = mask_patches(496, 0.75, torch.Generator().manual_seed(0))
    assert mask.shape == (496,) and mask.dtype == torch.bool
    assert int(mask.sum()) == 372 and int((~mask).sum()) == 124


def test_mask_counts_edges_and_bad_ratios():
    assert [num_masked(n, 0.75) for n in (0, 1, 2, 8, 10, 496)] == [0, 0, 1, 6, 8, 372]
    assert num_masked(496, 0.0) == 0
    assert num_masked(4, 0.99) == 3  # at least one patch is kept
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="mask ratio"):
            num_masked(10, bad)


def test_masks_are_a_function_of_the_generator_and_uniform():
    def draw(seed):
        return mask_patches(496, 0.75, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    generator = torch.Generator().manual_seed(0)
    rate = torch.stack([mask_patches(16, 0.75, generator) for _ in range(4000)]).float().mean(0)
    assert (rate - 0.75).abs().max() < 0.03  # every position equally likely (not blocks)


def test_kept_patches_are_in_order_and_padding_is_never_masked():
    frames = torch.tensor([16 * 3 + 5, 16 * 2])  # 24 and 16 valid patches
    masked = pad_masks([mask_patches(24, 0.5, torch.Generator().manual_seed(1)),
                        mask_patches(16, 0.5, torch.Generator().manual_seed(2))], 24)
    index, kept_padding, padding = kept_patches(masked, frames)
    assert index.shape == (2, 12) and padding[1, 16:].all() and not padding[0].any()
    for b, valid in enumerate((24, 16)):
        expected = [i for i in range(valid) if not masked[b, i]]
        n = len(expected)
        assert index[b, :n].tolist() == expected
        assert (index[b, n:] == 24).all() and kept_padding[b, n:].all()
        assert not kept_padding[b, :n].any()
    bad = masked.clone()
    bad[1, 20] = True
    with pytest.raises(ValueError, match="padding cannot be masked"):
        kept_patches(bad, frames)


# ----------------------------------------------------------------------------- encoder hooks
def test_position_bias_at_uses_true_offsets():
    torch.manual_seed(0)
    model = BEATs(tiny_config())
    attn = model.encoder.layers[0].self_attn
    full = attn.position_bias(400, torch.device("cpu"))  # (H, S, S)
    positions = torch.tensor([[0, 3, 4, 90, 399], [5, 6, 7, 8, 300]])
    bias = attn.position_bias_at(positions)
    assert bias.shape == (2, full.shape[0], 5, 5)
    for b in range(2):
        p = positions[b]
        assert torch.equal(bias[b], full[:, p][:, :, p])


def test_encoder_with_all_positions_equals_the_default_path():
    torch.manual_seed(0)
    model = BEATs(tiny_config()).eval()
    x = torch.randn(2, 40, model.cfg.encoder_embed_dim)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, 32:] = True
    positions = torch.arange(40).expand(2, 40)
    with torch.no_grad():
        plain, _ = model.encoder(x, mask)
        compacted, _ = model.encoder(x, mask, positions=positions)
        scattered, _ = model.encoder(x, mask, positions=positions, conv_length=40)
    valid = ~mask
    assert torch.equal(compacted[valid], plain[valid])
    assert torch.allclose(scattered[valid], plain[valid], atol=1e-5)


def test_scattered_convolution_sees_the_full_sequence_with_gaps_zeroed():
    torch.manual_seed(0)
    model = BEATs(tiny_config(encoder_layers=1)).eval()
    encoder = model.encoder
    dim = model.cfg.encoder_embed_dim
    positions = torch.tensor([[1, 2, 7, 20, 33], [0, 9, 10, 11, 0]])  # row 1: 4 + padding
    padding = torch.tensor([[False] * 5, [False] * 4 + [True]])
    x = torch.randn(2, 5, dim)
    full = torch.zeros(2, 40, dim)
    for b in range(2):
        for i in range(5):
            if not padding[b, i]:
                full[b, positions[b, i]] = x[b, i]
    with torch.no_grad():
        conv_full = encoder.pos_conv(full.transpose(1, 2)).transpose(1, 2)
        ours = encoder._pos_conv(x.masked_fill(padding.unsqueeze(-1), 0.0), positions, 40)
    for b in range(2):
        for i in range(5):
            if not padding[b, i]:
                assert torch.allclose(ours[b, i], conv_full[b, positions[b, i]], atol=1e-6)


def test_zero_layer_encoder_is_convolution_and_norm():
    torch.manual_seed(0)
    model = BEATs(tiny_config(encoder_layers=0)).eval()
    assert len(model.encoder.layers) == 0
    x = torch.randn(1, 24, model.cfg.encoder_embed_dim)
    encoder = model.encoder
    with torch.no_grad():
        out, hidden = encoder(x, output_hidden_states=True)
        conv = encoder.pos_conv[0]
        y = F.conv1d(x.transpose(1, 2), conv.weight(), conv.bias, padding=conv.kernel_size // 2,
                     groups=conv.groups)[:, :, :24]
        expected = F.layer_norm(x + F.gelu(y).transpose(1, 2), (x.shape[2],),
                                encoder.layer_norm.weight, encoder.layer_norm.bias)
    assert torch.allclose(out, expected, atol=1e-5)
    assert len(hidden) == 1 and torch.equal(hidden[0], out)


# ----------------------------------------------------------------------------- the SSL model
@pytest.mark.parametrize("positions", POSITIONS)
def test_unmasked_encoder_equals_extract_features(batch, positions):
    wav, lengths, features, frames = batch
    torch.manual_seed(0)
    model = BEATsForPretraining(ssl_config(mask_ratio=0.0, positions=positions)).eval()
    masked = draw_masks(frames, 0.0, 0)
    assert not masked.any()
    with torch.no_grad():
        enc = model.encode(features, frames, masked)
        expected = model.backbone.extract_features(wav, lengths=lengths)
    ours = scatter_back(enc)
    valid = ~expected.padding_mask
    assert torch.equal(enc.padding, expected.padding_mask)
    assert (ours[valid] - expected.features[valid]).abs().max() < 1e-5


@pytest.mark.parametrize("positions", POSITIONS)
def test_kept_outputs_ignore_masked_patch_contents(batch, positions):
    _, _, features, frames = batch
    torch.manual_seed(0)
    model = BEATsForPretraining(ssl_config(positions=positions)).eval()
    masked = draw_masks(frames, 0.75, 1)
    steps = features.shape[1] // 16
    patch_mask = masked.view(-1, steps, 8)  # (B, time step, frequency band)

    def perturbed(which: torch.Tensor) -> torch.Tensor:
        noisy = features.clone()
        noise = 3.0 * torch.randn(features.shape, generator=torch.Generator().manual_seed(5))
        region = which.repeat_interleave(16, 1).repeat_interleave(16, 2)  # (B, 16 steps, 128)
        noisy[:, : 16 * steps][region] += noise[:, : 16 * steps][region]
        return noisy

    with torch.no_grad():
        clean = model.encode(features, frames, masked).x
        masked_noise = model.encode(perturbed(patch_mask), frames, masked).x
        kept_noise = model.encode(perturbed(~patch_mask), frames, masked).x
    rows = ~model.encode(features, frames, masked).kept_padding
    assert torch.equal(clean[rows], masked_noise[rows])
    assert (clean[rows] - kept_noise[rows]).abs().max() > 0.1  # the test can fail


def test_true_positions_differ_from_compacted_only_across_gaps(batch):
    _, _, features, frames = batch
    features, frames = features[2:], frames[2:]  # the longest clip, 120 patches
    outputs = {}
    for positions in POSITIONS:
        torch.manual_seed(0)
        model = BEATsForPretraining(ssl_config(positions=positions)).eval()
        block = torch.ones(1, 120, dtype=torch.bool)
        block[0, 40:80] = False  # one contiguous block kept: offsets are as if compacted
        gaps = torch.ones(1, 120, dtype=torch.bool)
        gaps[0, 0:20] = gaps[0, 100:120] = False  # two blocks 80 patches apart
        with torch.no_grad():
            outputs[positions] = [model.encode(features, frames, m).x for m in (block, gaps)]
    assert torch.equal(outputs["true"][0], outputs["compacted"][0])
    assert (outputs["true"][1] - outputs["compacted"][1]).abs().max() > 1e-3
    # scattered: a lone block sees zeros around it like the compacted convolution's own
    # padding; across a gap the convolution sees the gap
    assert (outputs["true"][0] - outputs["scattered"][0]).abs().max() < 1e-5
    assert (outputs["true"][1] - outputs["scattered"][1]).abs().max() > 1e-3


def test_loss_covers_masked_valid_patches_only_and_matches_cross_entropy(batch):
    _, _, features, frames = batch
    torch.manual_seed(0)
    model = BEATsForPretraining(ssl_config(label_smoothing=0.0)).eval()
    masked = draw_masks(frames, 0.75, 2)
    generator = torch.Generator().manual_seed(3)
    padding = model.encode(features, frames, masked).padding
    assert padding.any()  # the batch has padding to ignore
    labels = torch.randint(0, 32, masked.shape, generator=generator).masked_fill(padding, -1)
    with torch.no_grad():
        out = model(features, frames, masked, labels)
    target = masked & ~padding
    expected = -F.log_softmax(out.logits.double(), dim=-1).gather(
        -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[target].sum()
    assert int(out.count) == int(target.sum()) == int(masked.sum())
    assert torch.allclose(out.loss_sum.double(), expected, rtol=1e-5)
    assert torch.allclose(out.loss(4.0), out.loss_sum / 4.0)

    other = labels.clone()
    kept = ~masked & ~padding
    other[kept] = (other[kept] + 1) % 32  # change every kept label: loss unchanged
    with torch.no_grad():
        assert torch.equal(model(features, frames, masked, other).loss_sum, out.loss_sum)
    other = labels.clone()
    first = target.nonzero()[0]
    other[first[0], first[1]] = (other[first[0], first[1]] + 1) % 32
    with torch.no_grad():
        assert not torch.equal(model(features, frames, masked, other).loss_sum, out.loss_sum)


def test_label_smoothing_is_the_smoothed_cross_entropy(batch):
    _, _, features, frames = batch
    torch.manual_seed(0)
    model = BEATsForPretraining(ssl_config(label_smoothing=0.1)).eval()
    masked = draw_masks(frames, 0.75, 4)
    padding = model.encode(features, frames, masked).padding
    labels = torch.randint(0, 32, masked.shape, generator=torch.Generator().manual_seed(5))
    labels = labels.masked_fill(padding, -1)
    with torch.no_grad():
        out = model(features, frames, masked, labels)
    logp = F.log_softmax(out.logits.double(), dim=-1)[masked]
    nll = -logp.gather(-1, labels[masked].unsqueeze(-1)).squeeze(-1)
    uniform = -logp.mean(dim=-1)
    expected = (0.9 * nll + 0.1 * uniform).sum()
    assert torch.allclose(out.loss_sum.double(), expected, rtol=1e-5)


def test_metrics_count_hits_and_labels_used(batch):
    _, _, features, frames = batch
    torch.manual_seed(0)
    model = BEATsForPretraining(ssl_config()).eval()
    masked = draw_masks(frames, 0.75, 6)
    padding = model.encode(features, frames, masked).padding
    with torch.no_grad():
        logits = model(features, frames, masked).logits
    labels = logits.argmax(-1)  # the predictions themselves: every patch a hit ...
    miss = torch.zeros_like(masked)
    miss[0, :5] = True  # ... but 5 patches of clip 0
    labels = torch.where(miss, (labels + 1) % 32, labels).masked_fill(padding, -1)
    with torch.no_grad():
        out = model(features, frames, masked, labels)
    m = {k: v.clone() for k, v in out.metrics.items()}
    masked_miss = int((miss & masked).sum())
    kept = ~masked & ~padding
    assert int(m["masked_count"]) == int(masked.sum())
    assert int(m["masked_correct"]) == int(masked.sum()) - masked_miss
    assert int(m["unmasked_count"]) == int(kept.sum())
    assert int(m["unmasked_correct"]) == int(kept.sum()) - (5 - masked_miss)
    assert int(m["label_counts"].sum()) == int((~padding).sum())
    summary = summarize_metrics({k: v + v for k, v in m.items()})  # summed over 2 "ranks"
    assert summary["masked_accuracy"] == pytest.approx(1 - masked_miss / int(masked.sum()))
    assert summary["labels_used"] == len(set(labels[~padding].tolist()))


def test_padded_batch_loss_equals_clips_alone(batch):
    _, _, features, frames = batch
    torch.manual_seed(0)
    model = BEATsForPretraining(ssl_config()).eval()
    masked = draw_masks(frames, 0.75, 7)
    padding = model.encode(features, frames, masked).padding
    labels = torch.randint(0, 32, masked.shape, generator=torch.Generator().manual_seed(8))
    labels = labels.masked_fill(padding, -1)
    with torch.no_grad():
        together = model(features, frames, masked, labels).loss_sum
        alone = 0.0
        for b in range(3):
            t = int(frames[b])
            s = 8 * (t // 16)
            alone += model(features[b:b + 1, :t], frames[b:b + 1], masked[b:b + 1, :s],
                           labels[b:b + 1, :s]).loss_sum
    assert torch.allclose(together, alone, rtol=1e-5)


@pytest.mark.parametrize("mask_vector", ["learned", "zeros"])
def test_training_reaches_every_parameter(batch, mask_vector):
    _, _, features, frames = batch
    torch.manual_seed(0)
    model = BEATsForPretraining(ssl_config(mask_vector=mask_vector)).train()
    assert (model.mask_embedding is None) == (mask_vector == "zeros")
    masked = draw_masks(frames, 0.75, 9)
    padding = model.encode(features, frames, masked).padding
    labels = torch.randint(0, 32, masked.shape, generator=torch.Generator().manual_seed(1))
    out = model(features, frames, masked, labels.masked_fill(padding, -1))
    out.loss(out.count).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_labels_are_refused(batch):
    _, _, features, frames = batch
    model = BEATsForPretraining(ssl_config()).eval()
    masked = draw_masks(frames, 0.75, 0)
    with pytest.raises(ValueError, match=r"labels at valid patches must lie in \[0, 32\)"):
        model(features, frames, masked, torch.full(masked.shape, 40))
    with pytest.raises(ValueError, match="labels have shape"):
        model(features, frames, masked, torch.zeros(3, 5, dtype=torch.long))
    samples = torch.tensor([16000, 32000, 40000])  # sample lengths given for frame counts
    with pytest.raises(ValueError, match="not samples"):
        model(features, samples, masked)


def test_export_is_an_ordinary_beats_checkpoint(tmp_path, batch):
    wav, lengths, _, _ = batch
    torch.manual_seed(0)
    model = BEATsForPretraining(ssl_config())
    model.export(tmp_path / "model")
    loaded = BEATs.from_pretrained(tmp_path / "model")
    mine = model.backbone.state_dict()
    theirs = loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not any(k.startswith(("predictor", "head", "mask")) for k in theirs)
    with torch.no_grad():
        a = model.backbone.eval().extract_features(wav, lengths=lengths).features
        b = loaded.extract_features(wav, lengths=lengths).features
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- config
def test_presets_build_and_json_round_trips(tmp_path):
    tiny = SSLConfig.preset("tiny")
    assert tiny.model.encoder_layers == 4 and tiny.predictor_layers == 2
    base = SSLConfig.preset("base")
    assert (base.model.encoder_layers, base.model.encoder_embed_dim, base.model.max_distance,
            base.model.deep_norm, base.model.gru_rel_pos) == (12, 768, 800, True, True)
    assert base.predictor_layers == 3 and base.mask_ratio == 0.75 and base.num_labels == 1024
    assert SSLConfig.preset("large").model.encoder_embed_dim == 1024
    assert set(PRESETS) == {"tiny", "base", "large"}

    cfg = SSLConfig.preset("tiny", mask_ratio=0.6, positions="compacted",
                           model={"encoder_layers": 2})
    path = tmp_path / "ssl.json"
    path.write_text(json.dumps(cfg.to_dict()))
    again = SSLConfig.from_json(path)
    assert again == cfg and again.model.encoder_layers == 2 and again.model.embed_dim == 256
    path.write_text(json.dumps({"preset": "tiny", "predictor_layers": 1}))
    assert SSLConfig.from_json(path).predictor_layers == 1


@pytest.mark.parametrize("data, message", [
    ({"mask_ratio": 1.0}, "SSLConfig.mask_ratio"),
    ({"positions": "absolute"}, "SSLConfig.positions"),
    ({"mask_vector": "random"}, "SSLConfig.mask_vector"),
    ({"label_smoothing": -0.1}, "SSLConfig.label_smoothing"),
    ({"predictor_layers": 0}, "SSLConfig.predictor_layers"),
    ({"preset": "huge"}, "unknown SSL preset 'huge'"),
    ({"mask_ratios": 0.5}, r"unknown SSL config keys \['mask_ratios'\]"),
    ({"model": {"finetuned_model": True}}, "finetuned_model must be False"),
    ({"model": {"encoder_layers": -2}}, "BEATsConfig.encoder_layers"),
])
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        SSLConfig.from_dict(data)
