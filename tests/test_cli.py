"""The ``beats`` command line: ``beats models`` and ``beats convert``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beats import BEATs, BEATsTokenizer
from beats.cli import SUBCOMMANDS, build_parser, main

from .conftest import HUB, REFERENCE, reference_model
from .test_hub import _repo
from .test_registry_download import _Payload
from .test_save_load import assert_same_model

ROOT = Path(__file__).resolve().parents[1]


def beats_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m beats ARGS`` on this checkout."""
    return subprocess.run(
        [sys.executable, "-m", "beats", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def test_console_script_entry_point_is_the_cli_main(capsys):
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["beats"].partition(":")
    entry = getattr(importlib.import_module(module), func)
    assert entry is main
    assert entry(["models", "--kind", "tokenizer"]) == 0
    assert "Tokenizer_iter3_plus_AS2M" in capsys.readouterr().out


def test_help_lists_the_subcommands():
    done = beats_cli("--help")
    assert done.returncode == 0
    assert "models" in done.stdout and "convert" in done.stdout


def test_every_help_states_the_one_exit_code_table(capsys):
    from beats.cli import EXIT_CODE_COMMANDS, EXIT_CODES

    for name in (None, *SUBCOMMANDS):
        with pytest.raises(SystemExit):
            main([name, "--help"] if name else ["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert text.count("exit codes:") == 1 and "Exit codes" not in text, name
        for code, meaning in EXIT_CODES.items():
            commands = EXIT_CODE_COMMANDS.get(code, ())
            applies = name is None or not commands or name in commands
            assert (f" {code} {meaning}" in text) == applies, (name, code)
        if name in ("finetune", "pretrain", "distill"):
            assert ("1 the job completed, but some inputs could not be used and were "
                    "skipped; each is listed with its reason in OUT/failed.jsonl") in text
    assert set(EXIT_CODES) == {0, 1, 2, 3, 4, 130}


def test_no_subcommand_prints_usage(capsys):
    assert main([]) == 2
    assert "usage: beats" in capsys.readouterr().err


def test_models_table_shows_default_and_cache(tmp_path, capsys):
    reference_model("postnorm_gru").save_pretrained(tmp_path / "BEATs_iter3")  # as if cached
    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "DEFAULT", "CACHED", "VERIFIED", "SOURCE",
                                "DIGEST", "ALIASES"]
    rows = {line.split()[0]: line.split() for line in lines[1:20]}
    assert len(rows) == 19
    assert rows["BEATs_iter3_plus_AS2M"][1:4] == ["pretrained", "*", "no"]
    assert rows["BEATs_iter3"][1:3] == ["pretrained", "yes"]
    assert rows["Tokenizer_iter2"][1:3] == ["tokenizer", "no"]
    assert f"19 checkpoints, 1 cached in {tmp_path}" in lines


def test_models_lists_the_default_alias(tmp_path, capsys):
    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    default = next(r for r in rows if r and r[0] == "BEATs_iter3_plus_AS2M")
    assert default[-1] == "default" and default[-2] == "as2m,"  # "..., as2m, default"
    assert sum("default" in r[4:] for r in rows if len(r) > 4) == 1
    assert main(["models", "--json", "--kind", "pretrained"]) == 0
    doc = json.loads(capsys.readouterr().out)
    aliases = {m["name"]: m["aliases"] for m in doc["models"]}
    assert "default" in aliases["BEATs_iter3_plus_AS2M"]
    assert not any("default" in a for n, a in aliases.items() if n != "BEATs_iter3_plus_AS2M")


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_is_documented_and_shows_its_default():
    parsers = _subcommand_parsers()
    assert sorted(parsers) == sorted(SUBCOMMANDS)
    for name, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flags = "/".join(action.option_strings) or action.dest
            assert action.help, f"beats {name} {flags} has no help"
            real_default = action.default not in (None, False, argparse.SUPPRESS)
            if action.option_strings and real_default:
                shown = formatter._get_help_string(action) or ""
                assert "default" in shown, f"beats {name} {flags} hides its default"


def test_help_shows_defaults(capsys):
    for args, expected in (
        (["extract", "--help"], ["per forward pass (default: 8)", "(default: mean)"]),
        (["tag", "--help"], ["most probable first (default: 5)"]),
        (["tokenize", "--help"], ["(default: Tokenizer_iter3_plus_AS2M)"]),
    ):
        with pytest.raises(SystemExit):
            main(args)
        text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
        for phrase in expected:
            assert phrase in text, (args, phrase)


def test_models_json(tmp_path, capsys):
    assert main(["models", "--json", "--cache-dir", str(tmp_path), "--kind", "fine-tuned"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cache_dir"] == str(tmp_path)
    assert len(doc["models"]) == 10
    first = doc["models"][0]
    assert first["name"] == "BEATs_iter1_finetuned_on_AS2M_cpt1"
    assert first["cached"] is False and first["license"] == "MIT"
    assert first["sha256"] == "e0e739e3670bfbb93c51adefb1d02981621397addc979d392aefd3dc53c22cab"
    assert first["cache_path"] == str(tmp_path / first["name"])
    assert first["source"] == "browser" and first["browser_page"].startswith("https://1drv.ms/")


def test_convert_writes_a_folder_that_loads_identically(tmp_path, waves, capsys):
    assert main(["convert", str(REFERENCE / "finetuned.pt"), str(tmp_path / "out")]) == 0
    assert "config.json, model.safetensors, labels.json" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "labels.json", "model.safetensors"
    ]
    assert_same_model(reference_model("finetuned"), BEATs.from_pretrained(tmp_path / "out"),
                      waves["wav.0"])


def test_convert_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(REFERENCE / "finetuned.pt"), str(out)]) == 0
    assert main(["convert", str(REFERENCE / "postnorm_gru.pt"), str(out)]) == 2
    assert "already holds a model (model.safetensors); pass --force" in capsys.readouterr().err
    assert BEATs.from_pretrained(out).predictor is not None  # untouched
    assert main(["convert", str(REFERENCE / "postnorm_gru.pt"), str(out), "--force"]) == 0
    assert BEATs.from_pretrained(out).predictor is None
    assert not (out / "labels.json").exists()


def test_convert_missing_input(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.pt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"beats convert: error: no checkpoint file or folder at {tmp_path / 'nope.pt'}")
    assert not (tmp_path / "out").exists()


def test_convert_output_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    assert main(["convert", str(REFERENCE / "finetuned.pt"), str(tmp_path / "out")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_convert_truncated_file_names_it(tmp_path, capsys):
    cut = tmp_path / "cut.pt"
    cut.write_bytes((REFERENCE / "finetuned.pt").read_bytes()[:1000])
    assert main(["convert", str(cut), str(tmp_path / "out")]) == 2
    assert f"{cut} is truncated or corrupt" in capsys.readouterr().err


def test_convert_refuses_a_code_carrying_pickle_without_running_it(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    _Payload.marker = str(marker)
    evil = tmp_path / "evil.pt"
    ckpt = torch.load(REFERENCE / "postnorm_gru.pt", weights_only=True)
    torch.save({**ckpt, "x": _Payload()}, evil, pickle_protocol=2)
    assert main(["convert", str(evil), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "evil.pt is not a plain-tensor checkpoint: loading it would run code" in err
    assert "(it calls getattr)" in err and "weights_only" not in err
    assert "beats convert" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_tokenizer_uses_the_tokenizer_class(tmp_path, capsys):
    assert main(["convert", str(REFERENCE / "tokenizer.pt"), str(tmp_path / "out")]) == 0
    model = BEATsTokenizer.from_pretrained(tmp_path / "out")
    reference = BEATsTokenizer.from_pretrained(REFERENCE / "tokenizer.pt")
    sd, ref = model.state_dict(), reference.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)


def test_acceptance_convert_save_reload_from_folder_and_hub(tmp_path, waves):
    """A Microsoft .pt, converted with `beats convert`, saved, reloaded from the folder and
    from a hub-style repo: outputs bit-identical to the .pt's."""
    pt = REFERENCE / "finetuned.pt"
    original = BEATs.from_pretrained(pt)
    out = tmp_path / "converted"
    done = beats_cli("convert", str(pt), str(out))
    assert done.returncode == 0, done.stderr
    converted = BEATs.from_pretrained(out)
    resaved = BEATs.from_pretrained(converted.save_pretrained(tmp_path / "resaved"))
    repo = _repo()
    HUB.commit(repo, {p.name: p.read_bytes() for p in (tmp_path / "resaved").iterdir()})
    from_hub = BEATs.from_pretrained(repo, cache_dir=tmp_path / "hf")
    clips = [waves[f"wav.{i}"] for i in range(3)]
    for model in (converted, resaved, from_hub):
        assert_same_model(original, model, waves["wav.4"])
        for clip in clips:
            assert_same_model(original, model, clip)
