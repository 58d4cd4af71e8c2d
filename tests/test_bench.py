"""The benchmark cannot rot: its baseline is the original computation, and it runs."""

from __future__ import annotations

import pytest

from beats import BEATsConfig
from beats.attention import cpu_has_amx
from benchmarks import bench
from benchmarks.original import OriginalBEATs

from .conftest import ENCODER_CASES, NUM_WAVES, reference_model


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_baseline_reproduces_the_reference_vectors(case, waves, expected):
    """benchmarks/original.py is faithful: it meets the README tolerance on every stage."""
    baseline = OriginalBEATs(reference_model(case))
    ref = expected[case]
    for i in range(NUM_WAVES):
        features, hidden = baseline(waves[f"wav.{i}"].unsqueeze(0))
        for j, h in enumerate(hidden):
            assert (h[0] - ref[f"hidden.{i}.{j}"]).abs().max() <= 1e-4, (i, j)
        if f"features.{i}" in ref:
            assert (features[0] - ref[f"features.{i}"]).abs().max() <= 1e-4


def test_flop_count_of_the_base_model():
    cfg = BEATsConfig(**bench.BASE)
    # 10 s clip: 998 frames, 62 steps, S = 496. Hand count of the docstring's formula:
    # patch 130023424 + projection 390070272 + positional conv 4680843264
    # + 12 x (2340421632 + 4680843264 + 755761152 + 6094848)
    assert bench.model_flops(cfg, 496) == 98_598_387_712


def test_quick_run_prints_the_table(capsys):
    rows = bench.main(["--quick", "--long-minutes", "0.2", "--attn", "by_clip"])
    text = capsys.readouterr().out
    assert "| path | audio s/s | GFLOP/s |" in text and "long audio" in text
    by_path = {r["path"]: r for r in rows}
    assert set(by_path) == {"baseline", "fast-fp32", "fast-bf16", "fast-fp32:by_clip",
                            "fast-bf16:by_clip", "windowed"}
    assert by_path["fast-fp32"]["max_diff"] <= 1e-4
    assert by_path["fast-fp32:by_clip"]["max_diff"] <= 1e-4
    assert by_path["fast-bf16"]["min_cos"] >= 0.999
    assert by_path["fast-bf16:by_clip"]["min_cos"] >= 0.999
    assert by_path["fast-fp32"]["attention"] == "sdpa"
    assert by_path["fast-bf16:by_clip"]["attention"] == "by_clip"
    # auto: SDPA, except bfloat16 inference on a CPU without AMX, where by_clip is faster
    assert by_path["fast-bf16"]["attention"] == ("sdpa" if cpu_has_amx() else "by_clip")
    assert "| fast-bf16:by_clip |" in text
    assert text.count("| by_clip |") == 2 + (not cpu_has_amx())
    assert all(r["audio_per_s"] > 0 for r in rows)


def test_pretrain_step_flops_of_the_base_preset():
    from beats.train.ssl import SSLConfig
    from benchmarks.pretrain_bench import step_flops

    cfg = SSLConfig.preset("base")
    # Hand count, 10 s clip (496 patches, 124 kept): front 520093696 + positional conv
    # 2*124*768*48*128 = 1170210816 + 12 encoder layers on 124 = 21648900096 + 3 predictor
    # layers on 496 = 23349362688 + projection and head 2*496*768*(768+1024) = 1365245952
    assert step_flops(cfg, 496, 124) == 48_053_813_248
    assert step_flops(cfg, 496, 496) == 123_312_996_352


def test_quick_pretrain_bench_prints_the_table(capsys):
    from benchmarks import pretrain_bench

    rows = pretrain_bench.main(["--quick", "--positions", "true", "--no-bf16"])
    text = capsys.readouterr().out
    assert "| path | audio s/s | step s | vs full |" in text and "load average" in text
    assert [r["path"] for r in rows] == ["full", "masked-true"]
    assert all(r["audio_per_s"] > 0 for r in rows)


def test_training_benchmark_quick_run(capsys):
    from benchmarks import train_bench

    rows = train_bench.main(["--quick"])
    text = capsys.readouterr().out
    assert "| path | audio s/s | s per step |" in text
    assert [r["path"] for r in rows] == ["baseline", "fit-fp32", "fit-bf16"]
    assert all(r["audio_per_s"] > 0 and r["peak_mib"] > 0 for r in rows)
