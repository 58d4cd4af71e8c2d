"""``beats probe``: train a linear or attentive probe, or apply one (``--predict``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..pooling import PoolingSpec
from .arguments import non_negative_int, output_folder, positive_float, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="train a probe on labelled audio, or apply one with --predict",
        description=(
            "Train: beats probe DATA -o OUT, where DATA is a folder with one subfolder per "
            "class or a CSV (path,label[,fold]; labels joined by ';' for multi-label). "
            "Embeddings come from --embeddings (a `beats extract` output) or are computed "
            "into OUT/embeddings. Writes OUT/head.safetensors, head.json, report.json. "
            "Apply: beats probe --predict OUT FILES..."
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
    p.add_argument("--epochs", type=positive_int, default=200, help="most training epochs")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--batch-size", type=positive_int, default=32, help="clips per step")
    p.add_argument("--patience", type=positive_int, default=20,
                   help="epochs without improvement before stopping")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of the training clips held out for early stopping")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of the clips held out for scoring")
    p.add_argument("--val-fold", help="CSV fold used for early stopping")
    p.add_argument("--test-fold", help="CSV fold held out for scoring")
    p.add_argument("--cv", action="store_true", help="cross-validate over the CSV folds")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits and the head")
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
    if args.predict:
        return _predict(args)
    if not args.output:
        raise ValueError("training needs -o OUT (or use --predict PROBE_DIR FILES...)")
    return _train(args)


def _embeddings(args: argparse.Namespace, paths: list[Path]) -> tuple[list[np.ndarray], dict]:
    """Cached embeddings and the settings they were made with."""
    from ..extract import ExtractOptions, extract
    from ..probe import input_files, load_cached

    if args.embeddings:
        run_file = Path(args.embeddings) / "run.json"
        settings = json.loads(run_file.read_text()) if run_file.exists() else {}
        return load_cached(args.embeddings, paths), settings
    model, name = _load_backbone(args.model, args.device)
    cache = Path(args.output) / "embeddings"
    options = ExtractOptions(pooling=_pooling(args.kind, args.layer), num_workers=args.workers,
                             resume=(cache / "manifest.jsonl").exists())
    summary = extract(model, input_files(paths), cache, options, model_name=name,
                      progress=not args.quiet)
    if summary.failed:
        details = "; ".join(e for _, e in summary.failures[:3])
        raise ValueError(f"{summary.failed} labelled file(s) could not be embedded: {details}")
    return load_cached(cache, paths), json.loads((cache / "run.json").read_text())


def _train(args: argparse.Namespace) -> int:
    from ..files import atomic_write
    from ..probe import (
        Probe,
        TrainConfig,
        collate,
        fit,
        metrics,
        read_labelled_set,
        save_probe,
        stratified_split,
    )

    if len(args.inputs) != 1:
        raise ValueError("training takes one DATA folder or CSV")
    data = read_labelled_set(args.inputs[0])
    arrays, settings = _embeddings(args, data.paths)
    x, mask = collate(arrays)
    y = data.targets()
    config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                         batch_size=args.batch_size, patience=args.patience, seed=args.seed)
    rows = list(range(len(data.paths)))

    def one_split(test_fold: str | None) -> tuple[Probe, dict[str, Any]]:
        if test_fold is not None:
            test = [r for r in rows if data.folds[r] == test_fold]
            rest = [r for r in rows if data.folds[r] != test_fold]
        else:
            rest, test = stratified_split(data.labels, rows, args.test_fraction, args.seed)
        if args.val_fold is not None:
            val = [r for r in rest if data.folds[r] == args.val_fold]
            train = [r for r in rest if data.folds[r] != args.val_fold]
        else:
            train, val = stratified_split(data.labels, rest, args.val_fraction, args.seed + 1)
        if not train:
            raise ValueError("no training clips left after the validation/test split")
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
                              "clips": len(rows)}
    if args.cv:
        folds = sorted({f for f in data.folds if f is not None})
        if len(folds) < 2:
            raise ValueError("--cv needs a CSV with a fold column of at least 2 folds")
        per_fold = {f: one_split(f)[1] for f in folds}
        scores = [r["test"] for r in per_fold.values()]
        report["cv"] = {"folds": per_fold, "mean": {
            k: float(np.mean([s[k] for s in scores])) for k in scores[0]}}
    probe, result = one_split(args.test_fold)
    report.update(result)
    meta = {"kind": args.kind, "classes": data.classes, "multilabel": data.multilabel,
            "model": settings.get("model"), "embedding": settings, "report": report}
    save_probe(args.output, probe, meta)
    with atomic_write(Path(args.output) / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    if not args.quiet:
        for split in ("val", "test"):
            if split in report:
                shown = ", ".join(f"{k} {v:.3f}" for k, v in report[split].items())
                print(f"{split} ({report[f'{split}_clips']} clips): {shown}", file=sys.stderr)
        if "cv" in report:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in report["cv"]["mean"].items())
            print(f"cross-validation mean: {shown}", file=sys.stderr)
        print(f"probe saved to {args.output}", file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ..audio import AudioError, load_audio
    from ..inputs import pad_to_minimum
    from ..pooling import parse_layers, pool
    from ..probe import collate, load_probe

    probe, meta = load_probe(args.predict)
    settings = meta.get("embedding", {})
    model, _ = _load_backbone(args.model or meta.get("model"), args.device)
    layers = parse_layers(str(settings.get("layers", "last")).strip("[]"))
    spec = PoolingSpec(layers=layers, time=settings.get("time_pooling", "mean"),
                       freq=settings.get("freq_pooling", "mean"))
    failed = 0
    for path in args.inputs:
        try:
            wav = pad_to_minimum(load_audio(path)[0])
            with torch.inference_mode():
                out = model.extract_features(wav, output_hidden_states=spec.needs_hidden_states)
                emb = pool(out, spec, model.cfg.encoder_layers)[0].cpu().numpy()
                x, mask = collate([emb])
                logits = probe(x, mask)[0]
        except (AudioError, ValueError) as e:
            failed += 1
            print(json.dumps({"path": path, "error": str(e)}) if args.json
                  else f"{path}\terror: {e}")
            continue
        probs = torch.sigmoid(logits) if meta["multilabel"] else logits.softmax(-1)
        top = probs.argsort(descending=True)[: args.top_k].tolist()
        labels = [(meta["classes"][i], float(probs[i])) for i in top]
        if args.json:
            print(json.dumps({"path": path, "labels": [[n, round(p, 6)] for n, p in labels]}))
        else:
            print(path + "\t" + "\t".join(f"{n} {p:.3f}" for n, p in labels))
    return 1 if failed else 0
