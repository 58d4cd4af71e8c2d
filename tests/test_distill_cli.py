"""`beats distill` end to end on real audio (espeak-ng, sox) with tiny teachers: the
tokenizer it writes, metrics, resume after SIGKILL, two processes, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from beats import BEATsTokenizer
from beats.audio import load_audio
from beats.cli import main

from .conftest import REFERENCE
from .kill import kill_at_checkpoint
from .test_extract import ROOT, _free_port, beats_cli

CODES = 32
# A tiny student (2 layers of 64, dropout 0.1) with a 32-code codebook; 8 steps of 4 x 1 s
# crops, a checkpoint every 2 steps, codes unused for 2 steps restarted.
RUN = ["--steps", "8", "--save-every", "2", "--batch-size", "4", "--crop", "1", "--lr", "1e-3",
       "--restart-after", "2", "--log-every", "2", "-q", "-j", "1"]


# One torch thread per run: these tiny models gain nothing from two, and two threads
# spinning on a machine that other jobs load made the runs several times slower.
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beats", "distill", *args],
                          capture_output=True, text=True, env=ENV)


def distill_here(capsys, *args: str) -> tuple[int, str]:
    """``beats distill ARGS`` through `beats.cli.main` in this process (no interpreter start:
    for runs that stop before training): (exit code, stderr)."""
    capsys.readouterr()
    code = main(["distill", *args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    folder = tmp_path_factory.mktemp("students")
    paths = {}
    for name, extra in (("tiny", {}), ("exact", {"dropout": 0.0, "attention_dropout": 0.0})):
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps({"preset": "tiny", "quant_n": CODES, "quant_dim": 16,
                                           **extra}))
    return paths


@pytest.fixture(scope="module")
def whole(sound_classes_dir, tiny_checkpoint, student, tmp_path_factory):
    """An uninterrupted run from the tiny random SSL teacher."""
    out = tmp_path_factory.mktemp("distill") / "whole"
    proc = distill(str(sound_classes_dir), "-o", str(out), "--teacher", str(tiny_checkpoint),
                   "--config", str(student["tiny"]), *RUN)
    assert proc.returncode == 0, proc.stderr
    return out


def _lines(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_config_and_the_tokenizer_checkpoint(whole, tiny_checkpoint):
    lines = _lines(whole)
    assert [x["step"] for x in lines] == [1, 2, 4, 6, 8]
    for x in lines:
        for key in ("loss", "cosine", "commitment", "codebook_usage", "codebook_usage_recent",
                    "perplexity", "lr", "audio_seconds_per_second", "codes_restarted"):
            assert math.isfinite(x[key]), (key, x)
        # the loss is 1 - cosine + commitment per patch: exactly so in a one-step window
        # (later lines average per-step means, the metrics weigh steps by their patches)
        tolerance = 1e-5 if x["step"] == 1 else 0.02
        assert x["loss"] == pytest.approx(1 - x["cosine"] + x["commitment"], abs=tolerance)
        assert 1 <= x["perplexity"] <= x["codebook_usage"] <= x["codebook_usage_recent"] <= CODES
    assert lines[-1]["cosine"] > lines[0]["cosine"] + 0.1  # it learns
    config = json.loads((whole / "config.json").read_text())
    assert config["task"] == "distill" and config["teacher"] == str(tiny_checkpoint)
    assert config["target"] == "features" and config["target_dim"] == 48
    assert config["config"]["restart_after"] == 2 and config["config"]["crop_seconds"] == 1.0
    assert config["student_config"]["quant_n"] == CODES

    saved = load_file(whole / "tokenizer" / "model.safetensors")
    trained = torch.load(whole / "state" / "last.pt", weights_only=True)["model"]
    assert not any("estimator" in k for k in saved)
    assert set(saved) == set(BEATsTokenizer(BEATsTokenizer.from_pretrained(
        whole / "tokenizer").cfg).state_dict())
    for key, value in saved.items():
        assert torch.equal(value, trained[f"student.{key}"]), key
    assert saved["quantize.embedding.initted"].item() == 1
    # k-means ran once, on the first step's 4 crops of 1 s (or less): <= 4 x 48 patches
    assert 0 < saved["quantize.embedding.cluster_size"].sum() <= 4 * 48
    assert int(trained["codebook_steps"]) == 8


def test_beats_tokenize_uses_it_and_its_labels_are_the_students_argmax(whole, tmp_path,
                                                                       sound_classes_dir):
    files = [sound_classes_dir / "speech" / "s03.wav", sound_classes_dir / "tonal" / "t04.wav"]
    out = tmp_path / "tokens"
    proc = beats_cli("tokenize", *map(str, files), "-o", str(out), "-m",
                     str(whole / "tokenizer"), "-j", "0", "-q")
    assert proc.returncode == 0, proc.stderr
    tokenizer = BEATsTokenizer.from_pretrained(whole / "tokenizer")
    codebook = torch.load(whole / "state" / "last.pt", weights_only=True)["model"][
        "student.quantize.embedding.weight"]
    used = set()
    for path in files:
        wav = torch.from_numpy(load_audio(path)[0])
        with torch.no_grad():  # by hand: the highest cosine between e and the codes
            e = tokenizer.quantize_layer(tokenizer.extract_features(wav).features[0])
        by_hand = ((e / e.norm(dim=-1, keepdim=True)) @ codebook.t()).argmax(dim=-1)
        tokens = np.load(out / f"{path.name}.npy")
        assert tokens.shape == (len(by_hand) // 8, 8)
        assert np.array_equal(tokens.reshape(-1), by_hand.numpy())
        used |= set(by_hand.tolist())
    assert len(used) > 1


def test_resume_after_sigkill_is_bit_identical(whole, sound_classes_dir, tiny_checkpoint,
                                               student, tmp_path):
    out = tmp_path / "killed"
    args = [str(sound_classes_dir), "-o", str(out), "--teacher", str(tiny_checkpoint),
            "--config", str(student["tiny"]), *RUN]
    last = out / "state" / "last.pt"
    killed_at = kill_at_checkpoint(["distill", *args], ENV, last)
    assert 2 <= killed_at < 8, "the run must be killed mid-way"

    proc = distill(*args, "--resume")
    assert proc.returncode == 0, proc.stderr
    a = torch.load(whole / "state" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    # everything: student, estimator, codebook, its EMA sizes and per-code usage counters
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    sa, sb = (load_file(o / "tokenizer" / "model.safetensors") for o in (whole, out))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _lines(out) == [{**x, "audio_seconds_per_second": y["audio_seconds_per_second"]}
                           for x, y in zip(_lines(whole), _lines(out), strict=True)]
    assert sum(x["codes_restarted"] for x in _lines(out)) > 0  # restarts were exercised


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
         "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         "-m", "beats", "distill", *args], capture_output=True, text=True, env=ENV, timeout=600)


@pytest.mark.slow
def test_two_processes_equal_one(sound_classes_dir, tiny_checkpoint, student, tmp_path):
    """2 gloo processes (2 clips per step each, in micro-batches of 1) end with the student,
    estimator and codebook (k-means, EMA, restarts) of 1 process taking the 4 clips at once."""
    common = [str(sound_classes_dir), "--teacher", str(tiny_checkpoint), "--config",
              str(student["exact"]), "--steps", "3", "--batch-size", "4", "--crop", "1",
              "--lr", "1e-3", "--restart-after", "1", "--log-every", "1", "-q", "-j", "0",
              "--device", "cpu"]
    single = tmp_path / "single"
    proc = distill(*common, "-o", str(single))
    assert proc.returncode == 0, proc.stderr
    multi = tmp_path / "multi"
    proc = _torchrun(*common, "-o", str(multi), "--micro-batch", "1")
    assert proc.returncode == 0, proc.stderr
    a = torch.load(single / "state" / "last.pt", weights_only=True)["model"]
    b = torch.load(multi / "state" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], atol=2e-5, rtol=1e-4), key
        else:
            assert torch.equal(a[key], b[key]), key
    for x, y in zip(_lines(single), _lines(multi), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        for key in ("codebook_usage", "codebook_usage_recent", "codes_restarted"):
            assert x[key] == y[key], key
    assert sum(x["codes_restarted"] for x in _lines(single)) > 0


def test_finetuned_teacher_logits_held_out_scores_and_config_file(
        tmp_path, sound_classes_dir, tiny_checkpoint, student, capsys):
    """The fine-tuned teacher's per-position logits (5 classes) as targets, held-out
    numbers and the best tokenizer; then the same folder refuses an SSL teacher."""
    out = tmp_path / "logits"
    audio = [str(sound_classes_dir / "speech"), str(sound_classes_dir / "noise")]
    proc = distill(*audio, "-o", str(out), "--teacher", str(REFERENCE / "finetuned.pt"),
                   "--config", str(student["tiny"]), "--steps", "2", "--batch-size", "2",
                   "--crop", "1", "--lr", "1e-3", "--heldout", str(sound_classes_dir / "tonal"),
                   "--eval-every", "1", "--eval-batch", "8", "-q", "-j", "0")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["target"] == "logits" and config["target_dim"] == 5
    trained = torch.load(out / "state" / "last.pt", weights_only=True)["model"]
    assert trained["estimator.head.weight"].shape == (5, 48)
    val = [x for x in _lines(out) if "val_cosine" in x]
    assert [x["step"] for x in val] == [1, 2]
    assert all(-1 <= x["val_cosine"] <= 1 and x["val_codebook_usage"] >= 1 for x in val)
    assert (out / "tokenizer-best" / "model.safetensors").is_file()
    assert BEATsTokenizer.from_pretrained(out / "tokenizer").cfg.quant_n == CODES

    code, err = distill_here(capsys, *audio, "-o", str(out), "--teacher", str(tiny_checkpoint),
                             "--config", str(student["tiny"]), "--steps", "2", "--batch-size",
                             "2", "--crop", "1", "-q", "-j", "0", "--resume")
    assert code == 2 and "does not fit this teacher" in err and err.count("\n") == 1, err

    again = tmp_path / "again"  # --config-file repeats the run; the command line wins
    proc = distill("--config-file", str(out / "config.json"), "-o", str(again), "--steps", "1")
    assert proc.returncode == 0, proc.stderr
    repeated = json.loads((again / "config.json").read_text())
    assert repeated["teacher"] == config["teacher"] and repeated["audio"] == config["audio"]
    assert repeated["config"] == {**config["config"], "steps": 1}


def test_bad_input_errors_before_training(whole, tmp_path, sound_classes_dir, tiny_checkpoint,
                                          student, capsys):
    fast = ["--steps", "1", "--batch-size", "2", "--crop", "1", "-q", "-j", "0", "--config",
            str(student["tiny"])]
    audio = str(sound_classes_dir / "noise")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [  # on the command line: one line each, exit code 2
        (["--teacher", str(REFERENCE / "tokenizer.pt"), audio], "is an acoustic tokenizer"),
        (["--teacher", str(tmp_path / "missing"), audio], "teacher: no checkpoint"),
        (["--teacher", str(tiny_checkpoint), str(empty)], "no audio files found"),
        (["--teacher", str(tiny_checkpoint), audio, "-o", str(whole)],
         "already holds a training run"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"o{i}"
        code, err = distill_here(capsys, *args, *(["-o", str(out)] if "-o" not in args else []),
                                 *fast)
        assert code == 2 and message in err, (args, err)
        assert err.count("\n") == 1 and err.startswith("beats distill: error: "), err
        assert not (out / "state").exists() and not (out / "config.json").exists()
    proc = distill(*cases[0][0], "-o", str(tmp_path / "o0"), *fast)  # the same, as a program
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("beats distill: error: ") and cases[0][1] in proc.stderr

    from beats.train.distill import DistillConfig
    from beats.train.distill import distill as api

    cfg = dict(steps=1, batch_size=2, crop_seconds=1.0, num_workers=0, quiet=True,
               student=str(student["tiny"]))
    cases = [  # the same checks in Python, all ValueErrors raised before any work
        ([str(tmp_path / "nothing.wav")], {}, "does not exist"),
        ([audio], {"target": "logits"}, "needs a fine-tuned teacher"),
        ([audio], {"fsdp": True}, "--fsdp is not supported"),
        ([audio], {"student": "huge"}, "neither a preset"),
    ]
    for i, (inputs, extra, message) in enumerate(cases):
        out = tmp_path / f"api{i}"
        with pytest.raises(ValueError, match=message):
            api(tiny_checkpoint, inputs, DistillConfig(**{**cfg, **extra}), out)
        assert not out.exists()


def test_no_readable_audio_stops_before_training(tmp_path, tiny_checkpoint, student, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        (bad / f"x{i}.flac").write_bytes(b"fLaC broken")
    out = tmp_path / "out"
    code, err = distill_here(capsys, str(bad), "-o", str(out), "--teacher", str(tiny_checkpoint),
                             "--config", str(student["tiny"]), "--steps", "1", "--batch-size",
                             "2", "--crop", "1", "-q", "-j", "0")
    assert code == 2 and err.count("\n") == 1, err
    assert f"none of the 2 input file(s) could be read (see {out / 'failed.jsonl'}" in err
    assert len((out / "failed.jsonl").read_text().splitlines()) == 2
    assert not (out / "tokenizer").exists() and not (out / "config.json").exists()


def test_help_documents_every_option_and_the_target(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["distill", "--help"])
    assert exit.value.code == 0
    raw = capsys.readouterr().out
    text = " ".join(raw.split())
    from beats.commands.distill import options

    OPTIONS = options()
    for _, flags, _kind, _ in OPTIONS:
        assert flags[-1] in text, flags
    # every option's entry states its default, but the switches (off unless given) and
    # --config-file (shared with beats finetune: a file to repeat a run, none unless given)
    entries = re.split(r"\n  (?=-)", raw.split("\noptions:\n", 1)[1])
    switches = {"-h, --help", "--fsdp", "--resume", "-q, --quiet", "--config-file CONFIG_FILE"}
    assert len(entries) == len(OPTIONS) + 5  # -h, --heldout, -o, --teacher, --config-file
    for entry in entries:
        flag = entry.strip().split("  ")[0].strip()
        states = re.search(r"\(default: |no default\)", " ".join(entry.split()))
        assert (flag in switches) == (states is None), entry
    assert "(default: None)" not in text
    assert "last-layer output" in text and "class logits per patch" in text
