"""benchmarks/gpu_check.py stays runnable: its CPU smoke run gives the whole table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

# Rows that need CUDA: on CPU they are reported as skipped, with the reason.
QUICK_ONLY = {("inference", "compiled bfloat16")}  # skipped by --quick, with its reason
CUDA_ONLY = {
    ("parity", "float32, cuDNN TF32 off"),
    ("inference", "eager float16"),
    ("inference", "compiled float16"),
    ("training", "fit fine-tune in a 1-process NCCL group"),
    ("training", "FSDP2 step, 1-process NCCL group"),
}
MEASURED = {
    ("parity", "float32 vs reference vectors"),
    ("parity", "float32 fine-tuned probabilities"),
    ("parity", "float32 padded batch = clips alone"),
    ("parity", "bfloat16 vs reference vectors"),
    ("parity", "bfloat16 padded batch = clips alone"),
    ("parity", "float16 vs reference vectors"),
    ("parity", "float16 padded batch = clips alone"),
    ("inference", "original float32 (baseline)"),
    ("inference", "eager float32"),
    ("inference", "eager bfloat16"),
    ("inference", "compiled float32"),
    ("extract", "decoding only, 1 worker"),
    ("extract", "embedding only, batch 4"),
    ("extract", "writing outputs only"),
    ("extract", "extract, batch 4, 1 worker"),
    ("training", "original float32 forward/backward"),
    ("training", "original bfloat16 autocast forward/backward"),
    ("training", "fit fine-tune bfloat16"),
    ("training", "fit pre-train bfloat16"),
    ("training", "fit fine-tune in a 1-process GLOO group"),
    ("training", "FSDP2 step, 1-process GLOO group"),
    ("float16", "float16 autocast vs reference vectors"),
    ("float16", "float16 training, tiny model, loss scaling"),
}


def run_script(tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp / "table.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BEATS_CACHE": str(tmp / "cache")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick",
                           "--json", str(out), *extra], capture_output=True, text=True,
                          env=env, cwd=tmp, timeout=600)
    assert out.exists(), proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return run_script(tmp_path_factory.mktemp("gpu-check"))


def test_every_row_is_there_measured_or_skipped_with_its_reason(quick_run):
    proc, table = quick_run
    rows = {(r["section"], r["name"]): r for r in table["rows"]}
    expected = CUDA_ONLY | QUICK_ONLY | MEASURED
    assert set(rows) == expected, sorted(set(rows) ^ expected)
    errors = [(k, r["notes"]) for k, r in rows.items() if r["status"] == "error"]
    assert not errors, errors
    for key in CUDA_ONLY:
        assert rows[key]["status"] == "skip" and "needs CUDA" in rows[key]["notes"], key
    for key in QUICK_ONLY:
        assert rows[key]["status"] == "skip" and "--quick" in rows[key]["notes"], key
    for key in MEASURED:
        value = rows[key]["value"]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, key
    assert table["meta"]["device"] == "cpu" and table["meta"]["quick"] is True
    assert table["meta"]["not_measured"] == {"peak_gpu_mib": "needs CUDA"}
    assert all(r["peak_gpu_mib"] is None for r in table["rows"])
    # the table on stdout has one line per row, and the exit code follows the statuses
    lines = [x for x in proc.stdout.splitlines() if x.startswith("| ")]
    assert len(lines) == 1 + len(table["rows"])
    for r in table["rows"]:
        assert any(f"| {r['section']} | {r['name']} | " in x for x in lines), r["name"]
    failed = any(r["status"] in ("fail", "error") for r in table["rows"])
    assert proc.returncode == (1 if failed else 0), proc.stderr[-3000:]


def test_bounds_are_judged_on_real_numbers(quick_run):
    _, table = quick_run
    rows = {r["name"]: r for r in table["rows"]}
    exact = rows["float32 vs reference vectors"]
    assert exact["status"] == "pass" and exact["bound"] == "<= 0.0001"
    assert 0 < exact["value"] <= 1e-4
    assert rows["float32 padded batch = clips alone"]["value"] <= 1e-5
    # a float16 or bfloat16 row is judged on its cosine: pass exactly when >= 0.999
    for name in ("bfloat16 vs reference vectors", "float16 vs reference vectors",
                 "float16 autocast vs reference vectors"):
        row = rows[name]
        assert row["status"] == ("pass" if row["value"] >= 0.999 else "fail"), name
        assert -1.0 <= row["value"] <= 1.0 + 1e-6
    # float32 weights under float16 autocast stay finite and close (the filterbank
    # keeps float32); the float16 training ran every step without NaN
    assert rows["float16 autocast vs reference vectors"]["status"] == "pass"
    fp16 = rows["float16 training, tiny model, loss scaling"]
    assert fp16["status"] == "pass" and fp16["value"] == 6
    assert all(math.isfinite(x) for x in fp16["data"]["losses"])


def test_inference_rows_name_the_attention_kernel(quick_run):
    _, table = quick_run
    rows = {r["name"]: r for r in table["rows"]}
    assert rows["original float32 (baseline)"]["ratio"] == 1.0
    assert rows["original float32 (baseline)"]["data"]["sdpa"].startswith("none: explicit bmm")
    eager = rows["eager float32"]
    assert not eager["data"]["sdpa"].startswith("none")  # an SDPA backend was seen
    assert eager["data"]["min_cosine"] > 0.9999 and eager["data"]["max_diff"] < 1e-4
    assert eager["ratio"] == pytest.approx(
        rows["original float32 (baseline)"]["data"]["seconds"] / eager["data"]["seconds"])
    # bfloat16 on the CPU without autograd: the automatic choice runs its own batched
    # products (by_clip), except on CPUs with AMX, where SDPA's kernel is the faster
    cpuinfo = Path("/proc/cpuinfo")
    amx = "amx_tile" in cpuinfo.read_text() if cpuinfo.exists() else False
    bf16 = rows["eager bfloat16"]["data"]["sdpa"]
    assert bf16.startswith("flash (CPU)" if amx else "none: batched products"), bf16
    assert "eager backend" in rows["compiled float32"]["notes"]


def test_extract_and_training_rows(quick_run):
    _, table = quick_run
    rows = {r["name"]: r for r in table["rows"]}
    run = rows["extract, batch 4, 1 worker"]
    assert run["status"] == "pass" and run["data"]["ok"] == 8 and run["data"]["failed"] == 0
    assert run["data"]["bottleneck"] in run["data"]["stages_audio_per_s"]
    assert run["data"]["gpu_busy_percent"] is None and "needs CUDA" in run["notes"]
    group = rows["fit fine-tune in a 1-process GLOO group"]
    assert group["status"] == "pass" and group["data"]["all_reduce_seconds"] > 0
    fsdp = rows["FSDP2 step, 1-process GLOO group"]
    assert fsdp["status"] == "pass" and fsdp["data"]["moved"] > 0
    assert len(fsdp["data"]["losses"]) == 2


def test_no_time_left_skips_every_check_and_says_so(tmp_path, capsys):
    from benchmarks import gpu_check

    out = tmp_path / "table.json"
    code = gpu_check.main(["--device", "cpu", "--quick", "--budget", "0", "--json", str(out)])
    table = json.loads(out.read_text())
    assert code == 0 and "| section | check | value |" in capsys.readouterr().out
    assert {r["section"] for r in table["rows"]} == {"parity", "inference", "extract",
                                                     "training", "float16"}
    for r in table["rows"]:
        assert r["status"] == "skip" and r["notes"].startswith("time budget"), r


def test_only_runs_the_parts_named(tmp_path):
    from benchmarks import gpu_check

    out = tmp_path / "table.json"
    code = gpu_check.main(["--device", "cpu", "--quick", "--budget", "0", "--only",
                           "extract,compile", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert code == 0
    assert [(r["section"], r["name"]) for r in rows] == [("extract", "extract"),
                                                         ("inference", "compiled inference")]
