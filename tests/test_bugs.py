"""A bug in beats is exit code 3 with its traceback in a file, never a setup error (exit 2)
nor a manifest of failed files without a reason's type. The bugs are planted in a real
process of the CLI (a subprocess), since the point is code that goes wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from beats.cli import main
from beats.errors import InputError
from beats.failures import ErrorLog
from beats.train.data import failure_entry
from beats.train.logs import write_failures

from .audio_files import sf_write
from .conftest import REFERENCE

ROOT = Path(__file__).resolve().parents[1]
TINY = str(REFERENCE / "postnorm_gru.pt")


def planted(code: str, argv: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``beats ARGV`` in a new process after ``code`` (which plants the bug)."""
    script = f"{code}\nfrom beats.cli import main\nraise SystemExit(main({argv!r}))\n"
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), **env})


def test_a_bug_in_a_core_function_is_exit_3_with_its_traceback_in_a_file(tmp_path):
    # BEATsConfig.from_dict fails as a bug would (a KeyError from deep inside)
    plant = ("import beats.config\n"
             "def broken(cls, cfg, **kw):\n"
             "    return {}['encoder_layers']\n"
             "beats.config.BEATsConfig.from_dict = classmethod(broken)")
    out = tmp_path / "converted"
    proc = planted(plant, ["convert", TINY, str(out)], tmp_path)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("beats convert: internal error: KeyError: 'encoder_layers': "
                               "this is a bug in beats; the traceback is in "), lines[0]
    # no output folder to hold it: a file of its own in TMPDIR/beats-errors/
    path = Path(lines[0].split("the traceback is in ")[1].split("; please report it")[0])
    assert path.parent == tmp_path / "beats-errors" and path.name.startswith("convert-")
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text
    assert "KeyError: 'encoder_layers'" in text and "convert" in text


def test_a_numpy_shape_error_inside_the_model_is_a_bug_not_bad_input(tmp_path):
    data = tmp_path / "data"
    for label, seed in (("a", 0), ("b", 10)):
        (data / label).mkdir(parents=True)
        for i in range(2):
            sf_write(data / label / f"{label}{i}.wav", seconds=1.0, seed=seed + i)
    # the model's forward meets a numpy shape mismatch, as a regression would
    plant = ("import numpy as np, beats.model\n"
             "forward = beats.model.BEATs.forward_fbank\n"
             "def broken(self, *a, **k):\n"
             "    np.zeros(3) + np.zeros(4)\n"
             "    return forward(self, *a, **k)\n"
             "beats.model.BEATs.forward_fbank = broken")
    out = tmp_path / "out"
    proc = planted(plant, ["finetune", str(data), "-o", str(out), "-m", TINY, "--steps", "1",
                           "--batch-size", "2", "--crop", "1", "-j", "0", "-q",
                           "--val-fraction", "0", "--test-fraction", "0"], tmp_path,
                   BEATS_DEBUG="1")
    assert proc.returncode == 3, proc.stderr  # not 2: a ValueError is not bad input
    assert "Traceback (most recent call last)" in proc.stderr  # BEATS_DEBUG=1 shows it
    line = proc.stderr.rstrip().splitlines()[-1]
    assert line.startswith("beats finetune: internal error: ValueError: operands could not "
                           "be broadcast"), line
    assert line.endswith(f"this is a bug in beats; the traceback is in {out / 'errors.log'}; "
                         "please report it")  # the run's folder holds it
    text = (out / "errors.log").read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text


def test_a_bug_on_one_file_is_recorded_with_its_type_and_traceback_and_the_run_goes_on(
        tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sf_write(src / "good.wav", seconds=1.0)
    sf_write(src / "odd.wav", seconds=1.5, seed=1)
    (src / "broken.wav").write_bytes(b"RIFF\x00\x00 not audio")
    # reading one of the files meets a bug (an IndexError where no index should fail)
    plant = ("import beats.reading\n"
             "check = beats.reading.check_samples\n"
             "def broken(wav):\n"
             "    if len(wav) == 24000:\n"
             "        return [][0]\n"
             "    return check(wav)\n"
             "beats.reading.check_samples = broken")
    out = tmp_path / "out"
    proc = planted(plant, ["extract", str(src), "-o", str(out), "-m", TINY, "-j", "0", "-q"],
                   tmp_path)
    assert proc.returncode == 1, proc.stderr  # the run completed, without odd.wav
    records = {json.loads(x)["key"]: json.loads(x)
               for x in (out / "manifest.jsonl").read_text().splitlines()}
    assert records["good.wav"]["status"] == "ok"
    assert records["odd.wav"]["error"].startswith(
        f"IndexError: {src / 'odd.wav'}: list index out of range")
    assert records["broken.wav"]["error"].startswith(
        f"AudioError: {src / 'broken.wav'}: not a valid WAV file")
    text = (out / "errors.log").read_text()  # the unexpected one only
    assert "in broken" in text and "IndexError" in text and "AudioError" not in text
    assert proc.stderr.strip() == (
        "beats extract: 1 input(s) failed with an unexpected error, probably a bug in beats: "
        f"the tracebacks are in {out / 'errors.log'}; please report them")
    assert np.load(out / "good.wav.npy").shape == (48,)


def test_bad_input_stays_exit_2_in_one_line(tmp_path, capsys):
    not_a_model = tmp_path / "model.pt"
    not_a_model.write_text("these are not weights")
    sf_write(tmp_path / "a.wav")
    code = main(["extract", str(tmp_path / "a.wav"), "-o", str(tmp_path / "out"), "-m",
                 str(not_a_model)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"beats extract: error: {not_a_model} is not a PyTorch checkpoint")


def test_training_failures_keep_their_type_and_unexpected_ones_their_traceback(tmp_path):
    try:
        {}["missing"]
    except KeyError as e:
        bug = failure_entry("a.wav", e)
    expected = failure_entry("b.wav", InputError("an empty array"))
    assert bug[:2] == ("a.wav", "KeyError: a.wav: 'missing'") and "Traceback" in bug[2]
    assert expected == ("b.wav", "InputError: b.wav: an empty array")
    errors = ErrorLog(tmp_path)
    write_failures(tmp_path / "failed.jsonl", errors, [bug, expected])
    rows = [json.loads(x) for x in (tmp_path / "failed.jsonl").read_text().splitlines()]
    assert [r["error"] for r in rows] == [bug[1], expected[1]]
    assert errors.count == 1 and "KeyError: 'missing'" in (tmp_path / "errors.log").read_text()
