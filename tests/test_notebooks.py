"""The notebooks run top to bottom, offline, and are committed without outputs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb",
                                           "02_frozen_backbone_classifier.ipynb",
                                           "03_finetune.ipynb", "04_pretrain.ipynb",
                                           "05_tokenizer.ipynb", "06_detect.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name


# Appended to a notebook before it runs, to measure its figures: the hidden-state curves
# of the quickstart must have no offset on their axes (with the random demo model they are
# nearly flat, and matplotlib would label them "+2.7712e1"); the confusion matrix's numbers
# must contrast with their cells (WCAG contrast ratio) and be large enough to read.
CHECKS = {
    "01_quickstart.ipynb": """
print("OFFSETS", repr([a.yaxis.get_major_formatter().get_offset() for a in axes]))
""",
    "02_frozen_backbone_classifier.ipynb": """
import matplotlib.colors as _mc

def _luminance(colour):
    rgb = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in _mc.to_rgb(colour)]
    return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]

_image = ax.images[0]
_ratios = []
for _t in ax.texts:
    _j, _i = _t.get_position()
    _cell = _image.cmap(_image.norm(_image.get_array()[round(_i), round(_j)]))
    _dark, _light = sorted([_luminance(_cell), _luminance(_t.get_color())])
    _ratios.append((_light + 0.05) / (_dark + 0.05))
print("CONTRAST", min(_ratios), "FONTSIZE", min(_t.get_fontsize() for _t in ax.texts))
""",
}
CHECKS["03_finetune.ipynb"] = CHECKS["02_frozen_backbone_classifier.ipynb"]
CHECKS["05_tokenizer.ipynb"] = """
print("STAGES", result.ran, "ROWS", len(result.rows))
print("TOKENS", array.shape[1], array.dtype)
print("OFFSETS", repr([a.yaxis.get_major_formatter().get_offset() for a in [*health, *axes]]))
print("LABELLED", [len(a.texts) == a.images[0].get_array().size > 0 for a in axes[1:]])
"""
# The detection figure: the heatmap holds (classes, steps) scores with one box per detected
# event and one bar per annotated one, and its three panels share the time axis.
CHECKS["06_detect.ipynb"] = """
print("HEATMAP", axes[1].images[0].get_array().shape, "BOXES", len(axes[1].patches) == len(events),
      "BARS", len(axes[1].lines) == len(reference) > 0,
      "XLIM", sorted({tuple(round(float(x), 2) for x in a.get_xlim()) for a in axes}))
"""
CHECKS["04_pretrain.ipynb"] = """
print("CURVES", [len(a.lines) for a in axes], "STEPS", [x["step"] for x in val])
"""


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("sox") and shutil.which("espeak-ng")),
                    reason="the notebooks make audio with sox and espeak-ng")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_offline(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BEATS_CACHE", str(tmp_path / "cache"))  # nothing cached: demo models
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[path.name]))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    # tqdm.auto without ipywidgets warns "IProgress not found" and draws no bar
    assert "IProgress" not in text and "TqdmWarning" not in text
    if "quickstart" in path.name:
        assert "OFFSETS ['', '', '']" in text
    elif "tokenizer" in path.name:  # three stages ran; (T, 8) int64 tokens from the CLI
        assert "STAGES ['iter1/pretrain', 'iter2/distill', 'iter2/pretrain'] ROWS 2" in text
        assert "TOKENS 8 int64" in text
        # no offset on any axis; every patch of both token panels shows its label's number
        assert "OFFSETS ['', '', '', '', '', '']" in text and "LABELLED [True, True]" in text
    elif "pretrain" in path.name:  # loss; training, held-out and most-frequent accuracy
        assert "CURVES [1, 3] STEPS [20, 40, 60]" in text
    elif "detect" in path.name:  # 60 s: 374 steps of 3 classes; the metrics of the events
        assert "HEATMAP (3, 374) BOXES True BARS True XLIM [(0.0, 60.0)]" in text
        assert "held-out (60 clips): segment F1 " in text
        assert "labels: ['beep', 'buzz', 'chirp']" in text
        for metric in ("segment F1", "event F1", "PSDS"):
            value = float(re.search(rf"^{metric} +(\S+)", text, flags=re.M).group(1))
            assert 0.0 <= value <= 1.0, metric
    else:
        contrast, size = re.search(r"CONTRAST (\S+) FONTSIZE (\S+)", text).groups()
        assert float(contrast) >= 4.5 and float(size) >= 12
    if not ("pretrain" in path.name or "tokenizer" in path.name):  # 04, 05 train their own
        assert "RANDOM DEMO MODEL" in text
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    figures = {"01_quickstart.ipynb": 2, "03_finetune.ipynb": 2, "05_tokenizer.ipynb": 2}
    assert images == figures.get(path.name, 1)  # every figure drawn
    if "classifier" in path.name:
        assert "held-out: {'accuracy'" in text
    if "pretrain" in path.name:
        assert "held-out masked accuracy" in text and "'model'" in text and "'tokenizer'" in text
        assert "linear probe, before" in text and "linear probe, after" in text
    if "finetune" in path.name:
        assert "held-out accuracy" in text and "labels: ['noise', 'speech', 'tonal']" in text
