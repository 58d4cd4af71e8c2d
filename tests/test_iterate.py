"""`beats iterate` end to end on real audio (espeak-ng, sox): stages in order, the labels of
each pre-training, the summary, killed mid-stage then restarted, settings checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from beats import BEATs, BEATsTokenizer

from .kill import kill_at_checkpoint
from .test_extract import ROOT

ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

# Stage sizes for tests of mechanics (not learning): a 2-layer SSL model and a 1-layer
# student, 8 steps each of 6 one-second crops, a checkpoint every 2 steps.
PRETRAIN = {"steps": 8, "batch_size": 6, "crop_seconds": 1.0, "lr": 2e-3, "save_every": 2,
            "log_every": 2, "eval_every": 8, "warmup_steps": 2}
DISTILL = {"steps": 8, "batch_size": 6, "crop_seconds": 1.0, "lr": 1e-3, "save_every": 2,
           "log_every": 2, "eval_every": 8, "estimator_layers": 1, "kmeans_iters": 2}


@pytest.fixture(scope="module")
def setup(sound_classes_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("iterate")
    train, held = [], []
    for c in ("noise", "speech", "tonal"):
        paths = sorted((sound_classes_dir / c).glob("*.wav"))
        train += paths[:16]
        held += paths[16:]
    (root / "train.txt").write_text("".join(f"{p}\n" for p in train))
    (root / "heldout.txt").write_text("".join(f"{p}\n" for p in held))
    (root / "ssl.json").write_text(json.dumps(
        {"preset": "tiny", "model": {"encoder_layers": 2}, "predictor_layers": 1}))
    (root / "student.json").write_text(json.dumps({"preset": "tiny", "encoder_layers": 1}))
    (root / "pretrain.json").write_text(json.dumps(PRETRAIN))
    (root / "distill.json").write_text(json.dumps({**DISTILL,
                                                   "student": str(root / "student.json")}))
    return {"root": root, "train": root / "train.txt", "heldout": root / "heldout.txt",
            "ssl": root / "ssl.json", "pretrain": root / "pretrain.json",
            "distill": root / "distill.json", "probe": sound_classes_dir}


def command(s: dict[str, Path], out: Path, *more: str) -> list[str]:
    """The arguments of ``beats iterate`` (after ``python -m beats``)."""
    return ["iterate", str(s["train"]), "--heldout",
            str(s["heldout"]), "-o", str(out), "--iterations", "2", "--config", str(s["ssl"]),
            "--pretrain-options", str(s["pretrain"]), "--distill-options", str(s["distill"]),
            "--dtype", "float32", "-j", "0", *more]


def beats(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beats", *args], env=ENV, capture_output=True,
                          text=True)


def lines(folder: Path) -> list[str]:
    return (folder / "metrics.jsonl").read_text().splitlines()


def test_killed_mid_stage_resumes_that_stage_and_skips_finished_ones(setup, tmp_path):
    out = tmp_path / "run"
    cmd = command(setup, out, "--probe", str(setup["probe"]))
    killed_at = kill_at_checkpoint(cmd, ENV, out / "iter2" / "distill" / "state" / "last.pt")
    assert 2 <= killed_at < 8, "the run must be killed inside the distillation stage"
    assert (out / "iter1" / "pretrain" / "stage.json").is_file()
    assert (out / "iter1" / "probe" / "stage.json").is_file()
    assert not (out / "iter2" / "distill" / "stage.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in (out / "iter1").rglob("*") if p.is_file()}
    before = lines(out / "iter2" / "distill")
    kept = [x for x in before if json.loads(x)["step"] <= killed_at]

    proc = beats(cmd)
    assert proc.returncode == 0, proc.stderr
    for stage in ("iter1/pretrain", "iter1/probe"):
        assert f"skipping (done) {stage}" in proc.stderr
    assert "resuming iter2/distill" in proc.stderr
    assert "running iter2/pretrain" in proc.stderr
    # Iteration 1 untouched; the distillation went on from its checkpoint: the lines up to
    # it are the killed run's, byte for byte (a fresh start would rewrite their speeds).
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    after = lines(out / "iter2" / "distill")
    assert after[:len(kept)] == kept
    steps = [json.loads(x)["step"] for x in after if "loss" in json.loads(x)]
    assert steps == sorted(set(steps)) and steps[-1] == 8

    # Each pre-training used its iteration's labels: iteration 1 the random tokenizer
    # (saved beside it), iteration 2 the tokenizer distilled from iteration 1's model.
    first = json.loads((out / "iter1" / "pretrain" / "config.json").read_text())
    second = json.loads((out / "iter2" / "pretrain" / "config.json").read_text())
    distilled = out / "iter2" / "distill" / "tokenizer"
    assert first["config"]["tokenizer"] == "random"
    assert Path(second["config"]["tokenizer"]) == distilled
    teacher = json.loads((out / "iter2" / "distill" / "config.json").read_text())["teacher"]
    assert Path(teacher) == out / "iter1" / "pretrain" / "model"
    BEATsTokenizer.from_pretrained(out / "iter1" / "pretrain" / "tokenizer")
    assert BEATsTokenizer.from_pretrained(distilled).cfg.encoder_layers == 1
    assert BEATs.from_pretrained(out / "iter2" / "pretrain" / "model").cfg.encoder_layers == 2

    # The summary: one row per iteration, numbers read from the stages' own files.
    rows = json.loads((out / "summary.json").read_text())
    assert [r["iteration"] for r in rows] == [1, 2]
    for r, k in zip(rows, (1, 2), strict=True):
        metrics = [json.loads(x) for x in lines(out / f"iter{k}" / "pretrain")]
        val = [m for m in metrics if "val_masked_accuracy" in m]
        assert r["heldout_masked_accuracy"] == val[-1]["val_masked_accuracy"]
        assert 0 < r["heldout_majority"] < 1 and 1 <= r["labels_used"] <= 1024
        report = json.loads((out / f"iter{k}" / "probe" / "report.json").read_text())
        assert r["probe_accuracy"] == report["test"]["accuracy"]
    assert rows[0]["codebook_usage"] is None and 1 <= rows[1]["codebook_usage"] <= 1024
    assert "| 2 | distilled from iter1 |" in proc.stdout

    # Run again: everything is done, nothing runs. More iterations extend the run; other
    # settings are another run (one line, exit 2).
    again = beats(cmd)
    assert again.returncode == 0 and "running" not in again.stderr
    other = beats(command(setup, out, "--seed", "1"))
    assert other.returncode == 2
    assert other.stderr.count("\n") == 1 and "other settings" in other.stderr
    assert "seed" in other.stderr or "pretrain" in other.stderr


def test_bad_settings_stop_before_any_training(setup, tmp_path):
    from beats.cli import main

    out = tmp_path / "x"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no_such_setting": 1}))
    base = ["iterate", str(setup["train"]), "-o", str(out), "-q"]
    assert main([*base, "--pretrain-options", str(bad)]) == 2
    assert main([*base, "--distill-options", str(tmp_path / "missing.json")]) == 2
    assert not (out / "iter1").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("not an iterate run")
    assert main(["iterate", str(setup["train"]), "-o", str(tmp_path / "full"), "-q"]) == 2
    assert (tmp_path / "full" / "mine.txt").read_text() == "not an iterate run"


def test_teacher_finetune_distils_from_the_fine_tuned_model(setup, tmp_path):
    """The iter3+ path: iteration 1's model fine-tuned on labelled data is the teacher,
    and the student learns its per-position class logits."""
    options = tmp_path / "finetune.json"
    options.write_text(json.dumps({"steps": 4, "batch_size": 6, "crop_seconds": 1.0,
                                   "save_every": 2, "log_every": 2}))
    out = tmp_path / "run"
    proc = beats(command(setup, out, "--teacher-finetune", str(setup["probe"]),
                         "--finetune-options", str(options), "-q"))
    assert proc.returncode == 0, proc.stderr
    tuned = out / "iter1" / "finetune" / "model"
    assert sorted(BEATs.from_pretrained(tuned).labels) == ["noise", "speech", "tonal"]
    record = json.loads((out / "iter2" / "distill" / "config.json").read_text())
    assert Path(record["teacher"]) == tuned
    assert record["target"] == "logits" and record["target_dim"] == 3
    rows = json.loads((out / "summary.json").read_text())
    assert rows[1]["tokenizer"] == "distilled from iter1 (fine-tuned)"
