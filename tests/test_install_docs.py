"""The README's opening: the two commands in its first screen (embed a folder with only
what embedding needs; the tests with the dev extra, exactly what CI runs), how to keep pip
from pulling the 5.8 GB CUDA build of torch on a machine without a GPU, and its size."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
EMBED = "pip install -e . && beats extract my_audio/ -o embeddings/"
TEST = "pip install -e '.[dev]' && python -m pytest"


def _bash_blocks(text: str) -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [[line.split("#")[0].strip() for line in b.splitlines() if line.strip()]
            for b in blocks]


def test_the_first_screen_has_the_embed_and_the_test_command():
    first_screen = "\n".join(README.splitlines()[:25])
    blocks = _bash_blocks(first_screen)
    assert blocks[:2] == [[EMBED], [TEST]]


def test_ci_runs_exactly_the_readmes_test_command():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST in lines
    assert lines[-1] == TEST  # the last thing CI does, so its exit code is CI's


def test_the_plain_install_holds_only_what_embedding_needs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    dev = {re.split(r"[<>=\[ ]", d)[0].lower()
           for d in project["optional-dependencies"]["dev"]}
    assert core == {"torch", "numpy", "safetensors", "huggingface_hub", "soundfile", "soxr",
                    "tqdm", "filelock"}
    assert {"pytest", "onnx", "matplotlib", "tensorboard", "mkdocs-material"} <= dev
    docs = {re.split(r"[<>=\[ ]", d)[0].lower()
            for d in project["optional-dependencies"]["docs"]}
    assert docs <= dev  # CI installs .[dev] and builds the site


def test_readme_says_how_to_get_the_cpu_build_first_and_what_gpu_users_do():
    install = next(b for b in _bash_blocks(README) if any("download.pytorch.org" in l for l in b))
    assert install == ["pip install torch --index-url https://download.pytorch.org/whl/cpu",
                       "pip install -e ."]
    section = README[README.index("**PyTorch**"):README.index("## Why beats")]
    assert "CUDA build" in section and "With an NVIDIA GPU" in section


def test_readme_is_short():
    assert len(README) <= 15_000


def test_ci_installs_torch_before_the_package():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    torch_line = next(i for i, line in enumerate(lines)
                      if re.match(r"python -m pip install --quiet torch==\d", line))
    assert torch_line < lines.index(TEST)
