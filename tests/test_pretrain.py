"""`beats pretrain` end to end on real audio (espeak-ng, sox): it learns, what it writes,
resume after SIGKILL, 2 processes = 1, token outputs = on-the-fly labels, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from beats import BEATs
from beats.train.data import ClipDataset
from beats.train.pretrain import MaskDraw, PretrainConfig, collate_masked, neighbour_guess
from beats.train.unlabelled import AudioFiles, audio_dataset, find_audio

from .kill import kill_at_checkpoint
from .test_extract import ROOT, beats_cli

# tiny with 2 layers and a 1-layer predictor: for the tests of mechanics, not learning
SMALL = {"preset": "tiny", "model": {"encoder_layers": 2}, "predictor_layers": 1}


# One torch thread per run: on a machine whose cores other jobs share, two threads that wait
# for each other make these tiny models ~5x slower (the behaviour tested does not change).
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def pretrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beats", "pretrain", *args],
                          capture_output=True, text=True, env=ENV)


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def split(sound_classes_dir, tmp_path_factory) -> tuple[Path, Path]:
    """List files of 48 training clips (relative paths) and 12 held-out clips."""
    root = tmp_path_factory.mktemp("lists")
    train, held = [], []
    for c in ("noise", "speech", "tonal"):
        paths = sorted((sound_classes_dir / c).glob("*.wav"))
        train += paths[:16]
        held += paths[16:]
    (root / "train.txt").write_text("# training clips\n" + "".join(
        f"{os.path.relpath(p, root)}\n" for p in train))
    (root / "heldout.lst").write_text("".join(f"{p}\n" for p in held))
    return root / "train.txt", root / "heldout.lst"


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "small.json"
    path.write_text(json.dumps(SMALL))
    return path


# --------------------------------------------------------------------------- it learns
# The tiny preset, shortened to fit CI: 40 steps of 8 one-second crops (~10 s); the held-out
# masked accuracy is already ~0.4 against a most-frequent-label rate of ~0.23.
LEARN = ["--config", "tiny", "--steps", "40", "--batch-size", "8", "--crop", "1",
         "--lr", "3e-3", "--warmup-steps", "8", "--eval-every", "40", "--log-every", "10",
         "-j", "0", "-q", "--dtype", "float32"]


@pytest.fixture(scope="module")
def learned(split, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "out"
    train, held = split
    proc = pretrain(str(train), "--heldout", str(held), "-o", str(out), *LEARN)
    assert proc.returncode == 0, proc.stderr
    return out


def test_tiny_learns_far_above_the_most_frequent_label(learned):
    """Held-out masked accuracy of the tiny preset ends well above the rate of the most
    frequent label among the same held-out masked patches."""
    val = [x for x in lines(learned) if "val_masked_accuracy" in x][-1]
    assert val["step"] == 40
    assert val["val_masked_accuracy"] >= val["val_majority"] + 0.1, val
    assert 0 < val["val_majority"] < 0.5 and 0 < val["val_neighbour"] < 1


def test_metrics_config_and_outputs(learned, split):
    train = [x for x in lines(learned) if "loss" in x]
    assert [x["step"] for x in train] == [1, 10, 20, 30, 40]
    for x in train:
        assert {"step", "loss", "lr", "masked_accuracy", "unmasked_accuracy", "labels_used",
                "audio_seconds_per_second"} <= set(x)
        assert math.isfinite(x["loss"]) and x["audio_seconds_per_second"] > 0
        assert 1 <= x["labels_used"] <= 1024
    assert train[0]["loss"] == pytest.approx(math.log(1024), abs=0.1)  # chance at step 1
    assert train[-1]["loss"] < train[0]["loss"] - 1.5
    assert train[-1]["masked_accuracy"] > 0.3
    config = json.loads((learned / "config.json").read_text())
    assert config["task"] == "pretrain" and config["files"] == 48
    assert config["heldout_files"] == 12 and config["config"]["config"] == "tiny"
    assert config["config"]["lr"] == 3e-3 and config["config"]["crop_seconds"] == 1.0
    assert config["ssl_config"]["num_labels"] == 1024
    assert config["labels"] == "random-projection tokenizer, seed 0"
    assert (learned / "state" / "last.pt").is_file() and not (learned / "failed.jsonl").exists()


def test_model_is_an_ordinary_checkpoint_that_extract_and_finetune_load(learned, tmp_path,
                                                                         sound_classes_dir):
    model = BEATs.from_pretrained(learned / "model")
    assert not model.cfg.finetuned_model and model.cfg.encoder_layers == 4
    names = set(load_file(learned / "model" / "model.safetensors"))
    assert not any(k.startswith(("predictor", "head", "mask_embedding")) for k in names)
    wav = sound_classes_dir / "speech" / "s01.wav"
    proc = beats_cli("extract", str(wav), "-o", str(tmp_path / "emb"), "-m",
                     str(learned / "model"), "-q", "-j", "0")
    assert proc.returncode == 0, proc.stderr
    vector = np.load(tmp_path / "emb" / "s01.wav.npy")
    from beats.audio import load_audio

    with torch.no_grad():
        mine = model.extract_features(load_audio(wav)[0]).features.mean(dim=(0, 1))
    assert vector.shape == (128,) and np.allclose(vector, mine.numpy(), atol=1e-5)
    from beats.train import FinetuneConfig, LabelledClips, finetune

    data = LabelledClips.from_items(
        [(str(p), c) for c in ("noise", "tonal") for p in
         sorted((sound_classes_dir / c).glob("*.wav"))[:3]])
    cfg = FinetuneConfig(steps=1, batch_size=4, num_workers=0, quiet=True, crop_seconds=1.0,
                         val_fraction=0.0, test_fraction=0.0)
    tuned = finetune(learned / "model", data, cfg, tmp_path / "ft").model
    kept = model.state_dict()
    assert tuned.cfg.finetuned_model and tuned.labels == ["noise", "tonal"]
    # one step from the pre-trained weights: the encoder starts from them
    assert max(float((tuned.state_dict()[k] - v).abs().max()) for k, v in kept.items()) < 0.05


def test_random_tokenizer_is_saved_and_round_trips_through_convert(learned, tmp_path, waves):
    from beats.tokenizer import BEATsTokenizer
    from beats.train.random_tokenizer import random_tokenizer

    saved = BEATsTokenizer.from_pretrained(learned / "tokenizer")
    fresh = random_tokenizer(0)
    wav = waves["wav.0"]
    labels = fresh.extract_labels(wav).labels
    assert torch.equal(saved.extract_labels(wav).labels, labels)
    pt = tmp_path / "tokenizer.pt"
    assert beats_cli("convert", str(learned / "tokenizer"), str(pt)).returncode == 0
    assert beats_cli("convert", str(pt), str(tmp_path / "back")).returncode == 0
    back = BEATsTokenizer.from_pretrained(tmp_path / "back")
    a, b = saved.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(back.extract_labels(wav).labels, labels)


# --------------------------------------------------------------------------- data
def test_find_audio_reads_folders_and_lists_without_opening_files(tmp_path, split,
                                                                   sound_classes_dir):
    train, held = split
    files = find_audio([str(train), str(held)])
    assert len(files) == 60 and isinstance(files, AudioFiles)
    assert files.path(0) == os.path.join(train.parent, os.path.relpath(
        sound_classes_dir / "noise" / "n00.wav", train.parent))
    listed = tmp_path / "list.txt"
    listed.write_text("missing.wav\n/nowhere/else.flac  # comment\n\n")
    found = find_audio([str(listed), str(sound_classes_dir / "tonal")])
    assert [Path(c.name).name for c in found[:2]] == ["missing.wav", "else.flac"]
    assert len(found) == 22 and found[-1].duration is None  # headers are read when drawn
    dataset = ClipDataset(found)
    assert dataset.clips is found  # kept compact, not copied into objects
    with pytest.raises(ValueError, match="does not exist"):
        find_audio([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio files found"):
        find_audio([str(tmp_path / "empty")])


def test_crops_start_on_steps_and_masks_follow_the_item_key(sound_classes_dir):
    files = find_audio([str(sound_classes_dir / "speech")])
    cfg = PretrainConfig.for_preset("tiny", crop_seconds=1.0, seed=3)
    data = audio_dataset(files, cfg, MaskDraw(0.75))
    items = [data[(p, p % len(files))] for p in range(12)]
    assert all(it["offset"] % 2560 == 0 for it in items)
    assert any(it["offset"] > 0 for it in items)
    again = [data[(p, p % len(files))] for p in reversed(range(12))][::-1]
    for a, b in zip(items, again, strict=True):
        assert np.array_equal(a["mask"], b["mask"]) and a["offset"] == b["offset"]
    other = data[(12 + 0, 0)]  # the same file at another stream position: new draws
    assert not (np.array_equal(other["mask"], items[0]["mask"])
                and other["offset"] == items[0]["offset"])
    batch = collate_masked(items)
    masked, lengths = batch["masked"], batch["lengths"]
    for b, n in enumerate(lengths.tolist()):
        valid = 8 * ((1 + (n - 400) // 160) // 16)
        assert not masked[b, valid:].any()  # padding of a short clip is never masked
        assert int(masked[b, :valid].sum()) == min(int(0.75 * valid + 0.5), valid - 1)
    assert batch["count"] == int(masked.sum())


def test_neighbour_guess_copies_the_nearest_kept_patch_of_the_band():
    labels = torch.arange(32)  # 4 steps x 8 bands: label = 8 * step + band
    masked = torch.zeros(32, dtype=torch.bool)
    masked[[8, 16, 24, 1, 9]] = True  # band 0: steps 1-3 hidden; band 1: steps 0-1
    guess = neighbour_guess(labels, masked, 32)
    assert guess[[8, 16, 24]].tolist() == [0, 0, 0]
    assert guess[[1, 9]].tolist() == [17, 17]
    masked[10] = True  # band 2, step 1: kept at steps 0 and 2, a tie: the earlier one
    assert neighbour_guess(labels, masked, 32)[10].item() == 2
    only = torch.zeros(16, dtype=torch.bool)
    only[0::8] = True  # band 0 keeps nothing
    assert neighbour_guess(labels[:16], only, 16)[0].item() == -1


def test_unreadable_files_are_recorded_and_skipped(tmp_path, sound_classes_dir, small_config):
    listed = tmp_path / "list.txt"
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00not audio")
    paths = sorted((sound_classes_dir / "tonal").glob("*.wav"))[:5]
    listed.write_text("".join(f"{p}\n" for p in [*paths, broken, tmp_path / "gone.wav"]))
    out = tmp_path / "out"
    proc = pretrain(str(listed), "-o", str(out), "--config", str(small_config), "--steps",
                    "3", "--batch-size", "7", "--crop", "1", "-j", "0")
    assert proc.returncode == 1, proc.stderr  # completed, some inputs skipped
    failed = {json.loads(x)["input"] for x in (out / "failed.jsonl").read_text().splitlines()}
    assert failed == {str(broken), str(tmp_path / "gone.wav")}
    assert "2 file(s) could not be read" in proc.stderr
    assert all(math.isfinite(x["loss"]) for x in lines(out))


# --------------------------------------------------------------------------- bad input
def test_bad_input_errors_before_training(tmp_path, sound_classes_dir, tiny_checkpoint,
                                          capsys):
    from beats.cli import main

    audio = str(sound_classes_dir / "tonal")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "empty")], "no audio files found"),
        ([audio, "--config", "huge"], "not a preset (tiny, base, large)"),
        ([audio, "--config", str(tmp_path / "none.json")], "cannot read the SSL config"),
        ([audio, "--tokenizer", str(tiny_checkpoint)], "without the tokenizer's quantizer"),
        ([audio, "--tokens", str(tmp_path / "empty")], "not a `beats tokenize` output"),
        ([audio, "--tokens", str(tmp_path), "--tokenizer", "random"], "not both"),
        ([audio, "--positions", "sideways"],
         "--positions must be one of true, scattered, compacted, got 'sideways'"),
        ([audio, "--crop", "0.1"], "--crop must be at least 0.175, got 0.1"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"o{i}"
        code = main(["pretrain", *args, "-o", str(out), "--steps", "1", "-q"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (args, err)
        assert err.count("\n") == 1 and err.startswith("beats pretrain: error: "), err
        assert not (out / "state").exists()


def test_tokens_equal_on_the_fly_labels_and_must_match_the_audio(tmp_path, sound_classes_dir,
                                                                 small_config):
    """Labels read from `beats tokenize` outputs of the random tokenizer give the very run
    that computes them on the fly; tokens of other audio are refused before training.
    The speech is made 16 kHz first: a crop of a 22.05 kHz file is resampled on its own,
    which changes a few samples at its edges (and so, rarely, an edge patch's label)."""
    audio = tmp_path / "audio"
    audio.mkdir()
    for p in sorted((sound_classes_dir / "speech").glob("*.wav"))[:6]:
        subprocess.run(["sox", str(p), "-r", "16000", str(audio / p.name)], check=True)
    from beats.train.random_tokenizer import random_tokenizer

    random_tokenizer(0).save_pretrained(tmp_path / "tok")
    tokens = tmp_path / "tokens"
    proc = beats_cli("tokenize", str(audio), "-o", str(tokens), "-m", str(tmp_path / "tok"),
                     "-q", "-j", "0")
    assert proc.returncode == 0, proc.stderr
    common = [str(audio), "--config", str(small_config), "--steps", "3", "--batch-size", "4",
              "--crop", "1", "-j", "0", "-q", "--log-every", "1"]
    a = tmp_path / "fly"
    b = tmp_path / "read"
    assert pretrain(*common, "-o", str(a), "--tokenizer", str(tmp_path / "tok")).returncode == 0
    proc = pretrain(*common, "-o", str(b), "--tokens", str(tokens))
    assert proc.returncode == 0, proc.stderr
    assert [x["loss"] for x in lines(a)] == [x["loss"] for x in lines(b)]
    wa, wb = (load_file(x / "model" / "model.safetensors") for x in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (a / "tokenizer").exists()  # a given tokenizer is not copied
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.wav").symlink_to(sound_classes_dir / "noise" / "n00.wav")
    proc = pretrain(str(other), "-o", str(tmp_path / "o"), "--tokens", str(tokens), "-q")
    assert proc.returncode == 2 and "1 of 1 audio files have no tokens" in proc.stderr


# --------------------------------------------------------------------------- resume
def test_resume_after_sigkill_is_bit_identical(tmp_path, split, small_config):
    train, held = split
    common = [str(train), "--heldout", str(held), "--config", str(small_config), "--steps",
              "12", "--save-every", "2", "--batch-size", "6", "--crop", "1", "--lr", "2e-3",
              "--log-every", "3", "--eval-every", "4", "-q", "-j", "1"]
    whole = tmp_path / "whole"
    proc = pretrain(*common, "-o", str(whole))
    assert proc.returncode == 0, proc.stderr

    out = tmp_path / "killed"
    killed_at = kill_at_checkpoint(["pretrain", *common, "-o", str(out)], ENV,
                                   out / "state" / "last.pt")
    assert 2 <= killed_at < 12, "the run must be killed mid-way"
    proc = pretrain(*common, "-o", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr
    a = load_file(whole / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def timeless(out: Path) -> list[dict]:
        return [{k: v for k, v in x.items() if k != "audio_seconds_per_second"}
                for x in lines(out)]

    assert timeless(out) == timeless(whole)
    before = {p: p.read_bytes() for p in (out / "config.json", out / "metrics.jsonl")}
    other = [str(held), *common[1:]]
    proc = pretrain(*other, "-o", str(out), "--resume")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "the earlier run used other audio files (files 48 -> 12; digest " in proc.stderr
    proc = pretrain(*common, "-o", str(out), "--resume")  # finished: nothing to do
    assert proc.returncode == 0 and "is finished" in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in before} == before


# --------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, split, small_config):
    """2 gloo processes (4 clips each per step, micro-batches of 2) end with the weights of
    1 process taking the 8 clips at once: masks and crops are drawn per item."""
    from .test_extract import _free_port

    train, _ = split
    common = [str(train), "--config", str(small_config), "--steps", "4", "--batch-size", "8",
              "--crop", "1", "--lr", "2e-3", "--log-every", "1", "-j", "0", "-q",
              "--device", "cpu"]
    single = tmp_path / "single"
    proc = pretrain(*common, "-o", str(single))
    assert proc.returncode == 0, proc.stderr
    multi = tmp_path / "multi"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
         "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "beats",
         "pretrain", *common, "-o", str(multi), "--micro-batch", "2"],
        capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    a = load_file(single / "model" / "model.safetensors")
    b = load_file(multi / "model" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k
    for x, y in zip(lines(single), lines(multi), strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["labels_used"] == y["labels_used"]  # distinct over both processes
        assert x["masked_accuracy"] == pytest.approx(y["masked_accuracy"], abs=1e-6)


def test_help_lists_the_options_with_defaults():
    proc = pretrain("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for flag in ("--config", "--tokenizer", "--tokens", "--crop", "--steps", "--batch-seconds",
                 "--lr", "--warmup-steps", "--seed", "--dtype", "--resume", "-q", "-j",
                 "--device", "--log-every", "--config-file", "--heldout", "--positions"):
        assert flag in text, flag
    assert "(default: 400000)" in text and "with --config tiny: 2000" in text
    assert "--warmup-steps WARMUP_STEPS, --warmup WARMUP_STEPS" in text  # the name


def test_no_readable_audio_stops_before_training_and_too_little_is_said(
        tmp_path, sound_classes_dir, small_config, capsys):
    from beats.cli import main

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.wav").write_bytes(b"RIFF\x00\x00 not audio")
    out = tmp_path / "out"
    run = ["--config", str(small_config), "--steps", "1", "--batch-size", "8", "--crop", "2",
           "-q", "-j", "0"]
    capsys.readouterr()
    assert main(["pretrain", str(bad), "-o", str(out), *run]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("beats pretrain: error: none of the 3 "
                                                   "input file(s) could be read (see "
                                                   f"{out / 'failed.jsonl'} for why)"), err
    assert len((out / "failed.jsonl").read_text().splitlines()) == 3
    assert not (out / "model").exists() and not (out / "config.json").exists()

    short = tmp_path / "short"
    short.mkdir()
    from .audio_files import sox_tone

    sox_tone(short / "a.wav", seconds=0.5)
    assert main(["pretrain", str(short), "-o", str(tmp_path / "o2"), *run]) == 0
    err = capsys.readouterr().err
    assert err.startswith("beats pretrain: warning: the readable audio (0.5 s in 1 file(s)) "
                          "is shorter than one step's crops (8 x 2 s = 16 s)"), err
