"""The BEATs iteration as one resumable run: ``beats iterate`` (see docs/design/training.md,
The iteration).

``iterate(audio, out_dir, IterateConfig(...))`` runs, for iterations k = 1..N::

    k = 1:   pre-train an SSL model on the random-projection tokenizer's labels
    k >= 2:  [fine-tune model k-1 on labelled data]  (the iter3+ path, optional)
             distil tokenizer k from model k-1 (or its fine-tuned version)
             pre-train SSL model k on tokenizer k's labels (from scratch, as ESPnet)
    every k: [a linear probe of model k on labelled data]  (optional)

Each stage is an ordinary run of its trainer in its own folder, with its own
``metrics.jsonl``, ``config.json`` and training state::

    OUT/iterate.json                  the settings (a restart must give the same ones)
    OUT/iter1/pretrain/               model/, tokenizer/ (the random one), metrics.jsonl
    OUT/iter1/finetune/               with --teacher-finetune, before iteration 2
    OUT/iter2/distill/                tokenizer/, metrics.jsonl
    OUT/iter2/pretrain/               model/ ...
    OUT/iterK/probe/                  with --probe
    OUT/summary.json                  one row per iteration

A stage is complete when its ``stage.json`` exists (written atomically after the trainer
returned). Running the same command again skips complete stages and resumes the stage that
was interrupted from its last checkpoint (the trainers' ``--resume``): killing the run at
any point loses at most the steps since that stage's last checkpoint. The same command
with a larger ``--iterations`` extends a finished run; any other change of settings is
refused (another run needs another folder).

Seeds: every stage uses ``seed`` (the random tokenizer of iteration 1 included); stages
differ by their labels and teachers, not by their seeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..failures import ERRORS_LOG
from ..files import LOCK_NAME, atomic_write, folder_lock
from ..options import check, option
from . import loop
from .distill import DistillConfig, distill
from .finetune import FinetuneConfig, finetune
from .logs import read_metrics
from .pretrain import PretrainConfig, pretrain

SETTINGS_FILE = "iterate.json"
SUMMARY_FILE = "summary.json"
STAGE_FILE = "stage.json"

# Distillation settings of iterate for a model preset (the rest: DistillConfig's, the
# paper's). tiny: the student of the same size, a CPU-sized run (benchmarks/
# iteration_evidence.py); base: the paper's. Dead-code restarts stay off, as in the
# original: on the tiny corpus they kept 536 codes in use, labels the tiny SSL model then
# could not learn at all, while without them 62 codes gave labels it learned (README).
DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(student="tiny", lr=5e-4, steps=400, batch_size=8, crop_seconds=2.0,
                 save_every=100, eval_every=100),
    "base": dict(student="base"),
    "large": dict(student="base"),
}

# probe(model_dir, out_dir) -> its test scores, e.g. {"accuracy": 0.9}: the command layer
# passes one that runs `beats probe` (the probe lives above beats.train).
ProbeFn = Callable[[Path, Path], dict[str, float]]


@dataclass
class IterateConfig:
    """What ``beats iterate`` runs. The stage settings' ``resume`` (and pre-training's
    ``tokenizer`` and ``tokens``) are set per stage; `DISTILL_PRESETS` has iterate's
    distillation settings for each model preset."""

    iterations: int = option(3, help="iterations; 1 is the random tokenizer's", ge=1)
    pretrain: PretrainConfig = option(
        help="the settings of every pre-training stage", factory=lambda: PretrainConfig.for_preset(
            "tiny"), flags=("--pretrain-options",), metavar="JSON", cli=False)
    distill: DistillConfig = option(
        help="the settings of every distillation stage", factory=lambda: DistillConfig(
            **DISTILL_PRESETS["tiny"]), flags=("--distill-options",), metavar="JSON",
        cli=False)
    finetune: FinetuneConfig = option(
        help="the settings of the fine-tuning stages (with --teacher-finetune)",
        factory=FinetuneConfig, flags=("--finetune-options",), metavar="JSON", cli=False)
    teacher_finetune: str | None = option(
        None, help="labelled data as beats finetune takes it: fine-tune each SSL model on "
        "it and distil the next tokenizer from the fine-tuned model (the iter3+ path)",
        unset="none; distil from the SSL model", metavar="DATA")
    probe: str | None = option(
        None, help="labelled data as beats probe takes it: a linear probe of each "
        "iteration's model, its test accuracy in the summary", unset="none",
        metavar="DATA")

    def validate(self) -> None:
        check(self)
        if self.pretrain.tokens is not None or self.pretrain.tokenizer not in (None, "random"):
            raise InputError("iterate chooses each pre-training stage's labels itself: "
                             "leave the pre-training tokenizer and tokens unset")
        for cfg in (self.pretrain, self.distill, self.finetune):
            cfg.validate()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (every stage's full config)."""
        return {"iterations": self.iterations, "teacher_finetune": self.teacher_finetune,
                "probe": self.probe,
                "pretrain": _config_dict(self.pretrain), "distill": _config_dict(self.distill),
                "finetune": _config_dict(self.finetune)}


def _config_dict(cfg: Any) -> dict[str, Any]:
    data = dataclasses.asdict(cfg)
    for key in ("resume", "quiet", "num_workers", "device"):  # how, not what, is run
        data.pop(key, None)
    return json.loads(json.dumps(data))


@dataclass
class Stage:
    """One stage: ``kind`` (pretrain, finetune, distill, probe) of iteration ``iteration``."""

    iteration: int
    kind: str
    folder: Path

    @property
    def name(self) -> str:
        return f"iter{self.iteration}/{self.kind}"

    @property
    def done(self) -> bool:
        return (self.folder / STAGE_FILE).is_file()


def plan(cfg: IterateConfig, out_dir: Path) -> list[Stage]:
    """The stages of a run, in order."""
    stages = []
    for k in range(1, cfg.iterations + 1):
        here = out_dir / f"iter{k}"
        if k >= 2:
            if cfg.teacher_finetune:
                stages.append(Stage(k - 1, "finetune", out_dir / f"iter{k - 1}" / "finetune"))
            stages.append(Stage(k, "distill", here / "distill"))
        stages.append(Stage(k, "pretrain", here / "pretrain"))
        if cfg.probe:
            stages.append(Stage(k, "probe", here / "probe"))
    return stages


@dataclass
class IterateResult:
    """The summary rows (one per iteration) and the stages run and skipped by this call."""

    rows: list[dict[str, Any]]
    ran: list[str]
    skipped: list[str]


def iterate(audio: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
            config: IterateConfig | None = None, *, heldout: Sequence[str | os.PathLike] = (),
            probe_fn: ProbeFn | None = None,
            on_stage: Callable[[Stage, str], None] | None = None) -> IterateResult:
    """Run (or continue) the iteration into ``out_dir``; see the module docstring.

    ``audio``/``heldout``: what ``beats pretrain`` takes; held-out audio gives every stage
    held-out scores. ``probe_fn`` runs the probe stages (needed when ``config.probe`` is
    set). ``on_stage(stage, "run" | "resume" | "skip")`` is called before each stage.
    Raises ``ValueError`` for bad settings or a folder holding another run's settings, and
    what the trainers raise.
    """
    cfg = config or IterateConfig()
    cfg.validate()
    if cfg.probe and probe_fn is None:
        raise InputError("config.probe is set but no probe_fn was given")
    out_dir = Path(out_dir)
    settings = {"audio": [os.fspath(a) for a in audio],
                "heldout": [os.fspath(a) for a in heldout], **cfg.to_dict()}
    if (not (out_dir / SETTINGS_FILE).exists() and out_dir.exists()
            and any(p.name not in (LOCK_NAME, ERRORS_LOG) for p in out_dir.iterdir())):
        raise InputError(f"{out_dir} is not empty and holds no iterate run: use another -o")
    out_dir.mkdir(parents=True, exist_ok=True)
    ran, skipped = [], []
    with folder_lock(out_dir, "beats iterate"):  # a second run into OUT fails at once
        _claim(out_dir, settings)
        for stage in plan(cfg, out_dir):
            if stage.done:
                skipped.append(stage.name)
                if on_stage:
                    on_stage(stage, "skip")
                continue
            resume = stage.folder.exists()
            if on_stage:
                on_stage(stage, "resume" if loop.holds_run(stage.folder) else "run")
            record = _run_stage(stage, cfg, out_dir, audio, heldout, probe_fn, resume)
            _write_json(stage.folder / STAGE_FILE, record)
            ran.append(stage.name)
        rows = summary(out_dir, cfg)
        _write_json(out_dir / SUMMARY_FILE, rows)
    return IterateResult(rows, ran, skipped)


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _claim(out_dir: Path, settings: dict[str, Any]) -> None:
    """Record the settings, or check that a restarted run was given the same ones."""
    path = out_dir / SETTINGS_FILE
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{path} cannot be read ({e}): use another output folder") from None
        # More iterations continue a finished run; any other change is another run.
        changed = [k for k in _differences(saved, settings) if k != "iterations"]
        if changed:
            raise InputError(f"{out_dir} holds an iterate run with other settings (differing: "
                             f"{', '.join(changed)}): give the same command to continue it, "
                             "or use another -o")
        if saved.get("iterations") != settings["iterations"]:
            _write_json(path, settings)
        return
    _write_json(path, settings)


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys whose values differ, nested ones as ``pretrain.steps``."""
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(prefix + key)
    return keys


def _teacher(stage: Stage, cfg: IterateConfig, out_dir: Path) -> Path:
    previous = out_dir / f"iter{stage.iteration - 1}"
    if cfg.teacher_finetune:
        return previous / "finetune" / "model"
    return previous / "pretrain" / "model"


def _run_stage(stage: Stage, cfg: IterateConfig, out_dir: Path,
               audio: Sequence[str | os.PathLike], heldout: Sequence[str | os.PathLike],
               probe_fn: ProbeFn | None, resume: bool) -> dict[str, Any]:
    model = out_dir / f"iter{stage.iteration}" / "pretrain" / "model"
    if stage.kind == "pretrain":
        tokenizer = ("random" if stage.iteration == 1 else
                     str(out_dir / f"iter{stage.iteration}" / "distill" / "tokenizer"))
        pcfg = dataclasses.replace(cfg.pretrain, tokenizer=tokenizer, tokens=None,
                                   resume=resume)
        result = pretrain(list(audio), stage.folder, pcfg, heldout=list(heldout))
        return {"stage": stage.name, "tokenizer": tokenizer, "steps": result.fit.steps,
                "seconds": result.fit.seconds, "heldout": result.heldout}
    if stage.kind == "finetune":
        fcfg = dataclasses.replace(cfg.finetune, resume=resume)
        result = finetune(str(model), str(cfg.teacher_finetune), fcfg, stage.folder)
        test = result.report.get("test") if isinstance(result.report, dict) else None
        return {"stage": stage.name, "teacher_of": f"iter{stage.iteration + 1}",
                "steps": result.fit.steps, "seconds": result.fit.seconds, "test": test}
    if stage.kind == "distill":
        teacher = _teacher(stage, cfg, out_dir)
        dcfg = dataclasses.replace(cfg.distill, resume=resume)
        result = distill(teacher, list(audio), dcfg, stage.folder, heldout=list(heldout))
        return {"stage": stage.name, "teacher": str(teacher), "steps": result.fit.steps,
                "seconds": result.fit.seconds}
    if stage.kind == "probe":  # cheap: an interrupted probe starts again
        assert probe_fn is not None
        if stage.folder.exists():
            shutil.rmtree(stage.folder)
        return {"stage": stage.name, "scores": probe_fn(model, stage.folder)}
    raise AssertionError(stage.kind)


def _last(lines: list[dict[str, Any]], key: str) -> float | None:
    values = [line[key] for line in lines if isinstance(line.get(key), (int, float))]
    return float(values[-1]) if values else None


def summary(out_dir: Path, cfg: IterateConfig) -> list[dict[str, Any]]:
    """One row per iteration from the stages' files: the pre-training's masked accuracy
    (last held-out value and last training value), labels used per batch, the held-out
    most-frequent-label rate, the tokenizer's codebook usage (distilled tokenizers: codes
    hit over the held-out crops, else over the last steps) and the probe's test accuracy.
    A value is None when its stage has not run (or has no held-out audio)."""
    rows = []
    for k in range(1, cfg.iterations + 1):
        pre = read_metrics(out_dir / f"iter{k}" / "pretrain")
        row: dict[str, Any] = {
            "iteration": k,
            "tokenizer": "random" if k == 1 else f"distilled from iter{k - 1}"
            + (" (fine-tuned)" if cfg.teacher_finetune else ""),
            "heldout_masked_accuracy": _last(pre, "val_masked_accuracy"),
            "heldout_majority": _last(pre, "val_majority"),
            "masked_accuracy": _last(pre, "masked_accuracy"),
            "labels_used": _last(pre, "labels_used"),
            "codebook_usage": None, "probe_accuracy": None,
        }
        if k >= 2:
            dis = read_metrics(out_dir / f"iter{k}" / "distill")
            row["codebook_usage"] = (_last(dis, "val_codebook_usage")
                                     or _last(dis, "codebook_usage_recent"))
        probe = out_dir / f"iter{k}" / "probe" / STAGE_FILE
        if probe.is_file():
            scores = json.loads(probe.read_text()).get("scores") or {}
            row["probe_accuracy"] = scores.get("accuracy")
        rows.append(row)
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The summary rows as a Markdown table."""
    def show(value: Any, digits: int = 3) -> str:
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| iteration | tokenizer | masked acc (held-out) | most frequent label "
             "| masked acc (train) | labels used | codebook usage | probe acc |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['iteration']} | {r['tokenizer']} | {show(r['heldout_masked_accuracy'])} "
            f"| {show(r['heldout_majority'])} | {show(r['masked_accuracy'])} "
            f"| {show(r['labels_used'], 1)} | {show(r['codebook_usage'], 0)} "
            f"| {show(r['probe_accuracy'])} |")
    return "\n".join(lines)
