"""`beats probe` end to end: real audio from espeak-ng and sox, a tiny random backbone."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from beats import BEATs
from beats.probe import metrics, read_csv, read_labelled_set, stratified_split

from .audio_files import needs_espeak, needs_sox
from .conftest import tiny_config
from .test_extract import beats_cli


@pytest.fixture(scope="module")
def dataset(sound_classes_dir):
    """3 classes x 20 clips of 0.6 - 3 s: speech, tones/chords, coloured noise."""
    return sound_classes_dir


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    model = BEATs(tiny_config())
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save({"cfg": model.cfg.to_dict(), "model": model.state_dict()}, path)
    return str(path)


@needs_sox
@needs_espeak
@pytest.mark.slow
def test_probe_from_audio_scores_and_equals_probe_from_cache(dataset, tiny_model, tmp_path):
    audio_out = tmp_path / "from_audio"
    proc = beats_cli("probe", str(dataset), "-o", str(audio_out), "-m", tiny_model, "-q",
                     "--test-fraction", "0.25")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((audio_out / "report.json").read_text())
    assert report["test_clips"] == 15 and report["clips"] == 60
    assert report["test"]["accuracy"] >= 0.9, report
    assert report["test"]["macro_f1"] >= 0.85, report

    cache = tmp_path / "emb"
    beats_cli("extract", str(dataset), "-o", str(cache), "-m", tiny_model, "-q", check=True)
    cached_out = tmp_path / "from_cache"
    proc = beats_cli("probe", str(dataset), "-o", str(cached_out), "--embeddings", str(cache),
                     "-q", "--test-fraction", "0.25")
    assert proc.returncode == 0, proc.stderr
    a = load_file(audio_out / "head.safetensors")
    b = load_file(cached_out / "head.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert json.loads((cached_out / "report.json").read_text())["test"] == report["test"]

    clips = [str(dataset / "speech" / "s03.wav"), str(dataset / "noise" / "n04.wav")]
    pred = beats_cli("probe", "--predict", str(audio_out), *clips, "--json", "-m", tiny_model)
    assert pred.returncode == 0, pred.stderr
    lines = [json.loads(line) for line in pred.stdout.splitlines()]
    assert [line["labels"][0][0] for line in lines] == ["speech", "noise"]
    assert abs(sum(p for _, p in lines[0]["labels"]) - 1.0) < 1e-4  # 3 classes, top 3


@needs_sox
@needs_espeak
@pytest.mark.slow
def test_attentive_probe_with_folds(dataset, tiny_model, tmp_path):
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "fold"])
        for c in ("speech", "tonal", "noise"):
            for i, p in enumerate(sorted((dataset / c).glob("*.wav"))):
                w.writerow([p, c, str(i % 4)])
    out = tmp_path / "att"
    proc = beats_cli("probe", str(table), "-o", str(out), "-m", tiny_model, "--kind", "attentive",
                     "--test-fold", "3", "--val-fold", "2", "--cv", "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["test_clips"] == 15 and report["val_clips"] == 15
    assert set(report["cv"]["folds"]) == {"0", "1", "2", "3"}
    assert report["test"]["accuracy"] >= 0.9, report
    meta = json.loads((out / "head.json").read_text())
    assert meta["kind"] == "attentive" and meta["embedding"]["time_pooling"] == "none"


def test_metrics_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 2.0]])
    m = metrics(logits, torch.tensor([0, 1, 1, 1]), multilabel=False)
    assert m["accuracy"] == 0.75
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 2 fp 0 fn 1 -> 4/5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.1, 0.9]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # class 0 ranking: +,-,+ -> AP (1 + 2/3) / 2; class 1: +,+,- -> 1
    expected = ((1 + 2 / 3) / 2 + 1) / 2
    assert metrics(scores, targets, multilabel=True)["mAP"] == pytest.approx(expected)


def test_csv_multilabel_and_errors(tmp_path):
    table = tmp_path / "l.csv"
    table.write_text("path,label\na.wav,dog;bark\nb.wav,cat\n")
    ds = read_csv(table)
    assert ds.multilabel and ds.classes == ["bark", "cat", "dog"]
    assert ds.targets().tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    (tmp_path / "bad.csv").write_text("file,class\na.wav,x\n")
    with pytest.raises(ValueError, match="path,label"):
        read_csv(tmp_path / "bad.csv")
    (tmp_path / "one.csv").write_text("path,label\na.wav,x\nb.wav,x\n")
    with pytest.raises(ValueError, match="at least 2 classes"):
        read_labelled_set(tmp_path / "one.csv")


def test_stratified_split_keeps_every_class():
    labels = [("a",)] * 10 + [("b",)] * 5
    kept, held = stratified_split(labels, list(range(15)), 0.2, seed=0)
    assert sorted(kept + held) == list(range(15))
    assert sum(labels[r] == ("a",) for r in held) == 2
    assert sum(labels[r] == ("b",) for r in held) == 1


def test_bad_files_are_skipped_and_a_used_folder_is_refused_unless_forced(
        dataset, tiny_model, tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    from beats.cli import main

    nan = tmp_path / "nan.wav"
    sf.write(str(nan), np.full(8000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    rows = [f"{p},{c}" for c in ("speech", "tonal", "noise")
            for p in sorted((dataset / c).glob("*.wav"))[:4]]
    rows += [f"{nan},noise", f"{tmp_path / 'gone.wav'},speech"]
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n" + "".join(f"{r}\n" for r in rows))
    out = tmp_path / "out"
    args = ["probe", str(table), "-o", str(out), "-m", tiny_model, "-j", "0", "-q",
            "--epochs", "5", "--test-fraction", "0.25"]
    capsys.readouterr()
    assert main(args) == 1  # the job completed, two inputs skipped
    err = capsys.readouterr().err
    assert f"2 file(s) could not be embedded and were skipped (see {out / 'failed.jsonl'})" in err
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in failed) == ["gone.wav", "nan.wav"]
    assert all(r["status"] == "failed" and r["error"] for r in failed)
    report = json.loads((out / "report.json").read_text())
    assert report["clips"] == 12 and len(report["failed_files"]) == 2
    assert report["train_clips"] + report["val_clips"] + report["test_clips"] == 12

    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main([*args, "--kind", "attentive"]) == 2  # the folder holds a probe
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a probe" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first
    assert main([*args, "--kind", "attentive", "--force"]) == 1
    meta = json.loads((out / "head.json").read_text())
    assert meta["kind"] == "attentive" and meta["embedding"]["time_pooling"] == "none"
    assert len((out / "failed.jsonl").read_text().splitlines()) == 2  # this run's, not both


def test_fractions_are_checked_as_options(tmp_path, capsys):
    from beats.cli import main

    for option in ("--val-fraction", "--test-fraction"):
        with pytest.raises(SystemExit) as e:
            main(["probe", str(tmp_path), "-o", str(tmp_path / "o"), option, "1.5"])
        err = capsys.readouterr().err
        assert e.value.code == 2
        assert f"argument {option}: must lie in [0, 1) (a share of the files), got 1.5" in err
