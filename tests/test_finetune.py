"""`beats finetune` end to end on real audio (espeak-ng, sox) from a tiny checkpoint:
accuracy, outputs, the fine-tuned checkpoint, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from beats import BEATs
from beats.files import folder_lock

from .kill import kill_at_checkpoint
from .test_extract import ROOT, beats_cli

# Settings that learn the 3-class set in seconds on a CPU with the tiny model.
FAST = ["--epochs", "8", "--batch-size", "8", "--lr", "2e-3", "-j", "0", "-q",
        "--crop-seconds", "2", "--eval-batch", "32"]


def finetune(*args: str) -> subprocess.CompletedProcess:
    return beats_cli("finetune", *args)


@pytest.fixture(scope="module")
def finetuned(sound_classes_dir, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "out"
    proc = finetune(str(sound_classes_dir), "-o", str(out), "-m", str(tiny_checkpoint), *FAST)
    assert proc.returncode == 0, proc.stderr
    return out


def test_heldout_accuracy_and_report(finetuned):
    report = json.loads((finetuned / "report.json").read_text())
    assert report["classes"] == ["noise", "speech", "tonal"] and not report["multilabel"]
    assert report["clips"] == 60 and report["test_clips"] == 12 and report["val_clips"] == 6
    assert report["test"]["accuracy"] >= 0.9, report["test"]
    matrix = report["test"]["confusion_matrix"]
    assert len(matrix) == 3 and sum(map(sum, matrix)) == 12
    assert sum(matrix[i][i] for i in range(3)) == round(12 * report["test"]["accuracy"])
    assert set(report["test"]["per_class_ap"]) == {"noise", "speech", "tonal"}
    # 42 training clips, 8 per step: 8 epochs are ceil(8 * 42 / 8) = 42 steps
    assert 1 <= report["best_step"] <= report["steps"] == 42
    assert report["training_seconds"] > 0 and report["failed_files"] == []
    for name in ("model", "model-last"):
        assert (finetuned / name / "model.safetensors").is_file()
    assert (finetuned / "state" / "last.pt").is_file()
    assert (finetuned / "state" / "best.pt").is_file()


def test_metrics_and_config_files(finetuned):
    lines = [json.loads(x) for x in (finetuned / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train] == [1, 10, 20, 30, 40, 42]
    for x in train:
        assert {"step", "epoch", "loss", "lr", "audio_seconds_per_second", "accuracy"} <= set(x)
        assert math.isfinite(x["loss"]) and x["audio_seconds_per_second"] > 0
    assert train[-1]["loss"] < train[0]["loss"]
    assert [x["step"] for x in lines if "val_accuracy" in x] == [6, 12, 18, 24, 30, 36, 42]
    config = json.loads((finetuned / "config.json").read_text())
    assert config["config"]["lr"] == 2e-3 and config["config"]["batch_size"] == 8
    assert config["task"] == "finetune" and config["classes"] == ["noise", "speech", "tonal"]
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return
    assert list((finetuned / "tensorboard").glob("events.out.tfevents.*"))


def test_finetuned_checkpoint_names_its_classes_and_reloads_bit_exactly(
        finetuned, sound_classes_dir, tmp_path):
    model = BEATs.from_pretrained(finetuned / "model")
    assert model.labels == ["noise", "speech", "tonal"]
    assert model.cfg.finetuned_model and model.cfg.predictor_class == 3
    assert model.cfg.predictor_activation == "softmax"
    from beats.audio import load_audio

    wav, _ = load_audio(sound_classes_dir / "speech" / "s03.wav")
    out = model.extract_features(wav)
    assert torch.allclose(out.probs.sum(dim=1), torch.ones(1))
    assert torch.allclose(out.probs, out.logits.softmax(dim=1))
    assert model.predict_labels(wav, top_k=1)[0][0][0] == "speech"
    again_dir = model.save_pretrained(tmp_path / "again")
    again = BEATs.from_pretrained(again_dir)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.label_dict == model.label_dict
    # the Microsoft .pt layout (cfg, model, label_dict) carries it too, both ways
    pt = tmp_path / "finetuned.pt"
    assert beats_cli("convert", str(finetuned / "model"), str(pt)).returncode == 0
    assert set(torch.load(pt, weights_only=True)) >= {"cfg", "model", "label_dict"}
    assert beats_cli("convert", str(pt), str(tmp_path / "converted")).returncode == 0
    converted = BEATs.from_pretrained(tmp_path / "converted")
    assert converted.labels == model.labels
    assert torch.equal(converted.extract_features(wav).probs, out.probs)
    files = [sound_classes_dir / "speech" / "s05.wav", sound_classes_dir / "noise" / "n04.wav"]
    proc = beats_cli("tag", *map(str, files), "-m", str(finetuned / "model"), "--json", "-k", "3")
    assert proc.returncode == 0, proc.stderr
    tags = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [t["labels"][0][0] for t in tags] == ["speech", "noise"]
    assert {n for n, _ in tags[0]["labels"]} == {"noise", "speech", "tonal"}


def test_a_folder_holding_a_run_needs_resume_and_a_busy_folder_is_refused(finetuned, tmp_path,
                                                                         sound_classes_dir,
                                                                         tiny_checkpoint):
    proc = finetune(str(sound_classes_dir), "-o", str(finetuned), "-m", str(tiny_checkpoint),
                    *FAST)
    assert proc.returncode == 2 and "already holds a training run; pass --resume" in proc.stderr
    busy = tmp_path / "busy"
    with folder_lock(busy):
        proc = finetune(str(sound_classes_dir), "-o", str(busy), "-m", str(tiny_checkpoint),
                        *FAST)
    assert proc.returncode == 2 and "another beats finetune run is writing" in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line, no traceback


def _small_copy(src, dst, per_class: int = 6):
    for c in ("noise", "speech", "tonal"):
        (dst / c).mkdir(parents=True)
        for p in sorted((src / c).glob("*.wav"))[:per_class]:
            shutil.copy(p, dst / c / p.name)
    return dst


def test_bad_input_errors_before_training(tmp_path, sound_classes_dir, tiny_checkpoint):
    model = ["-m", str(tiny_checkpoint)]
    one = tmp_path / "one"
    shutil.copytree(sound_classes_dir / "speech", one / "speech")
    proc = finetune(str(one), "-o", str(tmp_path / "o1"), *model, *FAST)
    assert proc.returncode == 2 and "at least 2 classes" in proc.stderr
    empty = _small_copy(sound_classes_dir, tmp_path / "empty")
    (empty / "birds").mkdir()
    proc = finetune(str(empty), "-o", str(tmp_path / "o2"), *model, *FAST)
    assert proc.returncode == 2 and "['birds'] have no readable clip" in proc.stderr
    table = tmp_path / "wide.csv"
    table.write_text("path,dog,cat\n"
                     f"{sound_classes_dir / 'speech' / 's00.wav'},1,0\n"
                     f"{sound_classes_dir / 'noise' / 'n00.wav'},yes,1\n")
    proc = finetune(str(table), "-o", str(tmp_path / "o3"), *model, *FAST)
    assert proc.returncode == 2 and "wide.csv:3" in proc.stderr
    assert "do not match the multi-label header" in proc.stderr
    proc = finetune(str(empty), "-o", str(tmp_path / "o4"), *model, "--batch-size", "0")
    assert proc.returncode == 2 and "must be a positive integer" in proc.stderr
    for name in ("o1", "o2", "o3"):
        assert not (tmp_path / name / "state").exists()


def test_unreadable_files_are_recorded_and_skipped(tmp_path, sound_classes_dir, tiny_checkpoint):
    data = _small_copy(sound_classes_dir, tmp_path / "data")
    (data / "speech" / "broken.wav").write_bytes(b"RIFF\x00\x00not audio at all")
    (data / "noise" / "empty.flac").write_bytes(b"")
    out = tmp_path / "out"
    proc = finetune(str(data), "-o", str(out), "-m", str(tiny_checkpoint), "--steps", "2",
                    "--batch-size", "4", "-j", "0", "-q", "--crop-seconds", "1")
    assert proc.returncode == 1, proc.stderr  # completed, some inputs skipped
    assert "2 file(s) could not be read and were skipped" in proc.stderr
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in failed) == ["broken.wav", "empty.flac"]
    assert all(r["status"] == "failed" and r["error"] for r in failed)
    report = json.loads((out / "report.json").read_text())
    assert report["clips"] == 18 and len(report["failed_files"]) == 2


def test_non_finite_loss_is_an_error_not_a_success(tmp_path, sound_classes_dir, tiny_checkpoint):
    data = _small_copy(sound_classes_dir, tmp_path / "data")
    out = tmp_path / "out"
    proc = finetune(str(data), "-o", str(out), "-m", str(tiny_checkpoint), "--lr", "1e30",
                    "--warmup-steps", "0", "--steps", "4", "--batch-size", "4", "-j", "0", "-q",
                    "--clip-norm", "0", "--crop-seconds", "1", "--eval-every", "1")
    assert proc.returncode == 4, proc.stderr
    assert "not finite" in proc.stderr and "state/last.pt" in proc.stderr
    assert not (out / "report.json").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_autocast_run_has_a_finite_loss(dtype, tmp_path, sound_classes_dir,
                                                          tiny_checkpoint):
    data = _small_copy(sound_classes_dir, tmp_path / "data", per_class=3)
    out = tmp_path / "out"
    proc = finetune(str(data), "-o", str(out), "-m", str(tiny_checkpoint), "--dtype", dtype,
                    "--steps", "3", "--batch-size", "3", "-j", "0", "-q", "--crop-seconds", "1",
                    "--val-fraction", "0", "--test-fraction", "0", "--log-every", "1")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(math.isfinite(x["loss"]) for x in lines)
    # float16 loss scaling may skip an overflowing step (grad_norm null); bf16 never does
    assert all(x["grad_norm"] is None or x["grad_norm"] > 0 for x in lines)
    assert dtype == "float16" or all(x["grad_norm"] for x in lines)
    assert (out / "model" / "model.safetensors").is_file()  # no validation: the last model


# --------------------------------------------------------------------------- resume
RESUME = ["--steps", "12", "--save-every", "2", "--batch-size", "6", "--crop-seconds", "1",
          "--lr", "1e-3", "--dropout", "0.1", "--layerdrop", "0.2", "--mixup", "0.5",
          "--roll", "--log-every", "3", "-q", "--eval-every", "4"]


def test_resume_after_sigkill_is_bit_identical(tmp_path, sound_classes_dir, tiny_checkpoint):
    data = _small_copy(sound_classes_dir, tmp_path / "data", per_class=8)
    common = [str(data), "-m", str(tiny_checkpoint), *RESUME]
    whole = tmp_path / "whole"
    proc = finetune(*common, "-o", str(whole), "-j", "1")
    assert proc.returncode == 0, proc.stderr

    out = tmp_path / "killed"
    killed_at = kill_at_checkpoint(["finetune", *common, "-o", str(out), "-j", "1"],
                                   dict(os.environ, PYTHONPATH=str(ROOT)),
                                   out / "state" / "last.pt")
    assert 2 <= killed_at < 12, "the run must be killed mid-way"

    stale = out / "state" / ".last.pt.0123456789ab.tmp"  # as a kill inside a save leaves it
    stale.write_bytes(b"half a checkpoint")
    proc = finetune(*common, "-o", str(out), "-j", "1", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists()
    for name in ("model-last", "model"):
        a = load_file(whole / name / "model.safetensors")
        b = load_file(out / name / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(x)["step"] for x in (whole / "metrics.jsonl").read_text()
                     .splitlines()]
    losses = [json.loads(x).get("loss") for x in (out / "metrics.jsonl").read_text().splitlines()]
    whole_losses = [json.loads(x).get("loss")
                    for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert losses == whole_losses


# --------------------------------------------------------------------------- processes
DP = ["--steps", "4", "--batch-size", "8", "--crop-seconds", "1", "--lr", "1e-3",
      "--dropout", "0", "--attention-dropout", "0", "--head-dropout", "0", "--layerdrop", "0",
      "--mixup", "0", "-j", "0", "-q", "--val-fraction", "0", "--test-fraction", "0",
      "--device", "cpu"]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    from .test_extract import _free_port

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
         "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         "-m", "beats", "finetune", *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(mode, tmp_path, sound_classes_dir, tiny_checkpoint):
    """2 gloo processes (each 4 clips per step in micro-batches of 2) end with the weights
    of 1 process taking the 8 clips at once; SpecAugment masks are on (drawn per item)."""
    data = _small_copy(sound_classes_dir, tmp_path / "data", per_class=4)
    common = [str(data), "-m", str(tiny_checkpoint), *DP]
    single = tmp_path / "single"
    proc = finetune(*common, "-o", str(single))
    assert proc.returncode == 0, proc.stderr
    multi = tmp_path / "multi"
    extra = ["--fsdp"] if mode == "fsdp" else []
    proc = _torchrun(*common, "-o", str(multi), "--micro-batch", "2", *extra)
    assert proc.returncode == 0, proc.stderr
    a = load_file(single / "model" / "model.safetensors")
    b = load_file(multi / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    moved = max(float((a[k] - load_file(tiny_checkpoint / "model.safetensors").get(k, a[k]))
                      .abs().max()) for k in a)
    assert moved > 1e-3  # training changed the weights
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k
    steps_a = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    steps_b = [json.loads(x) for x in (multi / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(steps_a, steps_b, strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-4)


# --------------------------------------------------------------------------- API and options
def test_python_api_on_arrays_multilabel_balanced_and_cv(tmp_path, sound_classes_dir,
                                                          tiny_checkpoint):
    from beats.audio import load_audio
    from beats.train import FinetuneConfig, LabelledClips, finetune

    items = []
    for i, name in enumerate(("speech", "noise", "tonal")):
        for j, path in enumerate(sorted((sound_classes_dir / name).glob("*.wav"))[:4]):
            labels = [name] + (["loud"] if j % 2 else [])
            items.append((load_audio(path)[0], labels, str((i + j) % 2)))
    data = LabelledClips.from_items(items)
    assert data.multilabel and data.classes == ["loud", "noise", "speech", "tonal"]
    cfg = FinetuneConfig(steps=2, batch_size=4, lr=1e-3, num_workers=0, quiet=True,
                         crop_seconds=1.0, balanced=True, val_fraction=0.0, test_fold="1",
                         eval_every=1)
    result = finetune(BEATs.from_pretrained(tiny_checkpoint), data, cfg, tmp_path / "out",
                      cv=True)
    report = result.report
    assert report["multilabel"] and 0 <= report["test"]["mAP"] <= 1
    assert "accuracy" not in report["test"] and "confusion_matrix" not in report["test"]
    assert set(report["cv"]["folds"]) == {"0", "1"} and "mAP" in report["cv"]["mean"]
    assert (tmp_path / "out" / "cv" / "fold-0" / "model" / "config.json").is_file()
    model = result.model
    assert model.cfg.predictor_activation == "sigmoid" and model.labels == data.classes
    out = model.extract_features(items[0][0])
    assert torch.allclose(out.probs, torch.sigmoid(out.logits))


def test_config_file_repeats_a_run_and_the_command_line_overrides_it(tmp_path,
                                                                      sound_classes_dir,
                                                                      tiny_checkpoint):
    data = _small_copy(sound_classes_dir, tmp_path / "data", per_class=3)
    first = tmp_path / "first"
    proc = finetune(str(data), "-o", str(first), "-m", str(tiny_checkpoint), "--steps", "1",
                    "--batch-size", "3", "--lr", "7e-4", "--seed", "4", "-j", "0", "-q",
                    "--crop-seconds", "1", "--val-fraction", "0", "--test-fraction", "0")
    assert proc.returncode == 0, proc.stderr
    second = tmp_path / "second"
    proc = finetune("--config-file", str(first / "config.json"), "-o", str(second))
    assert proc.returncode == 0, proc.stderr
    a = json.loads((first / "config.json").read_text())
    b = json.loads((second / "config.json").read_text())
    assert a["config"] == b["config"] and a["data"] == b["data"] and a["model"] == b["model"]
    wa = load_file(first / "model" / "model.safetensors")
    wb = load_file(second / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same settings, same weights
    third = tmp_path / "third"
    proc = finetune("--config-file", str(first / "config.json"), "-o", str(third),
                    "--lr", "1e-4")
    assert proc.returncode == 0, proc.stderr
    c = json.loads((third / "config.json").read_text())["config"]
    assert c["lr"] == 1e-4 and c["seed"] == 4 and c["steps"] == 1


def test_help_documents_every_option_with_its_default():
    proc = beats_cli("finetune", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    from beats.commands.finetune import options

    OPTIONS = options()
    for _, flags, _kind, _ in OPTIONS:
        assert flags[-1] in text, flags
    # every valued option, and -m (the registry's default model)
    assert text.count("(default: ") == sum(kind != "flag" for *_, kind, _ in OPTIONS) + 1
    assert "--test-fraction" in text and "--val-fold" in text and "--cv" in text


# --------------------------------------------------------------------------- data and resume
def test_duplicated_rows_are_one_file_each_in_one_split(tmp_path, sound_classes_dir,
                                                         tiny_checkpoint, capsys):
    from beats.cli import main

    rows = [f"{p},{c}" for c in ("noise", "speech", "tonal")
            for p in sorted((sound_classes_dir / c).glob("*.wav"))[:6]]
    table = tmp_path / "twice.csv"
    table.write_text("path,label\n" + "".join(f"{r}\n" for r in rows + rows))
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["finetune", str(table), "-o", str(out), "-m", str(tiny_checkpoint),
                 "--steps", "1", "--batch-size", "4", "--crop-seconds", "1", "-j", "0", "-q",
                 "--val-fraction", "0.2", "--test-fraction", "0.2"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("18 duplicate row(s) dropped") == 1 and err.startswith(
        "beats finetune: warning: "), err
    report = json.loads((out / "report.json").read_text())
    assert report["clips"] == 18  # not 36
    assert (report["train_clips"], report["val_clips"], report["test_clips"]) == (12, 3, 3)
    assert report["train"]["clips"] + report["val"]["clips"] + report["test"]["clips"] == 18


def test_a_long_file_is_evaluated_in_windows_within_bounded_memory(tmp_path, sound_classes_dir,
                                                                   tiny_checkpoint):
    """A 3-minute 8 kHz file among short clips: read whole in one batch, its attention alone
    would take several GB; in windows the run stays far below the 2.5 GB it may use."""
    import resource

    from .audio_files import sox

    data = _small_copy(sound_classes_dir, tmp_path / "data", per_class=3)
    sox("-n", "-r", "8000", "-b", "16", str(data / "noise" / "long.wav"), "synth", "180",
        "whitenoise", "vol", "0.3")
    out = tmp_path / "out"
    limit = 2500 * 2**20

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "beats", "finetune", str(data), "-o", str(out), "-m",
             str(tiny_checkpoint), "--steps", "2", "--batch-size", "4", "--crop-seconds", "1",
             "-j", "0", "-q", "--val-fraction", "0", "--test-fraction", "0"],
            stderr=err, stdout=subprocess.DEVNULL, preexec_fn=cap,
            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    peak_mb = usage.ru_maxrss / 1024
    assert peak_mb < 1200, peak_mb
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["clips"] == 10 and report["failed_files"] == []


def test_resume_checks_model_classes_and_data_and_never_rewrites_a_finished_run(
        finetuned, sound_classes_dir, tiny_checkpoint, tmp_path, capsys):
    from beats.cli import main

    from .conftest import tiny_config

    before = {p: p.read_bytes() for p in finetuned.rglob("*") if p.is_file()}

    def resume(data, model=tiny_checkpoint, *extra: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(["finetune", str(data), "-o", str(finetuned), "-m", str(model), *FAST,
                     *extra, "--resume"])
        return code, capsys.readouterr().err

    code, err = resume(sound_classes_dir)  # the same settings: it is finished
    assert code == 0 and "is finished (same settings, model and data): nothing to do" in err
    torch.manual_seed(1)
    other = BEATs(tiny_config()).save_pretrained(tmp_path / "other")
    two = tmp_path / "two"  # two of the three classes, the same files
    two.mkdir()
    for c in ("noise", "speech"):
        (two / c).symlink_to(sound_classes_dir / c)
    fewer = tmp_path / "fewer"  # the same classes, one file less
    for c in ("noise", "speech", "tonal"):
        (fewer / c).mkdir(parents=True)
        for p in sorted((sound_classes_dir / c).glob("*.wav"))[c == "tonal":]:
            (fewer / c / p.name).symlink_to(p)
    for args, what in [((sound_classes_dir, other), "another model (weights "),
                       ((two,), "another class set ([\"noise\", \"speech\", \"tonal\"] -> "
                                "[\"noise\", \"speech\"])"),
                       ((fewer,), "another data list (files 60 -> 59; digest "),
                       ((sound_classes_dir, tiny_checkpoint, "--lr", "1e-3"),
                        "other settings (lr: 0.002 -> 0.001)")]:
        code, err = resume(*args)
        assert code == 2 and err.count("\n") == 1 and what in err, err
        assert err.startswith(f"beats finetune: error: cannot resume in {finetuned}: ")
    assert {p: p.read_bytes() for p in finetuned.rglob("*") if p.is_file()} == before
