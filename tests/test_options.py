"""One source per option: every config field is an option whose --help shows its default,
a row of the generated configuration reference, and one set of checks whose messages name
the option on the command line and the field in Python."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import re
from pathlib import Path

import pytest

from beats.cli import build_parser, main
from beats.commands.arguments import HelpFormatter
from beats.commands.options import given
from beats.commands.pretrain import pretrain_config
from beats.commands.training import config_from_layers, read_config_file, record_audio
from beats.detect import DetectConfig
from beats.errors import InputError
from beats.probe import TrainConfig as ProbeConfig
from beats.train import DistillConfig, FinetuneConfig, IterateConfig, PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
# Each command's config; every field of it is set by an option of the command.
COMMANDS = {"finetune": FinetuneConfig, "pretrain": PretrainConfig, "distill": DistillConfig,
            "iterate": IterateConfig, "probe": ProbeConfig, "detect": DetectConfig}


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _entries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{flag: its --help entry on one line} of every option (--help as printed, unwrapped)."""
    parser.formatter_class = functools.partial(HelpFormatter, width=10_000)
    out = {}
    for entry in re.split(r"\n  (?=-)", parser.format_help().split("\noptions:\n", 1)[1]):
        text = " ".join(entry.split())
        head = entry.strip().splitlines()[0].split("  ")[0]  # the flags, before the help
        for flag in re.findall(r"(?:^|, )(-{1,2}[\w-]+)", head):
            out[flag] = text
    return out


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _shown(field: dataclasses.Field) -> str:
    """A default as a user types it back: None is what the field says None means."""
    value = _default(field)
    if value is None:
        return field.metadata["unset"]
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def _flags(field: dataclasses.Field) -> tuple[str, ...]:
    return field.metadata["flags"] or ("--" + field.name.replace("_", "-"),)


def test_every_config_field_is_in_help_with_its_default_and_in_the_reference():
    parsers = _parsers()
    hooks = _hooks()
    reference = hooks.config_reference()
    documented = {hooks.config_class(path): path for path in hooks.CONFIGS}
    for command, cls in COMMANDS.items():
        entries = _entries(parsers[command])
        section = reference.split(hooks.config_heading(documented[cls]) + "\n", 1)[1]
        section = section.split("\n## ", 1)[0]
        for field in dataclasses.fields(cls):
            meta = field.metadata
            assert meta.get("help"), f"{cls.__name__}.{field.name} has no help"
            for flag in _flags(field):  # every field is set from the command line
                assert flag in entries, (command, field.name, flag)
            entry = entries[_flags(field)[-1]]
            if meta["cli"] and field.type not in (bool, "bool"):
                assert f"(default: {_shown(field)})" in entry, (command, entry)
            elif meta["cli"]:
                assert "(default:" not in entry, (command, entry)  # a switch, off
            row = next(line for line in section.splitlines()
                       if line.startswith(f"| `{field.name}` |"))
            assert " | ".join(f"`{f}`" for f in _flags(field)).replace(" | ", ", ") in row
            value = _default(field)
            if not dataclasses.is_dataclass(value):
                assert f"`{value!r}`" in row, row
            assert meta["help"].split()[0] in row
    # what --help says, as a reader sees it
    finetune = _entries(parsers["finetune"])
    assert "(default: 0.0005)" in finetune["--lr"]
    assert "--betas B1 B2 AdamW's betas (beta1 beta2) (default: 0.9 0.98)" in finetune["--betas"]
    assert "(default: none, --val-fraction splits)" in finetune["--val-fold"]
    assert "(default: 400000)" in _entries(parsers["pretrain"])["--steps"]
    assert "(default: 0.0)" in _entries(parsers["detect"])["--min-gap"]
    assert "(default: 200)" in _entries(parsers["probe"])["--epochs"]


def test_each_shown_default_typed_back_is_the_default():
    parsers = _parsers()
    positional = {"finetune": [], "pretrain": [], "distill": [], "iterate": ["a", "-o", "o"],
                  "probe": ["a"], "detect": ["a"]}
    for command, cls in COMMANDS.items():
        for field in dataclasses.fields(cls):
            value = _default(field)
            if (not field.metadata["cli"] or value is None or isinstance(value, bool)
                    or dataclasses.is_dataclass(value)):
                continue
            argv = [*positional[command], _flags(field)[-1], *_shown(field).split()]
            args = parsers[command].parse_args(argv)
            got = getattr(args, field.name)
            got = tuple(got) if isinstance(got, list) else got  # nargs: a list
            assert got == value and type(got) is type(value), (command, field.name)
    args = parsers["finetune"].parse_args(["--betas", "0.8", "0.9", "-j", "0", "--roll"])
    assert given(args, FinetuneConfig) == {"betas": (0.8, 0.9), "num_workers": 0, "roll": True}


def test_a_bad_value_names_the_field_in_python_and_the_option_on_the_command_line(
        tmp_path, capsys):
    with pytest.raises(InputError, match=r"^lr must be a positive number, got -1$"):
        FinetuneConfig(lr=-1)
    with pytest.raises(InputError, match=r"^decay must be a number in \(0, 1\), got 1.0$"):
        DistillConfig(decay=1.0)
    with pytest.raises(InputError, match=r"^schedule must be one of cosine, linear, constant"):
        PretrainConfig(schedule="step")
    with pytest.raises(InputError, match=r"give tokenizer .* or tokens .*, not both"):
        PretrainConfig(tokenizer="random", tokens=str(tmp_path))
    with pytest.raises(InputError, match=r"^epochs must be a positive integer, got 0$"):
        ProbeConfig(epochs=0)

    out = tmp_path / "out"
    assert main(["finetune", str(tmp_path), "-o", str(out), "--lr", "-1"]) == 2
    assert capsys.readouterr().err == ("beats finetune: error: --lr must be a positive "
                                       "number, got -1.0\n")
    assert main(["pretrain", str(tmp_path), "-o", str(out), "--tokens", str(tmp_path),
                 "--tokenizer", "random"]) == 2
    assert "give --tokenizer (labels computed while training) or --tokens" in \
        capsys.readouterr().err
    # a value from --config-file is judged the same way, naming the option
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"config": {"warmup_ratio": 1.5}, "data": str(tmp_path),
                                  "output": str(out)}))
    assert main(["finetune", "--config-file", str(config)]) == 2
    assert capsys.readouterr().err == ("beats finetune: error: --warmup-ratio must be a "
                                       "number in [0, 1), got 1.5\n")
    assert not out.exists()  # nothing ran


def test_config_file_layers_under_the_options_given_in_one_parse(tmp_path):
    parser = build_parser()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "config": {"lr": 7e-4, "batch_size": 3, "seed": 4, "betas": [0.9, 0.95],
                   "resume": True},
        "data": "data/", "model": "m", "output": "first/"}))
    args = parser.parse_args(["finetune", "--config-file", str(path), "--batch-size", "2"])
    record = read_config_file(args.config_file)
    cfg = config_from_layers(FinetuneConfig, args, record)
    assert (cfg.lr, cfg.batch_size, cfg.seed, cfg.betas) == (7e-4, 2, 4, (0.9, 0.95))
    assert cfg.epochs == 30 and cfg.resume is False  # a default; resume is asked anew

    def pretrain(*argv: str, record: dict | None = None) -> PretrainConfig:
        return pretrain_config(parser.parse_args(["pretrain", "a.wav", *argv]), record or {})

    assert pretrain().steps == 400_000 and pretrain().dtype == "bfloat16"  # the paper's
    tiny = pretrain("--config", "tiny")
    assert (tiny.steps, tiny.batch_size, tiny.dtype) == (2000, 8, "float32")  # the preset
    assert pretrain("--config", "tiny", "--steps", "5").steps == 5
    record = {"config": {"config": "tiny", "steps": 7}}
    again = pretrain("--lr", "1e-3", record=record)
    assert (again.steps, again.batch_size, again.lr) == (7, 8, 1e-3)


def test_the_audio_inputs_have_one_name_and_old_files_still_read():
    assert record_audio({"audio": ["a.wav"]}) == ["a.wav"]
    assert record_audio({"inputs": ["old.wav"]}) == ["old.wav"]  # pre-training runs before
    assert record_audio({"audio": ["a.wav"], "inputs": ["old.wav"]}) == ["a.wav"]
    assert record_audio({}) is None
