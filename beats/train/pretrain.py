"""Self-supervised pre-training on the one training loop (see docs/design/training.md,
Masked pre-training).

``pretrain(audio, out_dir, PretrainConfig(...))`` trains a `BEATsForPretraining` to
predict the labels of masked patches of unlabelled audio and writes:

- ``OUT/model/``: the encoder alone, an ordinary BEATs checkpoint (`save_pretrained`
  layout, no predictor) that ``BEATs.from_pretrained``, ``beats extract`` and ``beats
  finetune -m`` load;
- ``OUT/tokenizer/``: the random-projection tokenizer that made the labels, when it was
  used (a `BEATsTokenizer` checkpoint: ``beats tokenize -m OUT/tokenizer`` works);
- ``OUT/metrics.jsonl`` (``loss``, ``lr``, ``masked_accuracy``, ``unmasked_accuracy``,
  ``labels_used``, ``audio_seconds_per_second``; with held-out audio ``val_*`` lines),
  ``OUT/config.json``, ``OUT/failed.jsonl``, ``OUT/state/`` (see `beats.train.loop`).

Labels come from a frozen tokenizer applied to the same filterbank the model sees (the
iteration-1 random projection seeded by ``seed``, or any trained `BEATsTokenizer`), or
from ``beats tokenize`` outputs (``tokens``). The tokenizer is held by the task, not by
``task.model``: it is never trained, checkpointed or given to the optimiser. Each clip's
mask is drawn in the Dataset from the clip's own generator (seeded by seed, stream
position and index), so 2 processes equal 1 and a resumed run repeats the same masks.

Held-out evaluation (``heldout``) scores fixed crops and masks of other files: masked
accuracy, loss, and two baselines over the same masked patches: the most frequent
label's rate (``val_majority``) and copying the label of the nearest kept patch in the
same frequency band (``val_neighbour``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import serialization
from ..audio import SAMPLE_RATE, audio_info
from ..errors import InputError
from ..inputs import MIN_SAMPLES
from ..model import BEATs
from ..model_output import PATCHES_PER_STEP
from ..options import OptionError, option, override
from ..tokenizer import BEATsTokenizer
from . import distributed, loop, state
from .data import Clip, filterbank
from .masking import mask_patches, num_patches, pad_masks
from .random_tokenizer import random_tokenizer
from .ssl import POSITIONS, PRESETS, BEATsForPretraining, SSLConfig
from .token_labels import TokenLabels
from .unlabelled import (
    UnlabelledConfig,
    audio_dataset,
    check_audio,
    crop_patches,
    files_digest,
    find_audio,
    heldout_batches,
    heldout_dataset,
)

SSL = "masked prediction (override --config's)"  # a --help section

# Training settings of a preset that differ from `PretrainConfig`'s (the paper's, for base).
# tiny: learns on a 2-core CPU in minutes: 2000 steps of 8 crops of 2 s (9 h of audio) took
# 7 min at ~85 audio s/s (one torch thread); on the 12-minute corpus its linear probe beat
# the untrained encoder's by 0.84 to 0.34, where 300 steps were not enough to tell
# (benchmarks/pretrain_evidence.py, README). float32: at this width bf16 gains nothing.
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(steps=2000, batch_size=8, crop_seconds=2.0, lr=2e-3,
                 warmup_steps=200, dtype="float32", save_every=250, eval_every=250),
    "base": {},
    "large": {},
}


@dataclass
class PretrainConfig(UnlabelledConfig):
    """`UnlabelledConfig` plus pre-training's settings; defaults are the paper's for
    ``base`` (400k steps of 560 clips of 10 s, lr 5e-4, 32k warm-up then linear decay to 0,
    AdamW (0.9, 0.98), weight decay 0.01, clip 1.0, bf16); `for_preset` gives a preset's
    own (``tiny``: `TRAINING_PRESETS`). ``mask_ratio``, ``label_smoothing``,
    ``predictor_layers`` and ``positions`` override the `SSLConfig` keys of ``config``
    (None: keep them)."""

    steps: int | None = override(UnlabelledConfig, "steps", 400_000)
    batch_size: int = override(UnlabelledConfig, "batch_size", 560)
    lr: float = override(UnlabelledConfig, "lr", 5e-4)
    schedule: str = override(UnlabelledConfig, "schedule", "linear")
    warmup_steps: int = override(UnlabelledConfig, "warmup_steps", 32_000)
    dtype: str = override(UnlabelledConfig, "dtype", "bfloat16")
    save_every: int = override(UnlabelledConfig, "save_every", 1000)
    eval_every: int = override(UnlabelledConfig, "eval_every", 1000,
                               help="steps between held-out evaluations (0: once per pass "
                               "over the files)")
    config: str = option(
        "base", help="the model: tiny, base or large, or a JSON file of SSL config keys "
        '({"preset": "tiny", "mask_ratio": 0.6, "model": {"encoder_layers": 6}})')
    tokenizer: str | None = option(
        None, help="labels computed while training: random (the iteration-1 random "
        "projection of --seed, saved to OUT/tokenizer) or a tokenizer checkpoint (folder, "
        ".pt, registry name, hub repo)", unset="random, unless --tokens is given")
    tokens: str | None = option(
        None, help="labels read from a beats tokenize output folder of the same audio "
        "instead", unset="none")
    mask_ratio: float | None = option(
        None, help="share of each clip's patches masked", ge=0, lt=1,
        unset="the config's (0.75 in every preset)", group=SSL)
    label_smoothing: float | None = option(
        None, help="label smoothing of the cross-entropy", ge=0, lt=1,
        unset="the config's (0.1 in every preset)", group=SSL)
    predictor_layers: int | None = option(
        None, help="Transformer layers of the label predictor", ge=1,
        unset="the config's (3; tiny 2)", group=SSL)
    positions: str | None = option(
        None, help="where the encoder sees kept patches", choices=POSITIONS,
        unset="the config's (true in every preset)", group=SSL)

    def validate(self) -> None:
        super().validate()
        if self.tokenizer is not None and self.tokens is not None:
            raise OptionError("give {tokenizer} (labels computed while training) or {tokens} "
                              "(labels read from beats tokenize outputs), not both",
                              "tokenizer", "tokens")

    @classmethod
    def for_preset(cls, config: str = "base", **overrides: Any) -> PretrainConfig:
        """The config of model ``config`` with its preset's training settings
        (`TRAINING_PRESETS`); ``overrides`` win."""
        return cls(**{"config": config, **preset_defaults(config), **overrides})

    def ssl_config(self, num_labels: int | None = None) -> SSLConfig:
        """The `SSLConfig` this run trains (``num_labels``: the label source's K)."""
        if self.config in PRESETS:
            data: dict[str, Any] = {"preset": self.config}
        elif self.config.endswith(".json") or os.path.exists(self.config):
            try:
                data = json.loads(Path(self.config).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"cannot read the SSL config {self.config}: {e}") from None
            if not isinstance(data, dict):
                raise InputError(f"{self.config}: an SSL config is a JSON object")
        else:
            raise InputError(f"--config {self.config!r}: not a preset ({', '.join(PRESETS)}) "
                             "nor a JSON file")
        for key in ("mask_ratio", "label_smoothing", "predictor_layers", "positions"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if num_labels is not None:
            data["num_labels"] = num_labels
        return SSLConfig.from_dict(data)


def preset_name(config: str) -> str | None:
    """The preset that ``config`` names: itself, or a JSON file's ``preset`` key (``base``
    when it has none); None when the file cannot be read as a JSON object."""
    if config in PRESETS:
        return config
    try:
        return json.loads(Path(config).read_text()).get("preset", "base")
    except (OSError, ValueError, AttributeError):
        return None


def preset_defaults(config: str) -> dict[str, Any]:
    """Training settings of the preset that ``config`` names (a preset, or a JSON file
    whose ``preset`` key names one); {} when none applies."""
    return dict(TRAINING_PRESETS.get(preset_name(config) or "", {}))


# --------------------------------------------------------------------------- labels
class LabelSource:
    """Where a run's labels come from: a frozen tokenizer (``tokenizer``) or ``beats
    tokenize`` outputs (``tokens``); ``num_labels`` is K."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.tokenizer: BEATsTokenizer | None = None
        self.tokens: TokenLabels | None = None
        self.random = False
        self.num_labels: int | None = None
        if cfg.tokens is not None:
            self.tokens = TokenLabels(cfg.tokens)
            self.num_labels = _tokens_vocabulary(self.tokens)
            self.description = f"tokens from {cfg.tokens}"
        elif cfg.tokenizer in (None, "random"):
            self.tokenizer = random_tokenizer(cfg.seed)
            self.random = True
            self.description = f"random-projection tokenizer, seed {cfg.seed}"
        else:
            self.tokenizer = BEATsTokenizer.from_pretrained(cfg.tokenizer)
            self.description = f"tokenizer {cfg.tokenizer}"
        if self.tokenizer is not None:
            self.tokenizer.requires_grad_(False).eval()
            self.num_labels = self.tokenizer.cfg.quant_n

    def identity(self) -> dict[str, Any]:
        """What identifies the labels for ``--resume``: the source, and the tokenizer's
        `beats.train.state.weights_digest` when there is one."""
        out: dict[str, Any] = {"source": self.description}
        if self.tokenizer is not None:
            out["weights"] = state.weights_digest(self.tokenizer)
        return out

    def check(self, files: Sequence[Clip]) -> None:
        """Token outputs must cover every file, and the first file's must match its audio."""
        if self.tokens is None or not len(files):
            return
        records = self.tokens.records
        missing = [c.name for c in files if os.path.abspath(c.name) not in records]
        if missing:
            raise InputError(f"--tokens {self.tokens.folder}: {len(missing)} of {len(files)} "
                             f"audio files have no tokens there (first: {missing[0]}); run "
                             "beats tokenize on the same files")
        first = files[0].name
        try:
            total = file_samples(first)
        except ValueError:
            return  # an unreadable first file fails when drawn, like any other
        self.tokens.crop(first, 0, min(total, MIN_SAMPLES), total)

    def labels(self, features: torch.Tensor, frames: torch.Tensor, batch: dict[str, Any],
               model_cfg: Any) -> torch.Tensor:
        """(B, S) labels of a batch, -1 at padding."""
        if self.tokenizer is None:
            return batch["labels"]
        tokenizer = self.tokenizer
        if next(tokenizer.parameters()).device != features.device:
            tokenizer.to(features.device)
        if (tokenizer.cfg.fbank_mean, tokenizer.cfg.fbank_std) != (model_cfg.fbank_mean,
                                                                   model_cfg.fbank_std):
            features, frames = filterbank(batch["wav"], batch["lengths"], tokenizer.cfg)
        return tokenizer.labels_from_fbank(features, frames)


def _tokens_vocabulary(tokens: TokenLabels) -> int | None:
    """K of the tokenizer a ``beats tokenize`` run used, when its folder is at hand."""
    try:
        model = json.loads((tokens.folder / "run.json").read_text()).get("model")
        cfg = json.loads((Path(model) / "config.json").read_text())
        return int(cfg["quant_n"])
    except (OSError, ValueError, TypeError, KeyError):
        return None  # a registry name: the released tokenizers have 1024 codes


def file_samples(path: str) -> int:
    """A file's length in samples at 16 kHz, padded to the model's minimum as read."""
    info = audio_info(path)
    return max(round(info.frames * SAMPLE_RATE / info.sample_rate), MIN_SAMPLES)


class MaskDraw:
    """The ``augment`` of `ClipDataset`: a clip's mask (its valid patches,
    `mask_patches`) drawn from the clip's own generator."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def __call__(self, wav: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, dict[str, Any]]:
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return wav, {"mask": mask_patches(num_patches(len(wav)), self.ratio, generator).numpy()}


def collate_masked(items: list[dict[str, Any]], tokens: TokenLabels | None = None,
                   num_labels: int | None = None) -> dict[str, Any]:
    """Items -> a batch: `collate_clips` plus ``masked`` (B, S) bool and, with ``tokens``,
    ``labels`` (B, S) int64 (-1 at padding); ``count`` = masked valid patches (the loss
    terms). An item whose tokens cannot be read fails like an unreadable file."""
    from .data import collate_clips, failure_entry

    for it in items:
        if it["error"] is None and tokens is not None:
            try:
                total = file_samples(it["source"])
                it["labels"] = tokens.crop(it["source"], it["offset"], len(it["wav"]), total)
                if num_labels is not None and bool((it["labels"] >= num_labels).any()):
                    raise InputError(f"{it['source']}: token ids reach "
                                     f"{int(it['labels'].max())}, beyond the model's "
                                     f"{num_labels} labels")
            except Exception as e:  # fails like an unreadable file
                entry = failure_entry(it["source"], e)
                it["error"], it["trace"] = entry[1], entry[2:]
    good = [it for it in items if it["error"] is None]
    masks = [torch.from_numpy(it.pop("mask")) for it in good]
    labels = [it.pop("labels") for it in good] if tokens is not None else []
    for it in items:
        it.pop("mask", None)
    batch = collate_clips(items)
    length, _ = crop_patches(batch)
    batch["masked"] = pad_masks(masks, length)
    if tokens is not None:
        full = torch.full((len(good), length), -1, dtype=torch.long)
        for b, row in enumerate(labels):
            full[b, : len(row)] = row
        batch["labels"] = full
    batch["count"] = int(batch["masked"].sum())
    del batch["targets"]
    return batch


def neighbour_guess(labels: torch.Tensor, masked: torch.Tensor, valid: int) -> torch.Tensor:
    """The copy-the-neighbour baseline of one clip: at every masked patch, the label of the
    nearest kept patch in the same frequency band (the earlier one on a tie); -1 where
    the band keeps nothing. ``labels``, ``masked``: (S,), the first ``valid`` real."""
    steps = valid // PATCHES_PER_STEP
    lab = labels[:valid].reshape(steps, PATCHES_PER_STEP)
    hid = masked[:valid].reshape(steps, PATCHES_PER_STEP)
    guess = torch.full_like(lab, -1)
    times = torch.arange(steps)
    for band in range(PATCHES_PER_STEP):
        kept = times[~hid[:, band]]
        if len(kept) == 0:
            continue
        nearest = (times.unsqueeze(1) - kept.unsqueeze(0)).abs().argmin(dim=1)
        guess[:, band] = lab[kept[nearest], band]
    return guess.reshape(-1)


# --------------------------------------------------------------------------- the task
class PretrainTask(loop.Task):
    """Masked acoustic-token prediction as a `beats.train.loop.Task`."""

    name = "pretrain"

    def __init__(self, model: BEATsForPretraining, files: Sequence[Clip], cfg: PretrainConfig,
                 labels: LabelSource, heldout: Sequence[Clip] = (),
                 info: dict[str, Any] | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.source = labels
        self.info = info or {}
        self.files, self.heldout_files = files, heldout
        draw = MaskDraw(model.cfg.mask_ratio)
        self.train_set = audio_dataset(files, cfg, draw)
        self.heldout_set = heldout_dataset(heldout, cfg, draw) if len(heldout) else None
        self.clip_seconds = cfg.crop_seconds
        self.label_counts: torch.Tensor | None = None
        self.baselines: dict[str, float] | None = None
        self.last_scores: dict[str, float] | None = None

    def run_info(self) -> dict[str, Any]:
        return {**self.info, "labels": self.source.description,
                "ssl_config": self.model.cfg.to_dict()}

    def identity(self) -> dict[str, Any]:
        return {"audio": files_digest(self.files), "heldout": files_digest(self.heldout_files),
                "model": self.model.cfg.to_dict(), "labels": self.source.identity()}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_masked(items, self.source.tokens, self.model.cfg.num_labels)

    def parameter_groups(self, cfg: loop.TrainConfig) -> list[dict[str, Any]]:
        decayed, plain = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decayed if p.ndim > 1 else plain).append(p)
        return [{"params": decayed, "weight_decay": cfg.weight_decay},
                {"params": plain, "weight_decay": 0.0}]

    def _forward(self, batch: dict[str, Any]) -> Any:
        model_cfg = self.model.cfg.model
        features, frames = filterbank(batch["wav"], batch["lengths"], model_cfg)
        labels = self.source.labels(features, frames, batch, model_cfg)
        return self.model(features, frames, batch["masked"], labels)

    def forward_loss(self, batch: dict[str, Any], denominator: float
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self._forward(batch)
        m = out.metrics
        counts = m["label_counts"].detach()
        self.label_counts = counts if self.label_counts is None else self.label_counts + counts
        metrics = {
            "masked_accuracy": torch.stack([m["masked_correct"], m["masked_count"]]).float(),
            "unmasked_accuracy": torch.stack([m["unmasked_correct"], m["unmasked_count"]]
                                             ).float(),
        }
        return out.loss(denominator), metrics

    def after_step(self, step: int) -> dict[str, float]:
        """``labels_used``: distinct labels among the step's valid patches, all processes."""
        d = distributed.setup(self.cfg.device)
        device = d.device
        counts = self.label_counts
        if counts is None:
            counts = torch.zeros(self.model.cfg.num_labels, dtype=torch.long, device=device)
        counts = distributed.all_sum(counts.to(device), d)
        self.label_counts = None
        return {"labels_used": float((counts > 0).sum())}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float] | None:
        if self.heldout_set is None:
            return None
        self.model.eval()
        device = next(self.model.parameters()).device
        loader = DataLoader(self.heldout_set, collate_fn=self.collate, batch_sampler=
                            heldout_batches(len(self.heldout_set), self.cfg.eval_batch))
        sums = {"loss": 0.0, "correct": 0, "count": 0, "kept_correct": 0, "kept": 0}
        guesses, truth = [], []
        for batch in loader:
            if batch["count"] == 0:
                continue
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            out = self._forward(batch)
            m = out.metrics
            sums["loss"] += float(out.loss_sum)
            sums["correct"] += int(m["masked_correct"])
            sums["count"] += int(m["masked_count"])
            sums["kept_correct"] += int(m["unmasked_correct"])
            sums["kept"] += int(m["unmasked_count"])
            if self.baselines is None:
                labels = self.source.labels(*filterbank(batch["wav"], batch["lengths"],
                                                        self.model.cfg.model), batch,
                                            self.model.cfg.model).cpu()
                masked = batch["masked"].cpu()
                for b, n in enumerate(batch["lengths"].tolist()):
                    valid = num_patches(int(n))
                    hid = masked[b, :valid]
                    guesses.append(neighbour_guess(labels[b], masked[b], valid)[hid])
                    truth.append(labels[b, :valid][hid])
        if self.baselines is None and truth:
            t, g = torch.cat(truth), torch.cat(guesses)
            self.baselines = {"majority": float(torch.bincount(t).max()) / len(t),
                              "neighbour": float((g == t).float().mean())}
        n = max(sums["count"], 1)
        out = {"score": sums["correct"] / n, "tiebreak": -sums["loss"] / n,
               "masked_accuracy": sums["correct"] / n, "loss": sums["loss"] / n,
               "unmasked_accuracy": sums["kept_correct"] / max(sums["kept"], 1)}
        out.update(self.baselines or {})
        self.last_scores = out
        return out

    def export(self, out_dir: Path, tag: str, state_dict: dict[str, torch.Tensor]) -> None:
        """``last``: ``OUT/model`` (the encoder) and ``OUT/tokenizer`` (a random one).
        The best held-out step stays in ``OUT/state/best.pt`` only."""
        if tag != "last":
            return
        backbone = {k.removeprefix("backbone."): v for k, v in state_dict.items()
                    if k.startswith("backbone.")}
        serialization.write_pretrained(out_dir / "model", self.model.cfg.model.to_dict(),
                                       backbone, None, architecture="BEATs")
        if self.source.random and self.source.tokenizer is not None:
            self.source.tokenizer.save_pretrained(out_dir / "tokenizer")


# --------------------------------------------------------------------------- the API
@dataclass
class PretrainResult:
    """What `pretrain` returns: the exported encoder (``OUT/model``), the last held-out
    scores (None without held-out audio) and the loop's `FitResult`."""

    model: BEATs
    heldout: dict[str, float] | None
    fit: loop.FitResult


def pretrain(audio: Sequence[str | os.PathLike] | Sequence[Clip], out_dir: str | os.PathLike,
             config: PretrainConfig | None = None, *,
             heldout: Sequence[str | os.PathLike] | Sequence[Clip] = ()) -> PretrainResult:
    """Pre-train on ``audio`` into ``out_dir``; see the module docstring.

    ``audio`` and ``heldout``: what ``beats pretrain`` takes (files, folders, list files)
    or `Clip` objects (paths or 16 kHz arrays). Raises ``ValueError`` before any training
    for no audio, an unknown preset or bad SSL config, a tokenizer that is not one, token
    outputs that do not match the audio, and `loop.RunError` for a folder holding another
    run (without ``resume``), a resumed run whose settings, audio, labels or model differ,
    and inputs none of which can be read (listed in ``OUT/failed.jsonl``). Resuming a
    finished run returns it as it was written (``result.fit.finished_before``).
    """
    cfg = config or PretrainConfig()
    out_dir = Path(out_dir)
    loop.check_output_folder(out_dir, cfg.resume)
    files = _clips(audio, "AUDIO")
    held = _clips(heldout, "--heldout") if len(heldout) else []
    cfg.ssl_config()  # an unknown preset or a bad JSON fails before the tokenizer loads
    source = LabelSource(cfg)
    source.check(files)
    source.check(held)
    ssl = cfg.ssl_config(source.num_labels)
    with torch.random.fork_rng(devices=[]):  # initialisation: a function of the seed alone
        torch.manual_seed(cfg.seed)
        model = BEATsForPretraining(ssl)
    info = {"audio": _names(audio), "heldout": _names(heldout), "files": len(files),
            "heldout_files": len(held), "output": str(out_dir)}
    task = PretrainTask(model, files, cfg, source, held, info)
    per_step, _ = loop.steps_for(cfg, len(files), cfg.crop_seconds)
    task.failed, task.readable = check_audio(files, cfg, per_step)
    fit = loop.fit(task, cfg, out_dir)
    if fit.finished_before:
        scores = _last_heldout(out_dir)
    else:
        scores = task.last_scores
        loop.finish(out_dir, fit)
    if scores is not None:
        scores = {k: v for k, v in scores.items() if k not in ("score", "tiebreak")}
    return PretrainResult(BEATs.from_pretrained(out_dir / "model"), scores, fit)


def _last_heldout(out_dir: Path) -> dict[str, float] | None:
    """The last held-out scores in ``OUT/metrics.jsonl`` (without their ``val_`` prefix)."""
    from .logs import read_metrics

    lines = [x for x in read_metrics(out_dir) if "val_masked_accuracy" in x]
    if not lines:
        return None
    return {k.removeprefix("val_"): v for k, v in lines[-1].items() if k.startswith("val_")}


def _clips(inputs: Sequence[Any], what: str) -> Sequence[Clip]:
    if len(inputs) and all(isinstance(x, Clip) for x in inputs):
        return list(inputs)
    return find_audio([os.fspath(x) for x in inputs], what)


def _names(inputs: Sequence[Any]) -> list[str]:
    return [os.fspath(x) if not isinstance(x, Clip) else x.name for x in inputs]
