"""The README's install instructions: the two opening commands, and how to keep pip from
pulling the 5.8 GB CUDA build of torch on a machine that has no GPU."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _bash_blocks(text: str) -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [[line.split("#")[0].strip() for line in b.splitlines() if line.strip()]
            for b in blocks]


def test_the_opening_commands_install_embed_and_test():
    first = _bash_blocks(README)[0]
    assert first == ["pip install -e '.[dev]' && beats extract my_audio/ -o embeddings/",
                     "python -m pytest"]


def test_readme_says_how_to_get_the_cpu_build_first_and_what_gpu_users_do():
    assert "PyTorch stays the build you have" not in README  # not true of a fresh venv
    install = next(b for b in _bash_blocks(README) if any("download.pytorch.org" in l for l in b))
    assert install == ["pip install torch --index-url https://download.pytorch.org/whl/cpu",
                       "pip install -e '.[dev]'"]
    section = README[README.index("**PyTorch**"):README.index("## Python")]
    assert "CUDA build" in section and "With an NVIDIA GPU" in section


def test_ci_installs_torch_before_the_package():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    torch_line = next(i for i, line in enumerate(lines)
                      if re.match(r"python -m pip install --quiet torch==\d", line))
    package_line = next(i for i, line in enumerate(lines) if "-e '.[dev]'" in line)
    assert torch_line < package_line
