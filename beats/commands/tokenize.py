"""``beats tokenize``: acoustic token ids for files and folders of audio."""

from __future__ import annotations

import argparse
import sys

from .extract import DTYPES, pick_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="write BEATs acoustic tokens per file",
        description=(
            "Tokenize every audio file in INPUTS into OUT with a BEATs tokenizer: one int64 "
            "array (T, 8) per file (8 tokens per 160 ms step, one per frequency band) and its "
            "step centre times, plus manifest.jsonl. Same input, resume and output rules as "
            "`beats extract`."
        ),
    )
    p.add_argument("inputs", nargs="+", help="audio files, folders or list files")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-m", "--model", default="Tokenizer_iter3_plus_AS2M",
                   help="tokenizer: registry name, hub repo, folder or .pt file (default: "
                        "Tokenizer_iter3_plus_AS2M)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--window", type=float, default=10.0,
                   help="seconds: longer files are tokenized in windows (0: whole files)")
    p.add_argument("--hop", type=float, default=None, help="default: 80%% of the window")
    p.add_argument("--format", dest="output_format", default="npy",
                   choices=("npy", "safetensors"))
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--resume", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..extract import ExtractOptions, extract
    from ..tokenizer import BEATsTokenizer

    try:
        options = ExtractOptions(tokens=True, batch_size=args.batch_size,
                                 window=args.window or None, hop=args.hop,
                                 num_workers=args.workers, output_format=args.output_format,
                                 shard_size=args.shard_size, resume=args.resume)
        model = BEATsTokenizer.from_pretrained(args.model, device=pick_device(args.device),
                                               dtype=DTYPES[args.dtype])
        summary = extract(model, args.inputs, args.output, options, model_name=args.model,
                          progress=not args.quiet)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"beats tokenize: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"beats tokenize: {summary}", file=sys.stderr)
        for _path, error in summary.failures[:20]:
            print(f"  failed: {error}", file=sys.stderr)
    return summary.exit_code
