"""``beats tokenize``: acoustic token ids for files and folders of audio."""

from __future__ import annotations

import argparse
import logging

from ..devices import pick_device
from .extract import DTYPES, add_run_arguments, interrupted, report, run_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="write BEATs acoustic tokens per file",
        description=(
            "Tokenize every audio file in INPUTS into OUT with a BEATs tokenizer: one int64 "
            "array (T, 8) per file (8 tokens per 160 ms step, one per frequency band) and its "
            "step centre times, plus manifest.jsonl. Same input, window, resume and output "
            "rules as `beats extract`."
        ),
    )
    p.add_argument("-m", "--model", default="Tokenizer_iter3_plus_AS2M",
                   help="tokenizer: registry name, hub repo, folder or .pt file (default: "
                        "Tokenizer_iter3_plus_AS2M)")
    add_run_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..extract import extract
    from ..tokenizer import BEATsTokenizer

    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    options = run_options(args, tokens=True)
    model = BEATsTokenizer.from_pretrained(args.model, device=pick_device(args.device),
                                           dtype=DTYPES[args.dtype])
    try:
        summary = extract(model, args.inputs, args.output, options, model_name=args.model,
                          progress=not args.quiet)
    except KeyboardInterrupt:
        return interrupted("tokenize", args.output)
    return report("tokenize", summary, args.quiet)
