"""Strong-label fine-tuning (``beats finetune TSV --strong``): step targets, events moving
with crops and rolls, a tiny model that learns when tones sound, a report whose scores
equal sed_eval's on the events ``beats detect`` writes, and bad input refused or failing
alone."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from beats import BEATs
from beats.cli import main
from beats.labelled import Event, read_strong_tsv, split_by_file
from beats.train import FinetuneConfig, finetune
from beats.train.augment import mix
from beats.train.data import Clip
from beats.train.finetune import prepare_model
from beats.train.strong import (
    StrongTarget,
    StrongTask,
    evaluate_detection,
    step_targets,
    still_strong,
)

from .conftest import tiny_config

RATE = 16000
CLASSES = ("beep", "chirp")


def tone(seconds: float, label: str, rng: np.random.Generator) -> np.ndarray:
    """A 1 kHz tone (beep) or a 300 Hz -> 2.3 kHz sweep (chirp), faded in and out."""
    t = np.arange(round(seconds * RATE)) / RATE
    phase = 2 * np.pi * (1000 * t if label == "beep" else 300 * t + 1000 * t**2 / seconds)
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)
    return (0.3 + 0.1 * rng.random()) * np.sin(phase) * fade


def make_scapes(folder, count: int, seed: int, seconds: float = 4.0) -> list[str]:
    """``count`` clips of noise with 0-2 events each; returns the TSV's lines."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["filename\tonset\toffset\tevent_label"]
    for i in range(count):
        wav = 0.02 * rng.standard_normal(round(seconds * RATE))
        rows = []
        for k in range(int(rng.integers(0, 3))):
            label = CLASSES[k]
            onset = round(float(rng.uniform(0, seconds - 1.0)), 3)
            offset = round(onset + float(rng.uniform(0.3, 1.0)), 3)
            start = round(onset * RATE)
            piece = tone(offset - onset, label, rng)
            wav[start : start + len(piece)] += piece
            rows.append(f"{i:02d}.wav\t{onset}\t{offset}\t{label}")
        sf.write(folder / f"{i:02d}.wav", wav.astype(np.float32), RATE)
        lines += rows or [f"{i:02d}.wav\t\t\t"]
    return lines


@pytest.fixture(scope="module")
def scapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scapes")
    (folder / "annotations.tsv").write_text("\n".join(make_scapes(folder, 30, 0)) + "\n")
    return folder / "annotations.tsv"


CONFIG = dict(epochs=30, batch_size=4, crop_seconds=2.0, lr=5e-3, layer_lr_decay=1.0,
              num_workers=0,
              quiet=True, val_fraction=0.15, test_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def trained(scapes, tmp_path_factory):
    torch.manual_seed(0)
    backbone = BEATs(tiny_config())
    out = tmp_path_factory.mktemp("strong") / "out"
    result = finetune(backbone, scapes, FinetuneConfig(strong=True, **CONFIG), out)
    return backbone, result, out


# --------------------------------------------------------------------------- targets
def test_a_step_is_positive_when_an_event_overlaps_it():
    index = {"a": 0, "b": 1}
    t = step_targets([Event(0.5, 1.0, "a"), Event(0.0, 0.16, "b")], 10, index)
    assert np.flatnonzero(t[:, 0]).tolist() == [3, 4, 5, 6]  # 0.48-0.64 ... 0.96-1.12
    assert np.flatnonzero(t[:, 1]).tolist() == [0]  # ends on step 1's start: not in it
    # a crop from 0.32 s sees the event from 0.18 s to 0.68 s
    t = step_targets([Event(0.5, 1.0, "a")], 10, {"a": 0}, start=0.32)
    assert np.flatnonzero(t[:, 0]).tolist() == [1, 2, 3, 4]
    # rolled by 1.28 s in a 1.6 s crop: 0.5-1.0 -> 1.78-2.28 -> 0.18-0.68; 0.0-0.4 -> 1.28-1.6
    # and 0.0-0.08
    t = step_targets([Event(0.5, 1.0, "a"), Event(0.0, 0.4, "b")], 10, index, length=1.6,
                     roll=1.28)
    assert np.flatnonzero(t[:, 0]).tolist() == [1, 2, 3, 4]
    assert np.flatnonzero(t[:, 1]).tolist() == [0, 8, 9]
    # an event outside the crop marks nothing
    assert not step_targets([Event(3.0, 4.0, "a")], 10, {"a": 0}).any()


def test_targets_follow_the_audio_through_crops_and_rolls():
    """A clip silent but for a tone from 5 s to 6 s, cropped to 2 s at random offsets and
    rolled: every step full of tone is positive, every silent step negative."""
    wav = np.zeros(8 * RATE, dtype=np.float32)
    wav[5 * RATE : 6 * RATE] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(RATE) / RATE)
    clip = Clip(wav, StrongTarget((Event(5.0, 6.0, "beep"),)), 8.0)
    cfg = FinetuneConfig(strong=True, crop_seconds=2.0, roll=True, time_mask=0.0,
                         freq_mask=0)
    task = StrongTask(BEATs(tiny_config(finetuned_model=True, predictor_class=1)), [clip],
                      [], ["beep"], True, cfg)
    seen_positive = seen_rolled = 0
    for position in range(40):
        batch = task.collate([task.train_set[(position, 0)]])
        assert batch["offset"][0] % 2560 == 0  # crops start on whole steps
        steps = batch["frame_targets"].shape[1]
        energy = batch["wav"][0, : steps * 2560].reshape(steps, 2560).pow(2).mean(1)
        full, silent = energy > 0.1, energy == 0
        targets = batch["frame_targets"][0, :, 0]
        assert bool((targets[full] == 1).all()) and bool((targets[silent] == 0).all())
        seen_positive += int(full.any())
        seen_rolled += int(batch["roll"][0] > 0)
        assert batch["clip_targets"][0, 0] == float(targets.max())
    assert seen_positive >= 5 and seen_rolled >= 35


def test_mixup_mixes_frame_targets_step_by_step():
    frames = torch.zeros(2, 3, 1)
    frames[0, :, 0] = torch.tensor([1.0, 0.0, 1.0])
    frames[1, :, 0] = torch.tensor([0.0, 1.0, 1.0])
    mixed = mix(frames, torch.tensor([1, 0]), torch.tensor([0.75, 1.0]))
    assert mixed[0, :, 0].tolist() == [0.75, 0.25, 1.0]
    assert mixed[1, :, 0].tolist() == [0.0, 1.0, 1.0]


def test_mixing_with_a_weak_clip_makes_a_clip_weak_and_unmixed_clips_stay():
    strong = torch.tensor([True, True, False, True])
    partner = torch.tensor([2, 2, 0, 0])  # clips 0 and 1 drew the weak clip 2
    mixed = torch.tensor([True, False, True, True])  # clip 1 was not mixed after all
    assert still_strong(strong, partner, mixed).tolist() == [False, True, False, True]


# --------------------------------------------------------------------------- training
def test_a_tiny_model_learns_when_the_tones_sound(trained, scapes):
    backbone, result, out = trained
    report = result.report
    assert report["strong"] is True and report["steps"] > 0
    for split in ("train", "val", "test"):
        r = report[split]
        assert set(r) >= {"files", "frame_loss", "segment_f1", "event_f1", "psds"}
        assert np.isfinite(r["frame_loss"])
    data = read_strong_tsv(scapes)
    untrained = prepare_model(backbone, data.classes, True, FinetuneConfig(seed=0))
    untrained.label_dict = dict(enumerate(data.classes))
    before = evaluate_detection(untrained, data)
    after = evaluate_detection(result.model, data)
    assert after["frame_loss"] < 0.5 * before["frame_loss"]
    assert after["segment_f1"]["f1"] > 0.7 > before["segment_f1"]["f1"]
    # the checkpoint is a standard fine-tuned model with the classes' names
    model = BEATs.from_pretrained(out / "model")
    assert model.label_dict == {0: "beep", 1: "chirp"}
    assert model.cfg.predictor_activation == "sigmoid"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_segment_f1" in m for m in metrics)


def test_report_scores_equal_sed_eval_on_the_events_beats_detect_writes(trained, scapes,
                                                                         tmp_path, capsys):
    sed_eval = pytest.importorskip("sed_eval")
    dcase_util = pytest.importorskip("dcase_util")
    _, result, out = trained
    data = read_strong_tsv(scapes)
    _, _, test = split_by_file(data, val_fraction=0.15, test_fraction=0.2, seed=0)
    assert len(test) == result.report["test_clips"] > 0
    files = [str(data.sources[r]) for r in test]
    assert main(["detect", *files, "-o", str(tmp_path / "det"), "-m",
                 str(out / "model")]) == 0
    rows = (tmp_path / "det" / "events.tsv").read_text().splitlines()[1:]
    estimated = {}
    for row in rows:
        name, onset, offset, label, _ = row.split("\t")
        estimated.setdefault(name, []).append((float(onset), float(offset), label))
    segment = sed_eval.sound_event.SegmentBasedMetrics(list(CLASSES), time_resolution=1.0)
    event = sed_eval.sound_event.EventBasedMetrics(list(CLASSES), t_collar=0.2,
                                                   percentage_of_length=0.2)
    for metric in (segment, event):
        metric.empty_system_output_handling = "zero_score"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in test:
            name = data.sources[r].name
            duration = sf.info(data.sources[r]).duration

            def container(events, name=name):
                return dcase_util.containers.MetaDataContainer(
                    [{"filename": name, "onset": a, "offset": b, "event_label": c}
                     for a, b, c in events])
            reference = [(e.onset, e.offset, e.label) for e in data.events[r]]
            # sed_eval sizes the segments from the events; the report from the file
            # (the two agree when an event or a detection reaches the last second)
            segment.evaluate(container(reference), container(estimated.get(name, [])),
                             evaluated_length_seconds=duration)
            event.evaluate(container(reference), container(estimated.get(name, [])))
    for key, metric in (("segment_f1", segment), ("event_f1", event)):
        ours = result.report["test"][key]
        overall = metric.results_overall_metrics()["f_measure"]
        average = metric.results_class_wise_average_metrics()["f_measure"]
        np.testing.assert_allclose([ours["f1"], ours["macro_f1"]],
                                   [overall["f_measure"], average["f_measure"]], atol=1e-12)


def test_weak_clips_add_to_training_and_bad_audio_fails_alone(scapes, tmp_path, capsys):
    folder = tmp_path / "weak"
    folder.mkdir()
    rng = np.random.default_rng(5)
    lines = ["path,label"]
    for i in range(4):
        wav = 0.02 * rng.standard_normal(3 * RATE)
        wav[RATE : 2 * RATE] += tone(1.0, CLASSES[i % 2], rng)
        sf.write(folder / f"w{i}.wav", wav.astype(np.float32), RATE)
        lines.append(f"w{i}.wav,{CLASSES[i % 2]}")
    (folder / "weak.csv").write_text("\n".join(lines) + "\n")
    table = tmp_path / "with_bad.tsv"
    (tmp_path / "broken.wav").write_bytes(b"RIFF but not audio at all")
    rows = scapes.read_text().splitlines()
    table.write_text("\n".join([rows[0], *[
        f"{scapes.parent / r.split(chr(9))[0]}\t" + "\t".join(r.split("\t")[1:])
        for r in rows[1:]], "broken.wav\t\t\t"]) + "\n")
    out = tmp_path / "out"
    code = main(["finetune", str(table), "--strong", "--weak", str(folder / "weak.csv"),
                 "-o", str(out), "-m", str(_tiny(tmp_path)), "--epochs", "1",
                 "--batch-size", "8", "--crop", "2", "--workers", "0", "--mixup", "0.5",
                 "--roll", "--balanced"])  # every augmentation on strong and weak clips
    err = capsys.readouterr().err
    assert code == 1, err  # done, one file skipped
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert [f["key"] for f in failed] == ["broken.wav"] and failed[0]["status"] == "failed"
    report = json.loads((out / "report.json").read_text())
    assert report["weak_clips"] == 4 and report["train_clips"] + report["val_clips"] + \
        report["test_clips"] == 30
    assert "segment F1" in err and (out / "model" / "model.safetensors").exists()


def _tiny(tmp_path):
    torch.manual_seed(0)
    return BEATs(tiny_config()).save_pretrained(tmp_path / "tiny")


@pytest.mark.parametrize("rows, why", [
    (["a.wav\t2.0\t1.0\tbeep"], "onset after offset: row(s) 2"),
    (["a.wav\t0.5\t1.0\tbeep", "missing.wav\t0.1\t0.2\tbeep", "a.wav\t-1\t0.2\tchirp"],
     "file not found: row(s) 3; negative times: row(s) 4"),
    (["a.wav\t1.0\t9.0\tbeep"], "event ending after its file: row(s) 2"),
])
def test_bad_annotation_rows_are_refused_with_their_numbers(rows, why, tmp_path, capsys):
    sf.write(tmp_path / "a.wav", np.zeros(3 * RATE, dtype=np.float32), RATE)
    table = tmp_path / "bad.tsv"
    table.write_text("\n".join(["filename\tonset\toffset\tevent_label", *rows]) + "\n")
    code = main(["finetune", str(table), "--strong", "-o", str(tmp_path / "out"), "-m",
                 str(tmp_path / "no-model-needed")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and why in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "state").exists()


def test_strong_needs_event_times_and_weak_needs_strong(tmp_path, capsys, sound_classes_dir):
    code = main(["finetune", str(sound_classes_dir), "--strong", "-o", str(tmp_path / "a"),
                 "-m", str(_tiny(tmp_path))])
    err = capsys.readouterr().err
    assert code == 2 and "strong-label TSV" in err
    code = main(["finetune", str(sound_classes_dir), "--weak", str(sound_classes_dir), "-o",
                 str(tmp_path / "b"), "-m", str(tmp_path / "tiny")])
    assert code == 2 and "--weak adds clip-labelled clips" in capsys.readouterr().err
