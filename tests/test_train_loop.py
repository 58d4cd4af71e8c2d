"""The training loop's parts: config round trip, schedule, data order, augmentation, RNG
state, and the fine-tuning task's parameter setup (layer-wise decay of both kinds)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from beats import BEATs
from beats.train import state
from beats.train.augment import ItemAugmenter, apply_masks, mixup
from beats.train.config import TrainConfig
from beats.train.data import Clip, ClipDataset, StepSampler, balanced_weights, collate_clips
from beats.train.finetune import FinetuneConfig, FinetuneTask, prepare_model
from beats.train.schedule import lr_factor, warmup_steps

from .audio_files import needs_sox, sox_tone
from .conftest import tiny_config


def test_config_json_round_trip_and_errors():
    cfg = FinetuneConfig(steps=7, betas=(0.9, 0.95), val_fold="2", mixup=0.5, roll=True)
    again = FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.betas == (0.9, 0.95)
    with pytest.raises(ValueError, match="unknown FinetuneConfig settings"):
        FinetuneConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="float8")
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 'ten'"):
        TrainConfig.from_dict({"epochs": "ten"})
    assert cfg.differences(FinetuneConfig(steps=7, betas=(0.9, 0.95), val_fold="2", mixup=0.5,
                                          roll=True, quiet=True, num_workers=0)) == {}
    assert cfg.differences(FinetuneConfig()) != {}


def test_schedule_by_hand():
    assert warmup_steps(100, 0, 0.1) == 10 and warmup_steps(100, 3, 0.1) == 3
    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # cosine over the 6 steps after warm-up: 0.5 (1 + cos(pi k / 6))
    assert lr_factor(7, 10, 4) == pytest.approx(0.5 * (1 + np.cos(np.pi * 3 / 6)))
    assert lr_factor(9, 10, 4, "linear") == pytest.approx(1 / 6)
    assert lr_factor(9, 10, 4, "constant") == 1.0


def test_two_ranks_share_exactly_the_steps_of_one_and_resume_needs_only_the_step():
    one = StepSampler(10, 6, seed=3, total=5)
    ranks = [StepSampler(10, 6, rank=r, world=2, micro_batch=2, seed=3, total=5)
             for r in range(2)]
    assert ranks[0].accum == 2 and one.accum == 1
    for step in range(5):
        whole = one.micro_batches(step)[0]
        parts = [k for r in ranks for mb in r.micro_batches(step) for k in mb]
        assert parts == whole
        # positions run on through epochs: step 1 holds positions 6..11 (epoch 0 and 1)
        assert [p for p, _ in whole] == list(range(6 * step, 6 * step + 6))
    # each epoch is a permutation of the items
    assert sorted(one.order(0)) == list(range(10)) and list(one.order(0)) != list(range(10))
    resumed = StepSampler(10, 6, seed=3, start=3, total=5)
    assert list(resumed) == list(one)[3:]


def test_balanced_weights_follow_ast():
    weights = balanced_weights([(0,), (0,), (1,), (0, 1)], 2)
    w0, w1 = 1000 / 3.01, 1000 / 2.01
    assert weights == pytest.approx([w0, w0, w1, w0 + w1])
    sampler = StepSampler(4, 4, seed=0, total=200, weights=weights)
    drawn = np.bincount([i for mb in sampler for _, i in mb], minlength=4)
    assert drawn[3] > drawn[0]  # the clip holding the rare label is drawn most


def test_items_are_a_function_of_seed_position_and_index():
    rng = np.random.default_rng(0)
    clips = [Clip(rng.uniform(-0.5, 0.5, 16000 * s).astype(np.float32), s % 2) for s in (3, 1)]
    for c in clips:
        c.duration = len(c.source) / 16000
    augment = ItemAugmenter(roll=True, time_mask=0.2, freq_mask=20)
    ds = ClipDataset(clips, crop_seconds=2.0, seed=5, augment=augment)
    a, b, c = ds[(7, 0)], ds[(7, 0)], ds[(8, 0)]
    assert np.array_equal(a["wav"], b["wav"]) and np.array_equal(a["time_masks"], b["time_masks"])
    assert not np.array_equal(a["wav"], c["wav"])
    assert len(a["wav"]) == 32000  # a 2 s crop of the 3 s clip
    assert len(ds[(7, 1)]["wav"]) == 16000
    assert (a["freq_masks"][:, 1] <= 20).all() and (a["time_masks"][:, 1] <= 0.2 * 198).all()
    batch = collate_clips([a, ds[(7, 1)]])
    assert batch["wav"].shape == (2, 32000) and batch["lengths"].tolist() == [32000, 16000]
    assert batch["time_masks"].shape == (2, 2, 2) and batch["count"] == 2
    assert batch["seconds"] == pytest.approx(3.0)


def test_apply_masks_zeroes_exactly_the_masked_frames_and_bins():
    x = torch.ones(2, 10, 128)
    time = torch.tensor([[[2, 3], [0, 0]], [[0, 0], [0, 0]]])
    freq = torch.tensor([[[0, 0], [0, 0]], [[100, 5], [10, 1]]])
    y = apply_masks(x, time, freq)
    assert y[0, 2:5].abs().sum() == 0 and y[0].sum() == 7 * 128
    assert y[1, :, 100:105].abs().sum() == 0 and y[1, :, 10].abs().sum() == 0
    assert y[1].sum() == 10 * 122


def test_mixup_mixes_waveform_and_targets_with_one_weight():
    torch.manual_seed(0)
    wav = torch.tensor([[1.0, 1.0, 0.0], [3.0, 3.0, 3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mixed, lengths, soft = mixup(wav, torch.tensor([2, 3]), targets, prob=1.0, alpha=0.8)
    # whatever the partners, the first sample is lam * own + (1 - lam) * partner, and the
    # target uses the same lam: recover lam from the targets and check the waveform
    for b in range(2):
        lam = soft[b, b]  # own class weight (1 when the partner is the clip itself)
        partner = 1 - b if lam < 1 else b
        assert torch.allclose(mixed[b], lam * wav[b] + (1 - lam) * wav[partner], atol=1e-6)
    assert torch.allclose(soft.sum(dim=1), torch.ones(2))
    assert lengths.max() == 3


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    saved = state.capture_rng()
    state.save(tmp_path / "s.pt", {"rng": [saved]})
    first = (torch.rand(3), random.random(), np.random.rand())
    state.restore_rng(state.load(tmp_path / "s.pt")["rng"][0])
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


def _task(**overrides) -> FinetuneTask:
    torch.manual_seed(0)
    backbone = BEATs(tiny_config())
    cfg = FinetuneConfig(dropout=0.0, attention_dropout=0.0, head_dropout=0.0, time_mask=0.0,
                         freq_mask=0, **overrides)
    model = prepare_model(backbone, ["a", "b", "c"], False, cfg)
    return FinetuneTask(model, [], [], ["a", "b", "c"], False, cfg)


def _grads(task: FinetuneTask) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    wav = torch.rand(2, 16000, generator=g) * 0.2 - 0.1
    batch = {"wav": wav, "lengths": torch.tensor([16000, 12000]),
             "targets": torch.tensor([0, 2])}
    task.model.zero_grad()
    task.train_mode()
    loss, _ = task.forward_loss(batch, denominator=2.0)
    loss.backward()
    return {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}


def test_gradient_decay_reaches_the_bottom_through_the_trainer_and_scales_by_ratio():
    plain, decayed = _task(grad_decay=1.0), _task(grad_decay=0.6)
    decayed.model.load_state_dict(plain.model.state_dict())
    assert decayed.model.cfg.layer_wise_gradient_decay_ratio == 0.6
    g1, g6 = _grads(plain), _grads(decayed)
    layers = 3
    for name in ("patch_embedding.weight", "encoder.layers.0.fc1.weight",
                 "encoder.pos_conv.0.weight_v"):
        assert g6[name].abs().sum() > 0, name
    def close(a: torch.Tensor, b: torch.Tensor) -> bool:  # float32 summation noise only
        return bool((a - b).abs().max() <= 1e-4 * b.abs().max())

    # the patch embedding and positional conv sit below all 3 multipliers
    assert close(g6["patch_embedding.weight"], 0.6**layers * g1["patch_embedding.weight"])
    assert close(g6["encoder.pos_conv.0.weight_v"], 0.6**layers * g1["encoder.pos_conv.0.weight_v"])
    # layer k's own weights sit below the multipliers of layers k+1 .. L-1
    for k in range(layers):
        name = f"encoder.layers.{k}.fc2.weight"
        assert close(g6[name], 0.6 ** (layers - 1 - k) * g1[name]), k
    assert torch.equal(g6["predictor.weight"], g1["predictor.weight"])


def test_layer_wise_lr_groups_and_frozen_layers():
    task = _task(layer_lr_decay=0.5, freeze_layers=1, weight_decay=0.05)
    groups = task.parameter_groups(task.cfg)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(task.model.named_parameters())
    # head 1, top layer (2) 0.5, layer 1 0.25; layer 0 and the input side are frozen
    assert by_param[id(names["predictor.weight"])]["lr_scale"] == 1.0
    assert by_param[id(names["encoder.layers.2.fc1.weight"])]["lr_scale"] == 0.5
    assert by_param[id(names["encoder.layers.1.fc1.weight"])]["lr_scale"] == 0.25
    for frozen in ("encoder.layers.0.fc1.weight", "patch_embedding.weight",
                   "encoder.pos_conv.0.weight_v"):
        assert id(names[frozen]) not in by_param and not names[frozen].requires_grad
    assert by_param[id(names["encoder.layers.2.fc1.bias"])]["weight_decay"] == 0.0
    assert by_param[id(names["encoder.layers.2.fc1.weight"])]["weight_decay"] == 0.05
    unfrozen = _task(layer_lr_decay=0.5)
    scales = {n: g["lr_scale"] for g in unfrozen.parameter_groups(unfrozen.cfg)
              for n, p in unfrozen.model.named_parameters() if any(p is q for q in g["params"])}
    assert scales["patch_embedding.weight"] == 0.5**4
    assert scales["encoder.layers.0.self_attn.relative_attention_bias.weight"] == 0.5**3
    # frozen modules stay in eval mode while training
    task.train_mode()
    assert not task.model.encoder.layers[0].training and task.model.encoder.layers[1].training


@needs_sox
def test_file_clips_without_duration_are_cropped_on_whole_steps(tmp_path):
    """Unscanned file clips get their header read when drawn; crops start on 160 ms steps
    and report where they start, and the samples are the file's own at that offset."""
    from beats.audio import load_audio

    path = sox_tone(tmp_path / "sweep.wav", seconds=6.0, freq="200-4000")
    whole, _ = load_audio(path)
    ds = ClipDataset([Clip(path)], crop_seconds=2.0, seed=3, crop_step=2560)
    offsets = set()
    for position in range(12):
        item = ds[(position, 0)]
        assert item["error"] is None and len(item["wav"]) == 32000
        assert item["offset"] % 2560 == 0 and 0 <= item["offset"] <= 64000
        assert np.array_equal(item["wav"], whole[item["offset"] : item["offset"] + 32000])
        offsets.add(item["offset"])
    assert len(offsets) > 6  # the crops move
    batch = collate_clips([ds[(0, 0)], ds[(1, 0)]])
    assert batch["offset"].tolist() == [ds[(0, 0)]["offset"], ds[(1, 0)]["offset"]]
    assert ClipDataset([Clip(path)], crop_seconds=2.0, seed=3)[(0, 0)]["offset"] % 2560 != 0
    missing = ClipDataset([Clip(tmp_path / "gone.wav")], crop_seconds=2.0)[(0, 0)]
    assert missing["error"] is not None and "no such file" in missing["error"]
