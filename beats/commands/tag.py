"""``beats tag``: the top AudioSet labels of audio files, with a fine-tuned checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError
from .arguments import positive_int

DEFAULT_TAGGER = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tag",
        help="top-k AudioSet labels per file (fine-tuned models)",
        description="Print the most probable AudioSet classes of each file (files, folders "
                    "or list files), as a table or JSON lines.",
    )
    p.add_argument("inputs", nargs="+", help="audio files, folders or list files")
    p.add_argument("-m", "--model", default=DEFAULT_TAGGER,
                   help=f"a fine-tuned checkpoint (default: {DEFAULT_TAGGER})")
    p.add_argument("-k", "--top-k", type=positive_int, default=5,
                   help="labels shown per file, most probable first")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ...")


def run(args: argparse.Namespace) -> int:
    from ..audio import load_audio
    from ..devices import pick_device
    from ..failures import ErrorLog, Failure
    from ..files import discover_inputs
    from ..inputs import pad_to_minimum
    from ..model import BEATs

    model = BEATs.from_pretrained(args.model, device=pick_device(args.device))
    if model.predictor is None:
        raise InputError(f"{args.model} has no class head: tag needs a fine-tuned model "
                         f"such as {DEFAULT_TAGGER}")
    inputs = discover_inputs(args.inputs)
    failed = 0
    errors = ErrorLog(None, "tag")  # tag writes no folder: a temporary file, if needed
    for item in inputs:
        try:
            wav = pad_to_minimum(load_audio(item.path)[0])
            labels = model.predict_labels(wav, top_k=args.top_k)[0]
        except KeyboardInterrupt:
            print("beats tag: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # one file never stops a run
            failed += 1
            failure = Failure.of(e, item.path)
            errors.add(str(item.path), failure)
            if args.json:
                print(json.dumps({"path": str(item.path), "error": failure.text}))
            else:
                print(f"{item.path}\terror: {failure.text}")
            continue
        if args.json:
            print(json.dumps({"path": str(item.path),
                              "labels": [[n, round(p, 6)] for n, p in labels]}))
        else:
            print(f"{item.path}\t" + "\t".join(f"{n} ({p:.3f})" for n, p in labels))
    notice = errors.notice("tag")
    if notice:
        print(notice, file=sys.stderr)
    return 1 if failed else 0
