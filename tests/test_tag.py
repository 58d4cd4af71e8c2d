"""`beats tag`: top AudioSet labels per file with a fine-tuned checkpoint."""

from __future__ import annotations

import json

from beats import BEATs
from beats.audio import load_audio

from .audio_files import sf_write
from .conftest import REFERENCE
from .test_extract import beats_cli

FINETUNED = str(REFERENCE / "finetuned.pt")


def test_tag_json_equals_predict_labels(tmp_path):
    for i, seconds in enumerate((1.0, 2.5)):
        sf_write(tmp_path / f"c{i}.wav", seconds=seconds, rate=44100, seed=i)
    (tmp_path / "broken.wav").write_text("nope")
    proc = beats_cli("tag", str(tmp_path), "-m", FINETUNED, "-k", "3", "--json")
    assert proc.returncode == 1  # one input failed
    lines = {json.loads(line)["path"].rsplit("/", 1)[-1]: json.loads(line)
             for line in proc.stdout.splitlines()}
    assert "not a valid WAV" in lines["broken.wav"]["error"]
    model = BEATs.from_pretrained(FINETUNED)
    for i in range(2):
        wav, _ = load_audio(tmp_path / f"c{i}.wav")
        want = model.predict_labels(wav, top_k=3)[0]
        got = lines[f"c{i}.wav"]["labels"]
        assert [n for n, _ in got] == [n for n, _ in want]
        assert all(abs(p - q) < 1e-5 for (_, p), (_, q) in zip(got, want, strict=True))
        assert set(n for n, _ in got) <= set(model.labels)


def test_tag_table_and_encoder_only_model(tmp_path):
    sf_write(tmp_path / "a.wav", seconds=1.0)
    table = beats_cli("tag", str(tmp_path / "a.wav"), "-m", FINETUNED, "-k", "2")
    assert table.returncode == 0, table.stderr
    path, first, second = table.stdout.strip().split("\t")
    assert path.endswith("a.wav") and first.endswith(")") and second.endswith(")")
    encoder = beats_cli("tag", str(tmp_path / "a.wav"), "-m", str(REFERENCE / "postnorm_gru.pt"))
    assert encoder.returncode == 2 and "fine-tuned" in encoder.stderr
