"""``beats probe``: train a linear or attentive probe, or apply one (``--predict``)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..pooling import PoolingSpec
from .arguments import fraction, non_negative_int, output_folder, positive_int, warnings_as_lines
from .options import add_options, build_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..probe import TrainConfig

    p = sub.add_parser(
        "probe",
        help="train a probe on labelled audio, or apply one with --predict",
        description=(
            "Train: beats probe DATA -o OUT, where DATA is a folder with one subfolder per "
            "class, a CSV (path,label[,fold]; labels joined by ';' for multi-label) or a "
            "strong-label TSV (filename onset offset event_label). Each file is in one "
            "split only. Embeddings come from --embeddings (a `beats extract` output) or "
            "are computed into OUT/embeddings. Writes OUT/head.safetensors, head.json, "
            "report.json, and OUT/failed.jsonl listing files that could not be embedded "
            "(they are skipped). Apply: beats probe --predict OUT FILES..."
        ),
    )
    p.add_argument("inputs", nargs="+", help="DATA (train) or audio files (--predict)")
    p.add_argument("-o", "--output", type=output_folder,
                   help="folder for the trained probe (train)")
    p.add_argument("--predict", metavar="PROBE_DIR", help="apply the probe in PROBE_DIR")
    p.add_argument("-m", "--model", default=None,
                   help="backbone (default: the registry's default model; with --predict, "
                        "the probe's own)")
    p.add_argument("--embeddings", help="a `beats extract` output folder to train from")
    p.add_argument("--kind", default="linear", choices=("linear", "attentive"),
                   help="linear: on the time-averaged embedding; attentive: attention "
                        "pooling over the 160 ms steps")
    p.add_argument("--layer", default="last", help="last, or a hidden-state number")
    add_options(p, TrainConfig, ["epochs", "lr", "weight_decay", "batch_size", "patience"],
                checked=True)
    p.add_argument("--val-fraction", type=fraction, default=0.15,
                   help="share of each class's files held out for early stopping")
    p.add_argument("--test-fraction", type=fraction, default=0.2,
                   help="share of each class's files held out for scoring")
    p.add_argument("--val-fold", help="CSV fold used for early stopping")
    p.add_argument("--test-fold", help="CSV fold held out for scoring")
    p.add_argument("--cv", action="store_true", help="cross-validate over the CSV folds")
    p.add_argument("--force", action="store_true",
                   help="replace a probe already in OUT (without it, such a folder is refused)")
    add_options(p, TrainConfig, ["seed"], checked=True)
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("-j", "--workers", type=non_negative_int, default=2,
                   help="audio reading processes")
    p.add_argument("--top-k", type=positive_int, default=3,
                   help="labels shown per file (--predict)")
    p.add_argument("--json", action="store_true", help="JSON lines output (--predict)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or scores")


def _pooling(kind: str, layer: str) -> PoolingSpec:
    layers = "last" if layer == "last" else (int(layer),)
    return PoolingSpec(layers=layers, time="mean" if kind == "linear" else "none", freq="mean")


def _load_backbone(name: str | None, device: str):
    from ..devices import pick_device
    from ..model import BEATs
    from .extract import default_model_name

    name = name or default_model_name()
    return BEATs.from_pretrained(name, device=pick_device(device)), name


def run(args: argparse.Namespace) -> int:
    logging.getLogger("beats.extract").setLevel(logging.ERROR)  # failures are listed below
    try:
        with warnings_as_lines("probe"):
            if args.predict:
                return _predict(args)
            if not args.output:
                raise InputError("training needs -o OUT (or use --predict PROBE_DIR FILES...)")
            return _train(args)
    except KeyboardInterrupt:
        kept = "" if args.predict else (f"; the embeddings computed so far are kept in "
                                         f"{Path(args.output) / 'embeddings'} for the next run")
        print(f"beats probe: interrupted{kept}", file=sys.stderr)
        return 130


def _claim(out: Path, force: bool) -> None:
    """Refuse a folder holding another run: a probe unless ``force`` (its files are then
    replaced as the new ones are written), and always a training or extract run."""
    from ..probe import holds_probe

    other = [n for n in ("config.json", "metrics.jsonl", "state", "manifest.jsonl")
             if (out / n).exists()]
    if other:
        raise InputError(f"{out} holds another kind of run ({', '.join(other)}): choose an "
                         "empty output folder for the probe")
    if holds_probe(out) and not force:
        raise InputError(f"{out} already holds a probe (head.json, report.json): pass "
                         "--force to replace it, or choose another output folder")


def _embeddings(args: argparse.Namespace, paths: list[Path]
                ) -> tuple[list[np.ndarray | None], list[tuple[str, str]], dict]:
    """Each file's embedding (None for a file that could not be embedded), the failures
    [(path, error)], and the settings the embeddings were made with."""
    from ..extract import ExtractOptions, extract
    from ..probe import input_files, load_embeddings

    if args.embeddings:
        run_file = Path(args.embeddings) / "run.json"
        settings = json.loads(run_file.read_text()) if run_file.exists() else {}
        return (*load_embeddings(args.embeddings, paths), settings)
    model, name = _load_backbone(args.model, args.device)
    cache = Path(args.output) / "embeddings"
    options = ExtractOptions(pooling=_pooling(args.kind, args.layer), num_workers=args.workers)
    run_file = cache / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()) != options.fingerprint(name):
        if not args.force:
            raise InputError(f"{cache} holds embeddings made with other settings (model, "
                             "--kind or --layer): pass --force to replace them, or choose "
                             "another output folder")
        shutil.rmtree(cache)
    options.resume = (cache / "manifest.jsonl").exists()
    summary = extract(model, input_files(paths), cache, options, model_name=name,
                      progress=not args.quiet)
    _notice(summary.notice("probe"))
    return (*load_embeddings(cache, paths), json.loads(run_file.read_text()))


def _train(args: argparse.Namespace) -> int:
    from ..files import folder_lock
    from ..labelled import read_labelled_set

    if len(args.inputs) != 1:
        raise InputError("training takes one DATA folder, CSV or TSV")
    config = train_config(args)  # bad settings fail before any embedding is computed
    data = read_labelled_set(args.inputs[0])
    out = Path(args.output)
    with folder_lock(out, "beats probe"):
        _claim(out, args.force)
        return _train_locked(args, data, out, config)


def train_config(args: argparse.Namespace) -> Any:
    """The probe's `beats.probe.TrainConfig` from the options; a bad value names its
    option."""
    from ..options import options_of
    from ..probe import TrainConfig

    values = {f.name: getattr(args, f.name) for f in options_of(TrainConfig)}
    return build_config(TrainConfig, values)


def _train_locked(args: argparse.Namespace, data: Any, out: Path, config: Any) -> int:
    from ..files import atomic_write
    from ..labelled import split_by_file
    from ..manifest import FAILED, ManifestWriter, Record
    from ..probe import FAILED_FILE, Probe, collate, fit, metrics, save_probe

    arrays, failed, settings = _embeddings(args, data.paths)
    (out / FAILED_FILE).unlink(missing_ok=True)  # a replaced probe's
    if failed:
        with ManifestWriter(out / FAILED_FILE) as writer:
            for path, error in failed:
                writer.append(Record(path, Path(path).name, FAILED, error=error))
    kept = [i for i, a in enumerate(arrays) if a is not None]
    if not kept:
        raise InputError(f"none of the {len(arrays)} labelled files could be embedded (see "
                         f"{out / FAILED_FILE})")
    position = {r: j for j, r in enumerate(kept)}
    x, mask = collate([arrays[r] for r in kept])
    y = data.targets()[kept]

    def one_split(test_fold: str | None) -> tuple[Probe, dict[str, Any]]:
        val_fold = args.val_fold if args.val_fold != test_fold else None
        parts = split_by_file(data, kept, val_fraction=args.val_fraction,
                              test_fraction=args.test_fraction, val_fold=val_fold,
                              test_fold=test_fold, seed=args.seed)
        train, val, test = ([position[r] for r in part] for part in parts)
        torch.manual_seed(args.seed)  # the head's initialisation must not depend on history
        probe = Probe(x.shape[-1], len(data.classes), args.kind)
        history = fit(probe, x, mask, y, train, val, config, data.multilabel)
        with torch.no_grad():
            result = {"train_clips": len(train), "val_clips": len(val),
                      "test_clips": len(test), "epochs": len(history)}
            if val:
                result["val"] = metrics(probe(x[val], mask[val]), y[val], data.multilabel)
            if test:
                result["test"] = metrics(probe(x[test], mask[test]), y[test], data.multilabel)
        return probe, result

    report: dict[str, Any] = {"classes": data.classes, "multilabel": data.multilabel,
                              "clips": len(kept),
                              "failed_files": [{"path": p, "error": e} for p, e in failed]}
    if args.cv:
        folds = sorted({data.folds[r] for r in kept if data.folds[r] is not None})
        if len(folds) < 2:
            raise InputError("--cv needs a CSV with a fold column of at least 2 folds")
        per_fold = {f: one_split(f)[1] for f in folds}
        scores = [r["test"] for r in per_fold.values()]
        report["cv"] = {"folds": per_fold, "mean": {
            k: float(np.mean([s[k] for s in scores])) for k in scores[0]}}
    probe, result = one_split(args.test_fold)
    report.update(result)
    meta = {"kind": args.kind, "classes": data.classes, "multilabel": data.multilabel,
            "model": settings.get("model"), "embedding": settings, "report": report}
    save_probe(out, probe, meta)
    with atomic_write(out / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    if failed:
        print(f"beats probe: {len(failed)} file(s) could not be embedded and were skipped "
              f"(see {out / FAILED_FILE})", file=sys.stderr)
    if not args.quiet:
        for split in ("val", "test"):
            if split in report:
                shown = ", ".join(f"{k} {v:.3f}" for k, v in report[split].items())
                print(f"{split} ({report[f'{split}_clips']} clips): {shown}", file=sys.stderr)
        if "cv" in report:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in report["cv"]["mean"].items())
            print(f"cross-validation mean: {shown}", file=sys.stderr)
        print(f"probe saved to {out}", file=sys.stderr)
    return 1 if failed else 0


def _notice(line: str | None) -> None:
    if line:
        print(line, file=sys.stderr)


def _predict(args: argparse.Namespace) -> int:
    """Embed the files as the probe's embeddings were made (``beats extract``'s engine:
    long files in windows, in a temporary folder), then apply the probe."""
    from ..extract import ExtractOptions, extract
    from ..failures import ERRORS_LOG, ErrorLog
    from ..files import discover_inputs
    from ..pooling import parse_layers
    from ..probe import collate, load_embeddings, load_probe

    probe, meta = load_probe(args.predict)
    settings = meta.get("embedding", {})
    model, name = _load_backbone(args.model or meta.get("model"), args.device)
    layers = parse_layers(str(settings.get("layers", "last")).strip("[]").replace(" ", ""))
    spec = PoolingSpec(layers=layers, time=settings.get("time_pooling", "mean"),
                       freq=settings.get("freq_pooling", "mean"))
    window = settings.get("window", 10.0)
    options = ExtractOptions(pooling=spec, num_workers=args.workers, window=window,
                             hop=settings.get("hop") if window else None)
    items = discover_inputs(args.inputs)
    with tempfile.TemporaryDirectory(prefix="beats-probe-") as tmp:
        summary = extract(model, items, tmp, options, model_name=str(name), progress=False)
        arrays, failed = load_embeddings(tmp, [item.path.resolve() for item in items])
        if summary.unexpected:  # keep the tracebacks: the folder goes
            kept = ErrorLog(None, "probe").path
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / ERRORS_LOG, kept)
            summary.errors_log = str(kept)
    _notice(summary.notice("probe"))
    errors = {p: e for p, e in failed}
    for item, array in zip(items, arrays, strict=True):
        path = str(item.path)
        if array is None:
            error = errors.get(str(item.path.resolve()), "could not be embedded")
            print(json.dumps({"path": path, "error": error}) if args.json
                  else f"{path}\terror: {error}")
            continue
        with torch.no_grad():
            x, mask = collate([array])
            logits = probe(x, mask)[0]
        probs = torch.sigmoid(logits) if meta["multilabel"] else logits.softmax(-1)
        top = probs.argsort(descending=True)[: args.top_k].tolist()
        labels = [(meta["classes"][i], float(probs[i])) for i in top]
        if args.json:
            print(json.dumps({"path": path, "labels": [[n, round(p, 6)] for n, p in labels]}))
        else:
            print(path + "\t" + "\t".join(f"{n} {p:.3f}" for n, p in labels))
    return 1 if failed else 0
