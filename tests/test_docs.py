"""The documentation: the site builds with no broken link or reference, every code example
in README.md and docs/ runs, and every ``beats.*`` name the text mentions exists.

How examples run (a small runner of our own: pages mix Python and shell, and a page's
later blocks use the files its earlier blocks wrote, which per-block runners do not do):

- Each page runs in its own folder, its blocks in order. The folder starts with
  ``my_audio/`` (speech, tones and noise made with espeak-ng and sox) and ``sounds/`` (one
  subfolder per class); getting-started.md shows how to make such folders.
- ``python`` blocks run in this process, in one namespace per page (like a notebook).
  In ``bash`` blocks, a plain ``beats ARGS`` line runs through ``beats.cli.main`` in this
  process (the installed script's own function, without a new interpreter and torch
  import per command); every other line runs in bash (``set -euo pipefail``) with the
  installed ``beats`` on PATH. Other fences (``text``, ``json``, ...) show output or data
  and are not run.
- A block right after a ``<!-- skip: REASON -->`` line is not run; the reason is
  required (GPUs, many machines, the internet).
- ``pip install ...`` commands are not run: the tests run in the environment those
  commands make (.ci/run installs it; tests/test_install_docs.py checks that it runs the
  README's commands).
- Registered names (``BEATs_iter3_plus_AS2M``, the default tagger, the tokenizers) resolve
  through a registry (``BEATS_REGISTRY``, format 1) whose entries carry the real names and
  aliases but download tiny Microsoft-format checkpoints from a server on 127.0.0.1, so
  the examples go through the real download, verification and conversion.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .audio_files import HAVE_ESPEAK, HAVE_SOX, sound_classes, sox_tone, speech
from .conftest import REFERENCE
from .servers import FileServer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN = ("python", "bash")
SHOWN = ("text", "json", "bibtex", "toml")
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", flags=re.M | re.S)
SKIP = re.compile(r"^<!-- skip: (\S.*?) -->$")
PIP = re.compile(r"(^|&&|;)\s*pip install [^&;\n]*", flags=re.M)
# What each kind of registered checkpoint downloads in the examples.
TINY = {"pretrained": "postnorm_gru", "fine-tuned": "finetuned", "tokenizer": "tokenizer"}


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    skip: str | None


def pages() -> list[Path]:
    """README.md, then the docs' pages in the site's order, then any page not in the nav."""
    import yaml

    def walk(items) -> list[str]:
        out = []
        for item in items:
            value = item if isinstance(item, str) else next(iter(item.values()))
            out += walk(value) if isinstance(value, list) else [value]
        return out

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    ordered = [DOCS / p for p in walk(nav)]
    rest = sorted(set(DOCS.rglob("*.md")) - set(ordered))
    return [ROOT / "README.md", *ordered, *rest]


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        skip = SKIP.match(before[-1].strip()) if before else None
        found.append(Block(str(path.relative_to(ROOT)), text.count("\n", 0, match.start()) + 1,
                           match.group(1), match.group(2), skip.group(1) if skip else None))
    return found


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------- build
def test_site_builds_strict_with_every_reference_generated(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                          str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    html = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "crop_seconds" in html and "<!-- generated" not in html
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "extract_features" in api  # mkdocstrings rendered the docstrings


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_shows_every_option_and_config_field_with_its_default():
    hooks = _hooks()
    cli = hooks.cli_reference()
    for prog, parser in hooks._parsers():
        assert f"## `{prog}`" in cli
        for action in hooks.cli_actions(parser):
            for flag in action.option_strings:
                assert f"`{flag}" in cli, (prog, flag)
    assert "`--teacher TEACHER`" in cli and "(default: 0.0005)" in cli  # finetune --lr
    config = hooks.config_reference()
    for path in hooks.CONFIGS:
        cls = hooks.config_class(path)
        section = config.split(hooks.config_heading(path) + "\n", 1)[1].split("\n## ", 1)[0]
        for f, _, default, meaning in hooks.config_fields(cls):
            assert f"| `{f.name}` | " in section and default in section, (cls, f.name)
            assert meaning, f"{cls.__name__}.{f.name} has no description"
    row = next(line for line in config.splitlines() if line.startswith("| `crop_seconds`"))
    assert "`10.0`" in row and "crops" in row
    errors = hooks.errors_reference()
    for code in ("0", "1", "2", "3", "4", "130"):
        assert f"| `{code}` |" in errors
    assert "beats.errors.InputError" in errors and "beats.audio.AudioError" in errors


def test_docstring_attributes_are_read_per_field_and_from_base_classes():
    hooks = _hooks()
    from beats.train import FinetuneConfig

    fields = {f.name: f for f in __import__("dataclasses").fields(FinetuneConfig)}
    assert hooks.field_help(FinetuneConfig, fields["betas"]).startswith("AdamW's")  # shared
    assert "Beta(alpha, alpha)" in hooks.field_help(FinetuneConfig, fields["mixup_alpha"])
    assert "warm-up" in hooks.field_help(FinetuneConfig, fields["warmup_steps"])  # base's


# --------------------------------------------------------------------------- text
def test_every_fence_is_run_or_shown_and_every_skip_says_why():
    for page in pages():
        for b in blocks(page):
            assert b.lang in RUN + SHOWN, f"{b.page}:{b.line}: fence language {b.lang!r}"
        text = page.read_text()
        assert not re.search(r"^[ \t]+```", text, flags=re.M), f"{page}: indented fence"
        for line in text.splitlines():
            if line.startswith("<!-- skip"):
                match = SKIP.match(line.strip())
                assert match and len(match.group(1)) > 10, f"{page}: {line}"


_NAME = re.compile(r"(?<![\w./-])beats(?:\.[A-Za-z_]\w*)+")
_FILES = (".onnx", ".pt", ".pth", ".json", ".lock", ".safetensors", ".md", ".py", ".jsonl")


def test_every_beats_name_the_docs_mention_exists():
    names = set()
    for page in pages():
        names |= {n for n in _NAME.findall(page.read_text()) if not n.endswith(_FILES)}
    assert {"beats.train.pretrain.pretrain", "beats.extract.extract"} <= names
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert not missing, missing


def test_readme_pretrain_names_import():
    from beats.train import PretrainConfig, pretrain  # the README's example

    assert callable(pretrain) and PretrainConfig.for_preset("tiny").steps == 2000


# --------------------------------------------------------------------------- examples
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def example_world(tmp_path_factory):
    """The example audio, and a registry of the real names served from 127.0.0.1."""
    if not (HAVE_SOX and HAVE_ESPEAK):
        pytest.skip("sox and espeak-ng make the example audio (.ci/run installs them)")
    from beats.registry import load_registry

    root = tmp_path_factory.mktemp("docs")
    template = root / "template"
    audio = template / "my_audio"
    (audio / "speech").mkdir(parents=True)
    (audio / "tones").mkdir()
    speech(audio / "speech" / "hello.wav", "hello, this is a short test")
    speech(audio / "speech" / "numbers.wav", "one two three four five", voice="en+f3")
    sox_tone(audio / "tones" / "a440.wav", seconds=2.0)
    sox_tone(audio / "tones" / "sweep.flac", seconds=3.0, rate=44100, freq="200-4000")
    sound_classes(template / "sounds", per_class=6)

    files = {f"/{name}.pt": (REFERENCE / f"{name}.pt").read_bytes() for name in TINY.values()}
    server = FileServer(files)
    models = []
    for e in load_registry():
        data = files[f"/{TINY[e.kind]}.pt"]
        models.append({"name": e.name, "kind": e.kind, "aliases": list(e.aliases),
                       "default": e.default, "urls": [f"{server.url}/{TINY[e.kind]}.pt"],
                       "sha256": _sha(data), "size": len(data), "license": "MIT",
                       "description": getattr(e, "description", "")})
    registry = root / "registry.json"
    registry.write_text(json.dumps({"format_version": 1, "models": models}))
    env = {"BEATS_REGISTRY": str(registry), "BEATS_CACHE": str(root / "cache")}
    yield template, env, root / "pages"
    server.close()


_SHELL = re.compile(r"[|;&<>$`(){}*?\\]")


def shell_steps(code: str) -> list[tuple[str, str]]:
    """A bash block as steps in order: ("beats", ARGS) for a plain ``beats ARGS`` line,
    ("bash", LINES) for the rest. ``pip install ...`` (alone or before ``&&``) is dropped."""
    lines, steps = [], []
    for raw in code.replace("\\\n", " ").splitlines():
        line = PIP.sub("", raw).strip().removeprefix("&&").strip()
        if not line:
            continue
        words = line.split("#")[0].strip()
        if raw[:1] not in " \t" and words.startswith("beats ") and not _SHELL.search(words):
            if lines:
                steps.append(("bash", "\n".join(lines)))
                lines = []
            steps.append(("beats", words.removeprefix("beats ")))
        else:
            lines.append(raw)
    if lines:
        steps.append(("bash", "\n".join(lines)))
    return steps


def test_shell_steps_split_beats_lines_from_the_rest():
    code = ("pip install -e . && beats extract a/ -o b/   # embed\n"
            "mkdir -p x\nfor i in 1 2; do\n  beats tag x/$i.wav\ndone\n"
            "beats finetune s/ -o f \\\n    --epochs 2\nbeats models | head -3\n")
    assert shell_steps(code) == [
        ("beats", "extract a/ -o b/"),
        ("bash", "mkdir -p x\nfor i in 1 2; do\n  beats tag x/$i.wav\ndone"),
        ("beats", "finetune s/ -o f      --epochs 2"),
        ("bash", "beats models | head -3"),
    ]


def _run_beats(args: str, where: str) -> None:
    """``beats ARGS`` through `beats.cli.main` in this process: the installed script's
    code, without a new interpreter and torch import per command (seconds each)."""
    import shlex

    import torch

    from beats.cli import main

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(shlex.split(args))
    except SystemExit as e:  # argparse refused the arguments
        code = e.code
    finally:
        torch.set_num_threads(threads)
    print(out.getvalue(), end="")
    assert code == 0, f"{where}: beats {args} exited {code}\n{out.getvalue()}{err.getvalue()}"


@pytest.mark.parametrize("page", pages(), ids=_name)
def test_examples_run(page, example_world, monkeypatch):
    runnable = [b for b in blocks(page) if b.lang in RUN and b.skip is None]
    if not runnable:
        return
    template, env, pages_dir = example_world
    folder = pages_dir / _name(page).replace("/", "_")
    shutil.copytree(template, folder)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(folder)
    shell_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                 f"{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    namespace: dict = {"__name__": "__main__"}
    for b in runnable:
        start = time.perf_counter()
        where = f"{b.page}:{b.line}"
        if b.lang == "python":
            exec(compile(b.code, where, "exec"), namespace)
            steps = []
        else:
            steps = shell_steps(b.code)
        for kind, text in steps:
            if kind == "beats":
                _run_beats(text, where)
                continue
            run = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=folder,
                                 env=shell_env, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, (
                f"{where} exited {run.returncode}\n{text}\n--- stdout\n{run.stdout}\n"
                f"--- stderr\n{run.stderr}")
        print(f"{where}: {b.lang} block ran in {time.perf_counter() - start:.1f} s")


# Words about how the project was made, not about the product: the spec is not shipped.
_MAKING = re.compile(r"spec section|training spec|spec A\.\d|\bthe spec\b|issue item|"
                     r"this session|was lent|no GPU was", flags=re.I)
def test_no_text_about_how_the_project_was_made():
    files = [*pages(), *sorted((ROOT / "beats").rglob("*.py"))]
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _MAKING.search(line):
                found.append(f"{_name(path)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_docstrings_cite_pages_and_sections_that_exist():
    cited = 0
    for path in sorted((ROOT / "beats").rglob("*.py")):
        text = " ".join(path.read_text(encoding="utf-8").replace("#", " ").split())
        for page, sections in re.findall(r"docs/([\w/-]+\.md)(?:[,:] ([^).;]*))?", text):
            target = DOCS / page
            assert target.is_file(), f"{_name(path)} cites docs/{page}"
            headings = {h.strip() for h in re.findall(r"^#+ (.*)$", target.read_text(),
                                                      flags=re.M)}
            for section in filter(None, (s.strip() for s in sections.split(", "))):
                assert section in headings, f"{_name(path)} cites docs/{page}, {section}"
            cited += 1
    assert cited >= 10
