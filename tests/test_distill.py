"""Tokenizer distillation: the student, estimator, teacher targets, codebook timing, export."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from beats import BEATs, BEATsTokenizer
from beats.audio import load_audio
from beats.fbank import fbank
from beats.model_output import patch_padding_mask
from beats.train.distill import (
    DistillConfig,
    DistillTask,
    student_config,
    teacher_targets,
    valid_patches,
)

from .audio_files import needs_espeak, needs_sox, sox_tone, speech
from .conftest import REFERENCE, padded_batch, tiny_config

pytestmark = [needs_sox, needs_espeak]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: the tiny models gain nothing from more, and
    threads spinning on a machine that other jobs load made these tests several times
    slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[torch.Tensor]:
    """Three real clips at 16 kHz: two espeak-ng voices and a sox sweep (shorter)."""
    folder = tmp_path_factory.mktemp("distill-audio")
    speech(folder / "a.wav", "the quick brown fox jumps over the lazy dog")
    speech(folder / "b.wav", "seven silver bells rang in the quiet morning", voice="en-us",
           speed=180)
    sox_tone(folder / "c.wav", seconds=1.0, freq="300-3000")
    durations = {"a.wav": 1.2, "b.wav": 1.2, "c.wav": 0.8}
    return [torch.from_numpy(load_audio(folder / name, offset=0.2 if name != "c.wav" else 0.0,
                                        duration=seconds)[0])
            for name, seconds in durations.items()]


@pytest.fixture(scope="module")
def batch(clips) -> dict[str, torch.Tensor]:
    wav, lengths = padded_batch(clips)
    return {"wav": wav, "lengths": lengths}


def _student(**overrides) -> object:
    return tiny_config(quant_n=32, quant_dim=8, dropout=0.0, attention_dropout=0.0,
                       encoder_layerdrop=0.0, **overrides)


def _task(teacher: str = "postnorm_gru", seed: int = 0, **cfg) -> DistillTask:
    torch.manual_seed(seed)
    task = DistillTask(BEATs.from_pretrained(REFERENCE / f"{teacher}.pt"), _student(),
                       DistillConfig(**cfg))
    task.model.train()
    return task


def _train(task: DistillTask, batch: dict, steps: int, lr: float = 5e-3) -> list[dict]:
    """Plain optimisation steps on one batch, as the loop runs them; health per step."""
    groups = task.parameter_groups(None)
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups], lr=lr)
    denominator = float(valid_patches(batch["lengths"]).sum())
    health = []
    for step in range(steps):
        task.before_step(step, [dict(batch, count=int(denominator))])
        loss, metrics = task.forward_loss(batch, denominator)
        assert torch.isfinite(loss) and float(metrics["cosine"][1]) == denominator
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        health.append(task.after_step(step))
    return health


def test_valid_patches_counts_the_loss_terms(batch):
    # 1.2 s = 19200 samples: 1 + (19200 - 400) // 160 = 118 frames, 7 steps, 56 patches.
    assert valid_patches(batch["lengths"]).tolist() == [56, 56, 32]


def _learns(task: DistillTask, batch: dict) -> None:
    teacher_state = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    before = task.measure([batch])
    _train(task, batch, steps=6)
    after = task.measure([batch])
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    assert after["cosine"] > before["cosine"] + 0.3, (before, after)
    assert 0 < after["commitment"] < 0.2
    assert not task.teacher.training
    for key, value in task.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key


def test_ssl_teacher_distillation_lowers_loss_and_raises_cosine(batch):
    task = _task("postnorm_gru")
    assert task.kind == "features"
    _learns(task, batch)


def test_finetuned_teacher_targets_are_per_position_logits(batch):
    teacher = BEATs.from_pretrained(REFERENCE / "finetuned.pt")
    features, frames = fbank(batch["wav"], batch["lengths"])
    mask = patch_padding_mask(batch["lengths"], 8 * (features.shape[1] // 16))
    target = teacher_targets(teacher, features, frames, "logits")
    assert target.shape == (3, mask.shape[1], 5)
    keep = (~mask).unsqueeze(-1)
    pooled = (target * keep).sum(dim=1) / keep.sum(dim=1)  # BEATs pools its logits so
    with torch.no_grad():
        clip = teacher.extract_features(batch["wav"], lengths=batch["lengths"]).logits
    assert torch.allclose(pooled, clip, atol=1e-5)
    assert target[0, :8].std(dim=0).min() > 0  # positions differ: more than the clip's logits


def test_finetuned_teacher_distillation_learns(batch):
    task = _task("finetuned")
    assert task.kind == "logits"
    assert task.distiller.estimator.head.out_features == 5
    _learns(task, batch)


def test_exported_tokenizer_gives_the_students_argmax(tmp_path, batch, clips):
    """Batched and one clip at a time (`beats tokenize -m`: tests/test_distill_cli.py)."""
    task = _task()
    _train(task, batch, steps=2)
    task.export(tmp_path, "last")
    folder = tmp_path / "tokenizer"
    saved = load_file(folder / "model.safetensors")
    assert set(saved) == set(BEATsTokenizer(task.distiller.student.cfg).state_dict())
    assert saved["quantize.embedding.initted"].item() == 1
    assert saved["quantize.embedding.cluster_size"].sum() == 144  # k-means on the 1st batch
    codebook = saved["quantize.embedding.weight"]
    assert torch.equal(codebook, task.distiller.quantizer.embedding.weight)

    tokenizer = BEATsTokenizer.from_pretrained(folder)
    student = task.distiller.student.eval()
    labels, mask = tokenizer.extract_labels(batch["wav"], lengths=batch["lengths"])
    for b, clip in enumerate(clips):
        with torch.no_grad():
            e = student.quantize_layer(student.extract_features(clip).features[0])
        cosine = (e / e.norm(dim=-1, keepdim=True)) @ (
            codebook / codebook.norm(dim=-1, keepdim=True)).t()
        by_hand = cosine.argmax(dim=-1)
        assert len(set(by_hand.tolist())) > 1
        assert torch.equal(labels[b, ~mask[b]], by_hand)
        assert torch.equal(tokenizer.extract_labels(clip).labels[0], by_hand)


def test_codebook_moves_once_per_step_whatever_the_micro_batches(batch):
    """Two micro-batches (one clip each) then one update == one micro-batch of both."""
    split = _task()
    _train(split, batch, steps=1)  # k-means on the first batch, one update
    split.distiller.zero_grad(set_to_none=True)
    whole = copy.deepcopy(split)
    two = {"wav": batch["wav"][:2], "lengths": batch["lengths"][:2]}
    denominator = float(valid_patches(two["lengths"]).sum())
    loss, metrics = whole.forward_loss(two, denominator)
    loss.backward()
    start = split.distiller.quantizer.embedding.weight.clone()
    total = {}
    for b in range(2):
        one = {"wav": two["wav"][b : b + 1], "lengths": two["lengths"][b : b + 1]}
        part_loss, part = split.forward_loss(one, denominator)
        part_loss.backward()
        assert torch.equal(split.distiller.quantizer.embedding.weight, start)
        total = {k: total.get(k, 0) + v for k, v in part.items()}
    for key, value in metrics.items():
        assert torch.allclose(total[key], value, rtol=1e-5, atol=1e-5), key
    grads = dict(whole.distiller.named_parameters())
    for name, param in split.distiller.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6), name
    assert split.after_step(1) == pytest.approx(whole.after_step(1))
    moved = split.distiller.quantizer.embedding.weight
    assert not torch.equal(moved, start)
    assert torch.allclose(moved, whole.distiller.quantizer.embedding.weight, atol=1e-6)
    assert split.distiller.codebook_steps == 2


def test_dead_code_restart_revives_codes_only_when_on(batch):
    off, on = _task(restart_after=0), _task(restart_after=2)
    steps = 5
    health_on = _train(on, batch, steps)
    assert sum(h["codes_restarted"] for h in health_on) > 0
    assert on.distiller.code_idle_steps.max() < 2  # no code stays unused for 2 steps

    distiller = off.distiller
    groups = off.parameter_groups(None)
    optimizer = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=5e-3)
    denominator = float(valid_patches(batch["lengths"]).sum())
    idle = 0
    for step in range(1, steps + 1):
        loss, _ = off.forward_loss(batch, denominator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        before = distiller.quantizer.embedding.weight.clone()
        health = off.after_step(step)
        assert "codes_restarted" not in health
        unused = distiller.code_last_hit != step
        idle += int(unused.sum())
        assert torch.equal(distiller.quantizer.embedding.weight[unused], before[unused])
    assert idle > 0 and distiller.code_idle_steps.max() >= 2
    assert on.measure([batch])["codebook_usage"] > off.measure([batch])["codebook_usage"]


def test_parameter_groups_hold_every_trained_parameter_and_nothing_else():
    task = _task()
    params = [p for g in task.parameter_groups(None) for p in g["params"]]
    trained = [p for p in task.distiller.parameters() if p.requires_grad]
    assert len(params) == len(trained) == len({id(p) for p in params})
    assert {id(p) for p in params} == {id(p) for p in trained}
    assert not any(p is task.distiller.quantizer.embedding.weight for p in params)
    assert not any(p.requires_grad for p in task.teacher.parameters())
    names = set(task.model.state_dict())
    assert not any(name.startswith("teacher") for name in names)
    assert {"codebook_steps", "code_last_hit", "code_idle_steps"} <= names


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ValueError, match="target"):
        DistillConfig(target="clip")
    with pytest.raises(ValueError, match="restart_after must be 0 or a positive integer"):
        DistillConfig(restart_after=-1)
    with pytest.raises(ValueError, match="decay"):
        DistillConfig(decay=1.0)
    with pytest.raises(ValueError, match="fine-tuned teacher"):
        DistillTask(BEATs.from_pretrained(REFERENCE / "postnorm_gru.pt"), _student(),
                    DistillConfig(target="logits"))
    with pytest.raises(ValueError, match="tiny"):
        student_config("huge")


def test_presets():
    tiny, base = student_config("tiny"), student_config("base")
    assert (base.encoder_layers, base.encoder_embed_dim, base.quant_n, base.quant_dim) == (
        12, 768, 1024, 256)
    assert tiny.encoder_embed_dim < base.encoder_embed_dim
    assert tiny.deep_norm and tiny.gru_rel_pos and tiny.quant_n == 1024
    assert student_config("tiny", quant_n=64).quant_n == 64
