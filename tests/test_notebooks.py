"""The notebooks run top to bottom, offline, and are committed without outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb",
                                           "02_frozen_backbone_classifier.ipynb",
                                           "03_finetune.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("sox") and shutil.which("espeak-ng")),
                    reason="the notebooks make audio with sox and espeak-ng")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_offline(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BEATS_CACHE", str(tmp_path / "cache"))  # nothing cached: demo models
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "RANDOM DEMO MODEL" in text
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    figures = {"01_quickstart.ipynb": 2, "03_finetune.ipynb": 2}
    assert images == figures.get(path.name, 1)  # every figure drawn
    if "classifier" in path.name:
        assert "held-out: {'accuracy'" in text
    if "finetune" in path.name:
        assert "held-out accuracy" in text and "labels: ['noise', 'speech', 'tonal']" in text
