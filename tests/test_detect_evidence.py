"""The detection evidence runs end to end: three trainings scored on held-out soundscapes."""

from __future__ import annotations

import json
import math

from benchmarks import detect_evidence


def test_quick_run_prints_the_table_and_writes_the_json(tmp_path, capsys):
    result = detect_evidence.main(["--quick", "--json", str(tmp_path / "evidence.json")])
    text = capsys.readouterr().out
    assert text.startswith("CPU: ") and "torch 2." in text and "wall time" in text
    assert "data (seed, clips, events): train 1, 12, " in text and "test 3, 6, " in text
    header = "| model | segment F1 macro | segment F1 micro | event F1 macro | event F1 micro |"
    assert header in text and "target (strong: segment F1 >= 0.8" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "model" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| strong labels", "| weak labels (whole clips)", "| no fine-tuning (random head)"]
    for row in rows:  # five figures, each a probability
        figures = [float(x) for x in row.split(" | ")[1:6]]
        assert all(0.0 <= x <= 1.0 for x in figures), row
        assert "threshold " in row and "median 0.5 s" in row

    written = json.loads((tmp_path / "evidence.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["splits"]["train"]["clips"] == 12 and written["splits"]["val"]["clips"] == 4
    assert written["splits"]["test"]["clips"] == 6 and written["data_seeds"] == {
        "train": 1, "val": 2, "test": 3}
    assert set(written["machine"]) == {"cpu", "torch", "commit", "load_before", "load_after"}
    assert isinstance(written["target_met"], bool) and written["table"] in text
    (run,) = written["runs"]
    assert set(run) == {"strong", "weak", "none"}
    for method, scores in run.items():
        assert scores["files"] == 6, method
        for metric in ("segment_f1", "event_f1"):
            for key in ("f1", "macro_f1", "precision", "recall"):
                x = scores[metric][key]
                assert x is None or (math.isfinite(x) and 0.0 <= x <= 1.0), (method, metric)
        assert 0.0 <= scores["psds"] <= 1.0 and scores["psds_classes"]
        assert scores["detect"]["median_filter"] == 0.5
        assert scores["detect"]["threshold"] in detect_evidence.THRESHOLDS
    assert run["none"]["seconds"] < run["strong"]["seconds"]
